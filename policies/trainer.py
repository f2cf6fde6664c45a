"""The policy trainer: one GRPO / PPO-clip optimizer step on a batch of groups (synchronous torch).

The async learner runs ``step`` off the event loop. One optimizer step per batch means the
proximal ("old") policy of PPO is the current policy at the step, so its logprobs equal the new
ones numerically: we take them from the same forward pass, detached, instead of a second pass.
The ratio is then 1 and the clip inactive on this step, exactly as in on-policy PPO with one
epoch. Off-policy drift between the engine (behavior) and the learner is corrected by AReaL's
decoupled objective: with ``--use-tis`` each token's loss is multiplied by the bounded importance
weight pi_prox / pi_behavior of ``policies.correction`` (level, bound and staleness caps from
GRPO config), which needs each token's staleness: the learner passes its version to ``step``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgspec
import torch
from safetensors.torch import save_file

from buffers.types import Group, Sample
from policies import lora as adapters
from policies import weight_ipc, weight_sync
from policies.advantages import grpo_advantages
from policies.correction import bucket_stats, importance_weight
from policies.lr_schedule import LrSchedule
from policies.loss import kl_penalty, masked_mean, ppo_clip
from policies.model import load_causal_lm
from policies.sft import sft_loss
from runtime.config import GrpoConfig, OptimizerConfig


class StepStats(msgspec.Struct):
    """One step's figures. The ``tis_*`` figures and ``correction`` describe the bounded importance
    weight as configured whether or not ``--use-tis`` applies it, so a run can see how far off
    policy its data is before turning the correction on."""

    loss: float
    pg_clipfrac: float
    tis_mean: float  # mean bounded weight over trained tokens
    tis_clipfrac: float  # fraction of trained tokens the bound truncated or masked
    kl: float
    entropy: float
    grad_norm: float
    n_tokens: int
    n_samples: int
    lr: float = 0.0  # the learning rate of this step (policies/lr_schedule.py)
    sync_bytes: int = 0  # what one weight sync sends: the adapter with LoRA, else every weight
    full_bytes: int = 0  # what a sync of every weight would send (beside sync_bytes)
    # per staleness bucket, keys like "s0/is_mean" (policies.correction.bucket_stats)
    correction: dict[str, float] = msgspec.field(default_factory=dict)


@dataclasses.dataclass
class TokenBatch:
    """Right-padded sequences; per-token tensors are aligned with ``input_ids[:, 1:]``."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    mask: torch.Tensor  # (B, L-1) float: trained response tokens
    behavior_logp: torch.Tensor  # (B, L-1) float
    staleness: torch.Tensor  # (B, L-1) long: learner version - token version; 0 off the response
    advantages: torch.Tensor  # (B, 1) float

    def to(self, device: torch.device) -> TokenBatch:
        if device.type == "cpu":
            return self
        return TokenBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def collate(samples: list[Sample], advantages: list[float], pad_id: int, *, version: int) -> TokenBatch:
    """Pad ``samples`` into one batch trained at policy ``version`` (which dates each token)."""
    length = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    b = len(samples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    attn = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, length - 1))
    blp = torch.zeros((b, length - 1))
    stale = torch.zeros((b, length - 1), dtype=torch.long)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids)
        attn[i, : p + r] = 1
        # position j of the shifted tensors predicts token j + 1, so response token k sits at p-1+k
        mask[i, p - 1 : p - 1 + r] = torch.tensor(s.loss_mask, dtype=torch.float)
        blp[i, p - 1 : p - 1 + r] = torch.tensor(s.behavior_logprobs, dtype=torch.float)
        stale[i, p - 1 : p - 1 + r] = version - torch.tensor(s.token_versions, dtype=torch.long)
    if (stale < 0).any():  # a token newer than the policy training on it: versions are broken
        raise ValueError(f"a token's version is above the training version {version}")
    adv = torch.tensor(advantages, dtype=torch.float).unsqueeze(1)
    return TokenBatch(ids, attn, mask, blp, stale, adv)


