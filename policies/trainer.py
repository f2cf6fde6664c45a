"""The policy trainer: one GRPO / PPO-clip optimizer step on a batch of groups (synchronous torch).

The async learner runs ``step`` off the event loop. One optimizer step per batch means the
proximal ("old") policy of PPO is the current policy at the step, so its logprobs equal the new
ones numerically: we take them from the same forward pass, detached, instead of a second pass.
The ratio is then 1 and the clip inactive on this step, exactly as in on-policy PPO with one
epoch; off-policy drift between the engine (behavior) and the learner is corrected by the
truncated importance weight (``--use-tis``) against the engine's logprobs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgspec
import torch
from safetensors.torch import save_file

from buffers.types import Group, Sample
from policies.advantages import grpo_advantages
from policies.loss import kl_penalty, masked_mean, ppo_clip, tis_weight
from policies.model import load_causal_lm
from runtime.config import GrpoConfig, OptimizerConfig


class StepStats(msgspec.Struct):
    loss: float
    pg_clipfrac: float
    tis_mean: float
    tis_clipfrac: float
    kl: float
    entropy: float
    grad_norm: float
    n_tokens: int
    n_samples: int


@dataclasses.dataclass
class TokenBatch:
    """Right-padded sequences; per-token tensors are aligned with ``input_ids[:, 1:]``."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    mask: torch.Tensor  # (B, L-1) float: trained response tokens
    behavior_logp: torch.Tensor  # (B, L-1) float
    advantages: torch.Tensor  # (B, 1) float


def collate(samples: list[Sample], advantages: list[float], pad_id: int) -> TokenBatch:
    length = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    b = len(samples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    attn = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, length - 1))
    blp = torch.zeros((b, length - 1))
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids)
        attn[i, : p + r] = 1
        # position j of the shifted tensors predicts token j + 1, so response token k sits at p-1+k
        mask[i, p - 1 : p - 1 + r] = torch.tensor(s.loss_mask, dtype=torch.float)
        blp[i, p - 1 : p - 1 + r] = torch.tensor(s.behavior_logprobs, dtype=torch.float)
    adv = torch.tensor(advantages, dtype=torch.float).unsqueeze(1)
    return TokenBatch(ids, attn, mask, blp, adv)


class PolicyTrainer:
    def __init__(self, model_path: str | Path, *, grpo: GrpoConfig, optim: OptimizerConfig,
                 temperature: float, pad_id: int, threads: int = 1):
        torch.set_num_threads(threads)
        self.grpo, self.temperature, self.pad_id = grpo, max(temperature, 1e-6), pad_id
        self.model = load_causal_lm(model_path).train()
        self.ref = load_causal_lm(model_path).eval() if grpo.use_kl_loss else None
        self.clip_grad = optim.clip_grad
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay,
            betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
        )

    def _token_logp(self, model: torch.nn.Module, tb: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1].float()
        logp_all = torch.log_softmax(logits / self.temperature, dim=-1)
        logp = logp_all.gather(-1, tb.input_ids[:, 1:, None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    def step(self, batch: list[Group]) -> StepStats:
        """One optimizer step on ``batch``. Runs synchronously; call it off the event loop."""
        samples, advs = [], []
        for g in batch:
            a = grpo_advantages(g.rewards, [s.trainable for s in g.samples],
                                normalize_std=self.grpo.normalize_advantage_std)
            samples += g.samples
            advs += a
        tb = collate(samples, advs, self.pad_id)
        logp, entropy = self._token_logp(self.model, tb)
        old_logp = logp.detach()  # one step per batch: proximal policy == current (module doc)
        eps_high = self.grpo.eps_clip_high if self.grpo.eps_clip_high is not None else self.grpo.eps_clip
        pg, clipped = ppo_clip(logp, old_logp, tb.advantages, eps_low=self.grpo.eps_clip, eps_high=eps_high)
        if self.grpo.use_tis:
            w = tis_weight(old_logp, tb.behavior_logp, clip=self.grpo.tis_clip, clip_low=self.grpo.tis_clip_low)
        else:
            w = torch.ones_like(pg)
        loss = masked_mean(pg * w, tb.mask)
        kl = torch.zeros(())
        if self.ref is not None:
            with torch.no_grad():
                ref_logp, _ = self._token_logp(self.ref, tb)
            kl = masked_mean(kl_penalty(logp, ref_logp, self.grpo.kl_loss_type), tb.mask)
            loss = loss + self.grpo.kl_loss_coef * kl
        ent = masked_mean(entropy, tb.mask)
        if self.grpo.entropy_coef:
            loss = loss - self.grpo.entropy_coef * ent
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.clip_grad if self.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        raw_w = torch.exp(old_logp - tb.behavior_logp)
        return StepStats(
            loss=loss.item(), pg_clipfrac=float(masked_mean(clipped, tb.mask)),
            tis_mean=float(masked_mean(w, tb.mask)),
            tis_clipfrac=float(masked_mean((raw_w > self.grpo.tis_clip).float(), tb.mask)),
            kl=kl.item(), entropy=ent.item(), grad_norm=float(grad_norm),
            n_tokens=int(tb.mask.sum()), n_samples=len(samples),
        )

    def close(self) -> None:
        """Nothing to release in-process (``TrainerProcess`` has a process to stop)."""

    def save_weights(self, out_dir: Path) -> Path:
        """Write the current weights as one safetensors file engines can load in place."""
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: saved once, as HF checkpoints do
        save_file(state, str(out_dir / "model.safetensors"))
        return out_dir
