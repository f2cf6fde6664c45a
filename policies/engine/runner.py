"""The model side of the embedded engine: one token per running row per step, and in-place weight loads.

Threading contract: `step`, `drop_cache` and `apply_weights` run only on the scheduler's single
decode thread, so they never overlap; `read_checkpoint` only reads files and parameter shapes and
may run on any thread while a step is in progress.

A step with the KV cache (the default) runs at most two forwards: a decode of every row already
in the batch cache (one token each, attending to its cached keys/values) and a prefill of the rows
that are not (they just joined, or their cache was dropped): their whole context, left-padded,
whose keys/values then join the batch cache (see batch_cache.py for the layout and why). Rows
absent from a step leave the cache. So rows join and leave between steps (continuous batching)
and the scheduler never manages cache slots: the runner derives them from the rows it is given.

For Qwen3, Qwen2, Llama and Mistral with SDPA (what policies/model.py builds, and most HF causal
LMs) the cache is a SlotCache and the decode is SlotDecoder's fixed-shape step, replayed as a CUDA
graph on a GPU (HF's eager forward is launch-bound there: ~30 ms per step of Python for ~5 ms of
kernels); other models use BatchCache and HF's forward.

Without the cache (`use_kv_cache=False`, the reference path) every step recomputes every row from
scratch. Both paths give each row the logits of its sequence run alone: rows are left-padded with
an attention mask and position ids that restart at 0 on each row's first real token, so padding
and batch composition change only float rounding (~1e-7).

Keep vs recompute across a weight update: rows keep their cached keys/values when the weights
change (SGLang's in_place pause: the next tokens attend to a prefix computed by the old weights);
`drop_cache` makes every row re-prefill its whole context under the current weights (retract).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DynamicCache

from policies.engine import batch_cache
from policies.engine.batch_cache import BatchCache
from policies.engine.sampling import Row, RowParams, Sampled, position_logprobs, sample
from policies.engine.slot_cache import SlotCache
from policies.engine.slot_decoder import SlotDecoder

log = logging.getLogger("engine.runner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightLoadError(ValueError):
    """A checkpoint that does not match the live model exactly; nothing was copied."""


def attention_for(device: str, dtype: str) -> str:
    """flash_attention_2 on a CUDA device in half precision when flash_attn is installed, else sdpa."""
    half = dtype in ("bfloat16", "float16")
    if device.startswith("cuda") and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class ModelRunner:
    """Owns the live model and the batch KV cache. Parameters are only changed in place (copy_)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        use_kv_cache: bool = True,
        slot_decode: bool = True,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.device = device
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(model.config.max_position_embeddings)
        eos = model.config.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.use_kv_cache = use_kv_cache and batch_cache.supports(model.config)
        if use_kv_cache and not self.use_kv_cache:
            log.warning("this model's cache layers are not plain DynamicLayers: decoding without a KV cache")
        self._decoder: SlotDecoder | None = None
        self._cache: BatchCache | SlotCache = BatchCache()
        if self.use_kv_cache and slot_decode and SlotDecoder.supports(model):
            self._decoder = SlotDecoder(model, device=device, cuda_graphs=cuda_graphs and device.type == "cuda")
            self._cache = self._decoder.cache

    @classmethod
    def load(
        cls, model_path: str, *, device: str = "cpu", dtype: str = "float32", use_kv_cache: bool = True
    ) -> ModelRunner:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=DTYPES[dtype], attn_implementation=attention_for(device, dtype)
        )
        dev = torch.device(device)
        return cls(model.to(dev).eval().requires_grad_(False), device=dev, use_kv_cache=use_kv_cache)

    @property
    def cached_rows(self) -> int:
        return len(self._cache)

    @property
    def cache_width(self) -> int:
        """The longest cached row: the columns a decode step attends to (padding columns are cut)."""
        if isinstance(self._cache, SlotCache):
            return self._cache.width
        return 0 if self._cache.mask is None else self._cache.mask.shape[1]

    @torch.inference_mode()
    def step(self, rows: list[Row]) -> Sampled:
        """Sample one next token for every row; returns token ids, logprobs and top logprobs, row-aligned."""
        if not self.use_kv_cache:
            logits, _ = self._prefill(rows, keep_cache=False)
            return sample(logits, [r.params for r in rows])
        try:
            return self._cached_step(rows)
        except BaseException:
            self._cache.clear()  # a step that failed half-way leaves no trustworthy cache: re-prefill
            raise

    def _cached_step(self, rows: list[Row]) -> Sampled:
        cached: list[int] = []  # indices of rows whose cache holds all but their last token
        fresh: list[int] = []  # rows to prefill: new, or their cache was dropped
        for i, row in enumerate(rows):
            (cached if self._cache.length_of(row.key) == len(row.tokens) - 1 else fresh).append(i)
        self._cache.keep([rows[i].key for i in cached])
        logits = []
        if cached:
            decode = self._decode if self._decoder is None else self._decoder.decode
            logits.append(decode([rows[i] for i in cached]))
        if fresh:
            prefill_logits, (kv, mask) = self._prefill([rows[i] for i in fresh], keep_cache=True)
            self._cache.append([rows[i].key for i in fresh], [len(rows[i].tokens) for i in fresh], kv, mask)
            logits.append(prefill_logits)
        order = cached + fresh  # the rows of `logits`
        got = sample(logits[0] if len(logits) == 1 else torch.cat(logits), [rows[i].params for i in order])
        if order == list(range(len(rows))):
            return got
        out = Sampled([0] * len(rows), [0.0] * len(rows), [None] * len(rows))
        for j, i in enumerate(order):
            out.tokens[i], out.logprobs[i], out.top[i] = got.tokens[j], got.logprobs[j], got.top[j]
        return out

    @torch.inference_mode()
    def score(self, tokens: list[int], start: int, params: RowParams) -> Sampled:
        """Prompt logprobs: for each position j in (start, len(tokens)), the logprob of tokens[j]
        given tokens[:j] (and its top logprobs when params ask), by one forward of `tokens` without
        the cache (SGLang's input_token_logprobs from logprob_start_len = start; the token at
        `start` itself gets none, as there). Runs on the decode thread, between steps."""
        count = len(tokens) - 1 - start
        if count <= 0:
            return Sampled([], [], [])
        ids = torch.tensor([tokens], device=self.device)
        # logits_to_keep = count + 1 keeps positions start..len-1; the last one predicts the next token
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=count + 1).logits[0, :-1]
        return position_logprobs(logits, tokens[start + 1 :], params)

    def _decode(self, rows: list[Row]) -> torch.Tensor:
        """Feed each cached row its last token; the cache grows by one column. Returns [rows, V] logits."""
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[len(r.tokens) - 1] for r in rows], device=self.device)
        mask = self._cache.grown_mask()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self._cache.kv, use_cache=True
        )
        self._cache.commit_decode(mask)
        return out.logits[:, -1, :]

    def _prefill(
        self, rows: list[Row], *, keep_cache: bool
    ) -> tuple[torch.Tensor, tuple[DynamicCache, torch.Tensor] | None]:
        """Run every row's whole context, left-padded; returns last-position logits [rows, V] and,
        when keep_cache, the rows' new cache and padding mask.

        With the cache, identical contexts are run once and their results copied to each row: the
        n samples of a GRPO group arrive together with one prompt, so this divides prefill work by
        n (what SGLang's prefix cache does for parallel sampling). The reference path does not.
        """
        contexts, which = _dedupe([r.tokens for r in rows]) if keep_cache else ([r.tokens for r in rows], None)
        width = max(len(tokens) for tokens in contexts)
        ids = torch.zeros(len(contexts), width, dtype=torch.long)
        mask = torch.zeros(len(contexts), width, dtype=torch.long)
        for i, tokens in enumerate(contexts):
            ids[i, width - len(tokens) :] = torch.tensor(tokens)
            mask[i, width - len(tokens) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        kv = DynamicCache(config=self.model.config) if keep_cache else None
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=kv,
            use_cache=keep_cache,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :]
        if which is not None:  # copy each unique context's results to its rows
            index = torch.tensor(which, device=self.device)
            logits, mask = logits.index_select(0, index), mask.index_select(0, index)
            for layer in kv.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        return logits, ((kv, mask) if keep_cache else None)

    def drop_cache(self) -> None:
        """Forget every row's keys/values: each row re-prefills its whole context at its next step."""
        self._cache.clear()

    def release_memory(self) -> None:
        """``drop_cache``, and also free the cache's buffers and the decode graphs (colocated runs
        hand that memory to the learner); the next decode step reallocates and re-captures."""
        if self._decoder is not None:
            self._decoder.release()
        else:
            self._cache.clear()

    def read_checkpoint(self, model_path: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Load every *.safetensors in `model_path` and pair each tensor with its live parameter.

        Strict: a missing parameter, an unexpected name or a shape mismatch raises
        WeightLoadError. Tied parameters (one tensor under two names, e.g. embed_tokens and
        lm_head) need only one of their names in the checkpoint.
        """
        if not Path(model_path).is_dir():
            raise WeightLoadError(f"model_path {model_path} is not a directory")
        files = sorted(Path(model_path).glob("*.safetensors"))
        if not files:
            raise WeightLoadError(f"no *.safetensors files in {model_path}")
        loaded: dict[str, torch.Tensor] = {}
        for f in files:
            loaded.update(load_file(str(f)))
        live = self.model.state_dict(keep_vars=True)
        _check_names(loaded, live)
        pairs = []
        for name, tensor in loaded.items():
            if tuple(tensor.shape) != tuple(live[name].shape):
                got, want = tuple(tensor.shape), tuple(live[name].shape)
                raise WeightLoadError(f"shape mismatch for {name}: checkpoint {got} vs model {want}")
            pairs.append((live[name], tensor))
        return pairs

    def pair_with_live(self, named: list[tuple[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pair received tensors (part of the model: one bucket) with their live parameters.
        Strict per name: an unknown name or a shape mismatch raises WeightLoadError."""
        live = self.model.state_dict(keep_vars=True)
        pairs = []
        for name, tensor in named:
            if name not in live:
                raise WeightLoadError(f"unknown parameter {name!r} in the update")
            if tuple(tensor.shape) != tuple(live[name].shape):
                got, want = tuple(tensor.shape), tuple(live[name].shape)
                raise WeightLoadError(f"shape mismatch for {name}: update {got} vs model {want}")
            pairs.append((live[name], tensor))
        return pairs

    @torch.no_grad()
    def apply_weights(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy checked tensors into the live parameters. Call only between steps."""
        for param, tensor in pairs:
            param.copy_(tensor)


def _dedupe(contexts: list[list[int]]) -> tuple[list[list[int]], list[int] | None]:
    """(unique contexts, the unique index of each input) or, when all differ, (contexts, None)."""
    unique: dict[tuple[int, ...], int] = {}
    which = [unique.setdefault(tuple(tokens), len(unique)) for tokens in contexts]
    if len(unique) == len(contexts):
        return contexts, None
    return [list(tokens) for tokens in unique], which


def _check_names(loaded: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
    unexpected = sorted(set(loaded) - set(live))
    groups: dict[int, list[str]] = {}
    for name, tensor in live.items():
        groups.setdefault(id(tensor), []).append(name)
    missing = sorted(names[0] for names in groups.values() if not any(n in loaded for n in names))
    if missing or unexpected:
        raise WeightLoadError(
            f"checkpoint does not match the model: {len(missing)} missing {missing[:3]},"
            f" {len(unexpected)} unexpected {unexpected[:3]}"
        )
    for names in groups.values():
        present = [n for n in names if n in loaded]
        if len(present) > 1 and not all(torch.equal(loaded[present[0]], loaded[n]) for n in present[1:]):
            raise WeightLoadError(f"tied parameters {present} differ in the checkpoint")