class PolicyTrainer:
    """``device``: "cpu" or "cuda" (the process's first visible GPU, which placement assigns). On a
    GPU the fp32 master weights train under bf16 autocast (the engines serve bf16).
    ``version``: the policy version of the loaded weights; each step advances it, so a weight
    broadcast knows which version it sends. ``ref_path``: the KL reference's weights."""

    def __init__(self, model_path: str | Path, *, grpo: GrpoConfig, optim: OptimizerConfig,
                 temperature: float, pad_id: int, threads: int = 1, device: str = "cpu", version: int = 0,
                 ref_path: str | Path | None = None, lora: adapters.LoraSpec | None = None):
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index or 0)
        self.grpo, self.temperature, self.pad_id = grpo, max(temperature, 1e-6), pad_id
        self.version = version
        self.model = load_causal_lm(model_path).to(self.device).train()
        self.lora = lora
        if lora is not None:  # only the adapter trains (policies/lora.py)
            self.model = adapters.wrap(self.model, lora)
        adapter_bytes, self.full_bytes = adapters.sync_bytes(self.model)
        self.sync_bytes = adapter_bytes if lora is not None else self.full_bytes
        # the KL anchor (--ref-load); default: the weights it starts from
        self.ref = load_causal_lm(ref_path or model_path).to(self.device).eval() if grpo.use_kl_loss else None
        self._sender: weight_sync.Sender | None = None  # the weight-update group, once joined
        self._exporter: weight_ipc.Exporter | None = None  # the IPC buffer, from the first ipc sync on
        self.clip_grad = optim.clip_grad
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=optim.lr, weight_decay=optim.weight_decay,
            betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
        )
        self.lr_schedule = LrSchedule(lr=optim.lr, min_lr=optim.min_lr, style=optim.lr_decay_style,
                                      warmup_iters=optim.lr_warmup_iters, decay_iters=optim.lr_decay_iters)

    def _token_logp(self, model: torch.nn.Module, tb: TokenBatch, temperature: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask)
        logits = out.logits[:, :-1].float()
        logp_all = torch.log_softmax(logits / (temperature or self.temperature), dim=-1)
        logp = logp_all.gather(-1, tb.input_ids[:, 1:, None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    def step(self, batch: list[Group], version: int) -> StepStats:
        """One optimizer step on ``batch`` by the policy at ``version`` (the learner's version, which
        dates each token's staleness). Runs synchronously; call it off the event loop."""
        if self.grpo.loss_type == "sft_loss":
            return self._sft_step(batch, version)
        samples, advs = [], []
        for g in batch:
            a = grpo_advantages(g.rewards, [s.trainable for s in g.samples],
                                normalize_std=self.grpo.normalize_advantage_std)
            samples += g.samples
            advs += a
        tb = collate(samples, advs, self.pad_id, version=version).to(self.device)
        logp, entropy = self._token_logp(self.model, tb)
        old_logp = logp.detach()  # one step per batch: proximal policy == current (module doc)
        eps_high = self.grpo.eps_clip_high if self.grpo.eps_clip_high is not None else self.grpo.eps_clip
        pg, clipped = ppo_clip(logp, old_logp, tb.advantages, eps_low=self.grpo.eps_clip, eps_high=eps_high)
        w, bounded = self._importance_weight(old_logp, tb)
        loss = masked_mean(pg * w if self.grpo.use_tis else pg, tb.mask)
        kl = torch.zeros(())
        if self.ref is not None:
            with torch.no_grad():
                ref_logp, _ = self._token_logp(self.ref, tb)
            kl = masked_mean(kl_penalty(logp, ref_logp, self.grpo.kl_loss_type), tb.mask)
            loss = loss + self.grpo.kl_loss_coef * kl
        ent = masked_mean(entropy, tb.mask)
        if self.grpo.entropy_coef:
            loss = loss - self.grpo.entropy_coef * ent
        grad_norm, lr = self._update(loss, version)
        return StepStats(
            loss=loss.item(), pg_clipfrac=float(masked_mean(clipped, tb.mask)),
            tis_mean=float(masked_mean(w, tb.mask)), tis_clipfrac=float(masked_mean(bounded.float(), tb.mask)),
            kl=kl.item(), entropy=ent.item(), grad_norm=float(grad_norm), lr=lr,
            n_tokens=int(tb.mask.sum()), n_samples=len(samples),
            sync_bytes=self.sync_bytes, full_bytes=self.full_bytes,
            correction=bucket_stats(w, bounded, tb.staleness, tb.mask),
        )

    def _update(self, loss: torch.Tensor, version: int) -> tuple[float, float]:
        """Backward, clip, step at the scheduled rate; the policy is then at ``version + 1``."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.clip_grad if self.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        lr = self.lr_schedule.apply(self.optimizer, version)
        self.optimizer.step()
        self.version = version + 1
        return float(grad_norm), lr

    def _sft_step(self, batch: list[Group], version: int) -> StepStats:
        """Cross-entropy on the trained (assistant) tokens (``policies.sft``); temperature 1."""
        samples = [s for g in batch for s in g.samples if s.trainable]
        tb = collate(samples, [0.0] * len(samples), self.pad_id, version=version).to(self.device)
        logp, entropy = self._token_logp(self.model, tb, temperature=1.0)
        loss = sft_loss(logp, tb.mask, per_token=self.grpo.calculate_per_token_loss)
        grad_norm, lr = self._update(loss, version)
        return StepStats(loss=loss.item(), pg_clipfrac=0.0, tis_mean=1.0, tis_clipfrac=0.0, kl=0.0,
                         entropy=float(masked_mean(entropy.detach(), tb.mask)), grad_norm=grad_norm, lr=lr,
                         n_tokens=int(tb.mask.sum()), n_samples=len(samples), sync_bytes=self.sync_bytes,
                         full_bytes=self.full_bytes)

    def _importance_weight(self, prox_logp: torch.Tensor, tb: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.grpo
        return importance_weight(prox_logp, tb.behavior_logp, tb.mask, tb.staleness, level=g.tis_level,
                                 mode=g.tis_mode, low=g.tis_clip_low, high=g.tis_clip, caps=g.tis_clip_by_staleness)

    # -- the collective weight transport (policies/weight_sync.py): rank 0 of the update group --
    def weight_group_endpoint(self, host: str = "127.0.0.1") -> tuple[str, int]:
        """Where this trainer will host the group's rendezvous: its address and a free port."""
        return host, weight_sync.free_port(host)

    def init_weight_group(self, master_address: str, master_port: int, world_size: int, backend: str,
                          group_name: str, timeout_s: float, dtype: str, bucket_bytes: int) -> list[bytes]:
        """Join as rank 0 (blocks until the engines have joined); returns the bucket plan,
        msgpack-encoded ``BucketMeta``s, that the engines are told bucket by bucket."""
        self.destroy_weight_group()
        self._sender = weight_sync.Sender(
            weight_sync.new_group(backend=backend, master_address=master_address, master_port=master_port, rank=0,
                                  world_size=world_size, group_name=group_name, timeout_s=timeout_s),
            self._served_tensors(), dtype=weight_sync.dtype_of(dtype), bucket_bytes=bucket_bytes)
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
        if self._exporter is None or self._exporter.meta.dtypes[0] != dtype:
            self._exporter = weight_ipc.Exporter(self._served_tensors(), dtype=weight_sync.dtype_of(dtype))
        export = weight_ipc.Export(self.version, self._exporter.meta, self._exporter.serialize())
        return msgspec.msgpack.encode(export)

    def _served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """What engines load: the state dict, a tied output head once (as HF checkpoints save it)."""
        if self.lora is not None:  # refused at start (runtime/config.py): adapters travel as files
            raise RuntimeError("a LoRA policy publishes its adapter as files, not through a collective transport")
        state = self.model.state_dict()
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return list(state.items())

    def close(self) -> None:
        """Nothing to release in-process (``TrainerProcess`` has a process to stop)."""

    def save_weights(self, out_dir: Path) -> Path:
        """Write the current weights as one safetensors file engines can load in place; with LoRA,
        the adapter alone, in peft's format (engines load it through /load_lora_adapter)."""
        if self.lora is not None:
            return adapters.save_adapter(self.model, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self._served_tensors()}
        save_file(state, str(out_dir / "model.safetensors"))
        return out_dir

    def save_checkpoint(self, out_dir: Path) -> None:
        """What a resume needs from the trainer: the policy as an HF directory (``model/``, loadable
        by transformers), the KL reference when there is one (``reference/``: it must stay the
        initial policy, not the resumed one), the optimizer state and torch's RNG (``trainer.pt``).
        With LoRA also ``adapter/`` and ``base/`` (``policies.lora.save_checkpoint``)."""
        if self.lora is not None:
            adapters.save_checkpoint(self.model, out_dir)
        else:
            self.model.save_pretrained(out_dir / "model")
        if self.ref is not None:
            self.ref.save_pretrained(out_dir / "reference")
        torch.save({"optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
                    "lr_schedule": msgspec.to_builtins(self.lr_schedule)}, out_dir / "trainer.pt")

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        """Restore the optimizer, RNG and reference of ``save_checkpoint`` (the policy itself was
        loaded from ``ckpt_dir/model`` when this trainer was built; with LoRA from ``ckpt_dir/base``,
        and its adapter is restored here)."""
        if self.lora is not None:
            adapters.load_adapter(self.model, ckpt_dir / "adapter")
        state = torch.load(ckpt_dir / "trainer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if self.ref is not None and (ckpt_dir / "reference").is_dir():
            self.ref = load_causal_lm(ckpt_dir / "reference").eval()
