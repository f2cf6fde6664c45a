"""The policy trainer: one GRPO / PPO-clip optimizer step on a batch of groups (synchronous torch).

The async learner runs ``step`` off the event loop. One optimizer step per batch means the
proximal ("old") policy of PPO is the current policy at the step, so its logprobs equal the new
ones numerically: we take them from the same forward pass, detached, instead of a second pass.
The ratio is then 1 and the clip inactive on this step, exactly as in on-policy PPO with one
epoch. Off-policy drift between the engine (behavior) and the learner is corrected by AReaL's
decoupled objective: with ``--use-tis`` each token's loss is multiplied by the bounded importance
weight pi_prox / pi_behavior of ``policies.correction`` (level, bound and staleness caps from
GRPO config), which needs each token's staleness: the learner passes its version to ``step``.

A step at scale (issue 14): the batch is split into micro-batches by ``policies.microbatch``
(token budget or sample count); each is packed into one row without padding
(``policies.packing``, attention kept inside each sequence by ``policies.packed_attention``);
only trained positions reach the output head, whose log-probs and entropies are computed in
chunks (``policies.logprobs``), so no (tokens x vocab) tensor exists. Gradients accumulate over
the micro-batches and every per-token term is divided by the whole step's trained-token count,
so the update is that of the whole batch at once whatever the micro-batching (float64 tests).

Data-parallel contract (for a host running N ranks, each with its own ``PolicyTrainer``):
- every rank receives the whole step's batch and computes the same plan; ``rank`` trains only its
  own micro-batches (``microbatch.plan``: the same number on every rank, balanced by tokens);
- every normaliser (the trained-token count, advantages of each group) comes from the WHOLE
  batch, so the sum over ranks of each rank's gradient is the single-rank gradient: a host
  all-reduces gradients by SUM (FSDP's reduce-scatter averages: scale by ``world_size``);
- ``accumulate`` returns the rank's ``StepSums`` (a float64 vector of partial sums); the host
  all-reduces its ``values`` by SUM and calls ``apply``, which clips the (reduced) gradients,
  steps the optimizer and turns the sums into the ``StepStats`` of the whole batch.
``step`` is ``accumulate`` then ``apply`` on one rank.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import msgspec
import torch
from safetensors.torch import save_file

from buffers.types import Group, Sample
from policies import fsdp, microbatch, weight_ipc, weight_sync
from policies import lora as adapters
from policies.advantages import grpo_advantages
from policies.logprobs import token_logprobs
from policies.lr_schedule import LrSchedule
from policies.model import load_causal_lm
from policies.objective import Objective, Optimizer, policy_terms
from policies.packed_attention import use_packed_attention
from policies.packing import Packed, TokenBatch, collate, pack
from policies.sft import token_weights
from policies.step_stats import StepStats, StepSums

__all__ = ["PolicyTrainer", "StepStats", "StepSums", "TokenBatch", "collate"]

log = logging.getLogger(__name__)


class PolicyTrainer:
    """``device``: "cpu" or "cuda" (the process's first visible GPU, which placement assigns). On a
    GPU the fp32 master weights train under bf16 autocast (the engines serve bf16).
    ``version``: the policy version of the loaded weights; each step advances it, so a weight
    broadcast knows which version it sends. ``ref_path``: the KL reference's weights (default: the
    policy's). ``temperature``: the engines' sampling temperature,
    applied to the logits as the engine applies it (greedy, <= 0, scores plain logits).
    Micro-batching (``policies.microbatch``): ``max_tokens_per_gpu`` (Miles's dynamic batch size;
    None: off) or else ``micro_batch_size`` samples (None: the whole step at once).
    ``recompute_activations``: recompute each decoder layer in backward (HF checkpointing).
    ``rank`` / ``world_size``: this trainer's share of each step (module doc); ``dist_url``: the
    rendezvous of the ranks' group, which makes this trainer an FSDP2 rank (policies/fsdp.py)."""

    def __init__(self, model_path: str | Path, *, grpo: Objective, optim: Optimizer, temperature: float,
                 pad_id: int, threads: int = 1, device: str = "cpu", version: int = 0,
                 micro_batch_size: int | None = None, max_tokens_per_gpu: int | None = None,
                 recompute_activations: bool = False, rank: int = 0, world_size: int = 1, dist_url: str | None = None,
                 ref_path: str | Path | None = None, lora: adapters.LoraSpec | None = None):
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index or 0)
        self.grpo, self.pad_id = grpo, pad_id
        self.temperature = temperature if temperature > 0 else 1.0
        self.version = version
        self.micro_batch_size, self.max_tokens = micro_batch_size, max_tokens_per_gpu
        self.rank, self.world_size = rank, world_size
        self._warned_over_budget = False
        self.model = self._load(model_path).train()
        recompute(self.model, recompute_activations)
        self.lora = lora
        if lora is not None:  # only the adapter trains (policies/lora.py)
            self.model = adapters.wrap(self.model, lora)
        adapter_bytes, self.full_bytes = adapters.sync_bytes(self.model)
        self.sync_bytes = adapter_bytes if lora is not None else self.full_bytes
        if dist_url is not None:  # one rank of a data-parallel group at this rendezvous (policies/fsdp.py);
            # without one, a rank computes its share alone (what the float64 tests of the split check)
            fsdp.join(rank=rank, world_size=world_size, url=dist_url, device=self.device)
            fsdp.shard(self.model, self.device)
        # the KL anchor (--ref-load); default: the weights it starts from
        self.ref = self._load(ref_path or model_path).eval() if grpo.use_kl_loss else None
        self._sender: weight_sync.Sender | None = None  # the weight-update group, once joined
        self._weight_store = weight_sync.HostedStore()  # its rendezvous, rank 0 of the group
        self._exporter: weight_ipc.Exporter | None = None  # the IPC buffer, from the first ipc sync on
        self.clip_grad = optim.clip_grad
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=optim.lr, weight_decay=optim.weight_decay,
            betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
        )
        self.lr_schedule = LrSchedule(lr=optim.lr, min_lr=optim.min_lr, style=optim.lr_decay_style,
                                      warmup_iters=optim.lr_warmup_iters, decay_iters=optim.lr_decay_iters)

    def _load(self, path: str | Path) -> torch.nn.Module:
        model = load_causal_lm(path).to(self.device)
        use_packed_attention(model)
        return model

    @property
    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _logprobs(self, model: torch.nn.Module, packed: Packed, shape: torch.Size, *,
                  temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies at ``packed``'s scored positions, as (B, L-1) padded tensors;
        ``temperature``: the sampling temperature's by default."""
        with self._autocast:
            hidden = _decoder(model)(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                                     cu_seq_lens_q=packed.cu_seqlens, max_length_q=packed.max_len).last_hidden_state
        head = _head(model)  # after the forward: a sharded model's root gathered it there (policies/fsdp.py)
        dtype = torch.bfloat16 if self.device.type == "cuda" else head.dtype
        logp, entropy = token_logprobs(hidden[0, packed.src], head, packed.targets,
                                       temperature=temperature or self.temperature, compute_dtype=dtype)
        return packed.scatter(logp, shape), packed.scatter(entropy, shape)

    @torch.no_grad()
    def token_logprobs(self, tb: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's log-probs and entropies of every predicted token of ``tb`` ((B, L-1), 0 on padding)."""
        valid = tb.attention_mask[:, 1:].bool()
        logp, entropy = self._logprobs(self.model, pack(tb, positions=valid).to(self.device), tb.mask.shape)
        return logp.cpu(), entropy.cpu()

    def step(self, batch: list[Group], version: int) -> StepStats:
        """One optimizer step on ``batch`` by the policy at ``version`` (the learner's version, which
        dates each token's staleness). Runs synchronously; call it off the event loop."""
        sums = self.accumulate(batch, version)
        if fsdp.is_sharded(self.model):  # every rank's figures, so each applies (and reports) the whole step's
            fsdp.all_reduce_sum(sums.values)
        return self.apply(sums, version)

    def accumulate(self, batch: list[Group], version: int) -> StepSums:
        """Forward and backward of this rank's micro-batches of ``batch``; the gradients are left in
        the parameters' ``.grad`` (zeroed first), the partial sums returned (module doc)."""
        sft = self.grpo.loss_type == "sft_loss"
        if sft:  # cross-entropy on the trained (assistant) tokens (policies.sft); no advantages
            samples = [s for g in batch for s in g.samples if s.trainable]
            advs = [0.0] * len(samples)
        else:
            samples, advs = _with_advantages(batch, self.grpo)
        # every token's weight in the loss, from the WHOLE step's counts: the policy loss is the mean
        # over trained tokens; SFT's is that or (--calculate-per-token-loss off) the mean of sample means
        weigh = functools.partial(token_weights, per_token=not sft or self.grpo.calculate_per_token_loss,
                                  step_tokens=sum(sum(s.loss_mask) for s in samples),
                                  step_samples=sum(1 for s in samples if any(s.loss_mask)))
        plan = microbatch.plan([len(s.prompt_ids) + len(s.response_ids) for s in samples],
                               max_tokens=self.max_tokens, micro_batch_size=self.micro_batch_size,
                               world_size=self.world_size)
        if plan.over_budget and not self._warned_over_budget:
            self._warned_over_budget = True
            log.warning("%d samples are longer than --max-tokens-per-gpu %d: each trains alone in its micro-batch "
                        "(said once per run)", plan.over_budget, self.max_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        sums = StepSums(device=self.device)
        for idx in plan.ranks[self.rank]:
            if not idx:
                self._empty_pass()
                continue
            tb = collate([samples[i] for i in idx], [advs[i] for i in idx], self.pad_id, version=version)
            sums += self._micro_batch(tb.to(self.device), pack(tb).to(self.device), weigh, sft=sft)
        return sums

    def apply(self, sums: StepSums, version: int) -> StepStats:
        """Clip the accumulated gradients, step, and advance to ``version + 1``; ``sums``: every rank's."""
        max_norm = self.clip_grad if self.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        lr = self.lr_schedule.apply(self.optimizer, version)
        self.optimizer.step()
        self.version = version + 1
        return sums.stats(float(fsdp.local(grad_norm)), lr=lr, sync_bytes=self.sync_bytes, full_bytes=self.full_bytes)

    def _micro_batch(self, tb: TokenBatch, packed: Packed, weigh: Callable[[torch.Tensor], torch.Tensor], *,
                     sft: bool) -> StepSums:
        """Backward of this micro-batch's share of the step's loss; returns its partial sums."""
        logp, entropy = self._logprobs(self.model, packed, tb.mask.shape, temperature=1.0 if sft else None)
        sums = StepSums(device=self.device)
        m = tb.mask
        if sft:
            per_token = -logp
            sums.add(weight=m.sum())  # no importance weight: 1 on every token
        else:
            per_token = self._policy_terms(logp, entropy, tb, packed, sums)
        loss = (per_token * weigh(m)).sum()  # this micro-batch's share of the whole step's loss
        loss.backward()
        sums.add(loss=loss.detach(), entropy=(entropy.detach() * m).sum(), tokens=m.sum(), samples=m.shape[0])
        return sums

    def _policy_terms(self, logp: torch.Tensor, entropy: torch.Tensor, tb: TokenBatch, packed: Packed,
                      sums: StepSums) -> torch.Tensor:
        """The PPO-clip loss per token (importance-weighted, KL, entropy bonus); adds its sums."""
        m, ref_logp = tb.mask, None
        if self.ref is not None:
            with torch.no_grad():
                ref_logp, _ = self._logprobs(self.ref, packed, m.shape)
        t = policy_terms(self.grpo, logp, entropy, tb, ref_logp=ref_logp)
        if t.kl is not None:
            sums.add(kl=(t.kl.detach() * m).sum())
        sums.add(clipped=(t.clipped * m).sum(), weight=(t.weight * m).sum(), bounded=(t.bounded * m).sum())
        sums.add_buckets(t.weight, t.bounded, tb.staleness, m)
        return t.per_token

    def _empty_pass(self) -> None:
        """A micro-batch with no samples (more micro-batches than samples): a forward and backward
        that changes no gradient, so a data-parallel rank's collectives still pair with the others'."""
        ids = torch.full((1, 1), self.pad_id, device=self.device)
        with self._autocast:
            hidden = _decoder(self.model)(input_ids=ids, use_cache=False).last_hidden_state
        (hidden.sum() * 0 + _head(self.model).sum() * 0).backward()

    # -- the collective weight transport (policies/weight_sync.py): rank 0 of the update group --
    def weight_group_endpoint(self, host: str = "127.0.0.1") -> tuple[str, int]:
        """Where this trainer hosts the group's rendezvous: its address and the port of a store
        already listening there (weight_sync.HostedStore)."""
        return self._weight_store.endpoint(host)

    def init_weight_group(self, master_address: str, master_port: int, world_size: int, backend: str,
                          group_name: str, timeout_s: float, dtype: str, bucket_bytes: int) -> list[bytes]:
        """Join as rank 0 (blocks until the engines have joined); returns the bucket plan,
        msgpack-encoded ``BucketMeta``s, that the engines are told bucket by bucket. Of a
        data-parallel group only rank 0 joins; every rank gathers the buckets it sends."""
        self.destroy_weight_group()
        pg = weight_sync.new_group(backend=backend, master_address=master_address, master_port=master_port, rank=0,
                                   world_size=world_size, group_name=group_name, timeout_s=timeout_s,
                                   store=self._weight_store.take(master_port)) if self.rank == 0 else None
        sender = fsdp.GatheringSender if fsdp.is_sharded(self.model) else weight_sync.Sender
        self._sender = sender(pg, self._served_tensors(), dtype=weight_sync.dtype_of(dtype), bucket_bytes=bucket_bytes)
        return [msgspec.msgpack.encode(m) for m in self._sender.plan]

    def broadcast_weights(self) -> int:
        """Send every bucket to the group; returns the version sent."""
        if self._sender is None:
            raise RuntimeError("broadcast_weights before init_weight_group")
        self._sender.send()
        return self.version

    def destroy_weight_group(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    # -- the same-GPU transport (policies/weight_ipc.py): engines map this trainer's buffer -----
    def ipc_weights(self, dtype: str) -> bytes:
        """The current weights as SGLang's serialized flattened bucket (one CUDA IPC handle), in
        a ``weight_ipc.Export`` with their version, msgpack-encoded.

        Ordering: the buffer is this trainer's for life (allocated at the first call, as the
        collective sender keeps its send buffers), so the handle stays valid after we return, and
        only the next ``ipc_weights`` writes it: an optimizer step changes the fp32 weights, not
        the bf16 copy. The driver makes that next call only after every engine answered this
        sync, and an engine answers once its copy out of the buffer has run, so the learner may
        step while the engines load without any engine reading a half-written buffer."""
        if fsdp.is_sharded(self.model):  # (runtime.config refuses ipc with more than one learner rank)
            raise RuntimeError("ipc weights need one learner rank: the engines map one trainer's full weights")
        if self._exporter is None or self._exporter.meta.dtypes[0] != dtype:
            self._exporter = weight_ipc.Exporter(self._served_tensors(), dtype=weight_sync.dtype_of(dtype))
        export = weight_ipc.Export(self.version, self._exporter.meta, self._exporter.serialize())
        return msgspec.msgpack.encode(export)

    def _served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """What engines load: the state dict, a tied output head once (as HF checkpoints save it)."""
        if self.lora is not None:  # refused at start (runtime/config/checks.py): adapters travel as files
            raise RuntimeError("a LoRA policy publishes its adapter as files, not through a collective transport")
        state = self.model.state_dict()
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return list(state.items())

    def close(self) -> None:
        """Nothing to release in-process (``TrainerProcess`` has a process to stop)."""

    def save_weights(self, out_dir: Path) -> Path:
        """Write the current weights as one safetensors file engines can load in place; with LoRA,
        the adapter alone, in peft's format (engines load it through /load_lora_adapter). Of a
        data-parallel group rank 0 writes the file, every rank takes part in gathering it."""
        if self.lora is not None:
            return adapters.save_adapter(self.model, out_dir)
        state = fsdp.full_cpu(self._served_tensors(), keep=self.rank == 0)
        if self.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file(state, str(out_dir / "model.safetensors"))
        return out_dir

    def save_checkpoint(self, out_dir: Path) -> None:
        """What a resume needs from the trainer: the policy as an HF directory (``model/``, loadable
        by transformers), the KL reference when there is one (``reference/``: it must stay the
        initial policy, not the resumed one), the optimizer state and torch's RNG (``trainer.pt``).
        With LoRA also ``adapter/`` and ``base/`` (``policies.lora.save_checkpoint``). Data-parallel
        ranks: rank 0 writes the policy from gathered full tensors, and the optimizer's shards go to
        ``optimizer/`` (torch.distributed.checkpoint) instead of ``trainer.pt``."""
        sharded = fsdp.is_sharded(self.model)
        if sharded:
            fsdp.save_pretrained(self.model, out_dir / "model", rank=self.rank)
            fsdp.save_optimizer(self.model, self.optimizer, out_dir / "optimizer")
        elif self.lora is not None:
            adapters.save_checkpoint(self.model, out_dir)
        else:
            self.model.save_pretrained(out_dir / "model")
        if self.rank == 0:
            if self.ref is not None:
                self.ref.save_pretrained(out_dir / "reference")
            state = {} if sharded else {"optimizer": self.optimizer.state_dict()}
            state.update(rng=torch.get_rng_state(), lr_schedule=msgspec.to_builtins(self.lr_schedule))
            torch.save(state, out_dir / "trainer.pt")

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        """Restore the optimizer, RNG and reference of ``save_checkpoint`` (the policy itself was
        loaded from ``ckpt_dir/model`` when this trainer was built; with LoRA from ``ckpt_dir/base``,
        and its adapter is restored here)."""
        if self.lora is not None:
            adapters.load_adapter(self.model, ckpt_dir / "adapter")
        state = torch.load(ckpt_dir / "trainer.pt", weights_only=True)
        if fsdp.is_sharded(self.model):
            fsdp.load_optimizer(self.model, self.optimizer, ckpt_dir / "optimizer")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if self.ref is not None and (ckpt_dir / "reference").is_dir():
            self.ref = self._load(ckpt_dir / "reference").eval()


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """Under a peft wrapper, the model it wraps (the LoRA layers are inside its decoder)."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (final hidden states, no head); a sharded model's FSDP root."""
    return fsdp.trunk(_inner(model))


def _head(model: torch.nn.Module) -> torch.Tensor:
    """The output head's weight."""
    return _inner(model).get_output_embeddings().weight


def recompute(model: torch.nn.Module, on: bool) -> None:
    """Recompute each decoder layer's activations in backward (transformers' checkpointing), or not."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed gradient_checkpointing_*
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw) if on else \
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_disable()


def _with_advantages(batch: list[Group], grpo: Objective) -> tuple[list[Sample], list[float]]:
    """Every sample of ``batch`` and its advantage (computed per group, from the whole group)."""
    samples: list[Sample] = []
    advs: list[float] = []
    for g in batch:
        advs += grpo_advantages(g.rewards, [s.trainable for s in g.samples], normalize_std=grpo.normalize_advantage_std)
        samples += g.samples
    return samples, advs
