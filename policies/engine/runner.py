"""The model side of the embedded engine: one forward step over a batch, and in-place weight loads.

Threading contract: `step` and `apply_weights` run only on the scheduler's single decode thread,
so they never overlap; `read_checkpoint` only reads files and parameter shapes and may run on any
thread while a step is in progress.

A step recomputes every row from scratch (no KV cache): rows are left-padded to a common length,
with an attention mask and position ids that restart at 0 on each row's first real token, so a
row's logits equal those of the same sequence run alone (up to float rounding, ~1e-7).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from policies.engine.sampling import RowParams, sample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Row(NamedTuple):
    """One sequence to extend by a token: the full context (prompt + generated so far)."""

    tokens: list[int]
    params: RowParams


class WeightLoadError(ValueError):
    """A checkpoint that does not match the live model exactly; nothing was copied."""


class ModelRunner:
    """Owns the live model. Parameters are only ever changed in place (copy_), never replaced."""

    def __init__(self, model: torch.nn.Module, *, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.vocab_size = int(model.config.vocab_size)
        self.max_context = int(model.config.max_position_embeddings)
        eos = model.config.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    @classmethod
    def load(cls, model_path: str, *, device: str = "cpu", dtype: str = "float32") -> ModelRunner:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
        dev = torch.device(device)
        return cls(model.to(dev).eval().requires_grad_(False), device=dev)

    @torch.inference_mode()
    def step(self, rows: list[Row]) -> tuple[list[int], list[float]]:
        """Sample one next token for every row; returns (token ids, logprobs), row-aligned."""
        width = max(len(r.tokens) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.tokens) :] = torch.tensor(row.tokens)
            mask[i, width - len(row.tokens) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1
        )
        return sample(out.logits[:, -1, :], [r.params for r in rows])

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

    @torch.no_grad()
    def apply_weights(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy checked tensors into the live parameters. Call only between steps."""
        for param, tensor in pairs:
            param.copy_(tensor)


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
