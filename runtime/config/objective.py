"""GRPO, OPTIMIZER and LORA: what the learner optimizes, and how."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from runtime.config.fields import NonNeg, NonNegF, Pos, PosF, Section


class GrpoConfig(Section):
    """GRPO: the RL objective."""

    # sft_loss: supervised fine-tuning on --prompt-data messages (assistant tokens only); no engines
    loss_type: Literal["policy_loss", "sft_loss"] = "policy_loss"
    calculate_per_token_loss: bool = False  # sft_loss: mean over the step's tokens; off: each sample's mean, averaged
    advantage_estimator: Literal["grpo"] = "grpo"
    normalize_advantage_std: bool = True  # divide by the group's std (Dr.GRPO turns this off)
    eps_clip: PosF = 0.2
    eps_clip_high: PosF | None = None  # default: eps_clip
    use_tis: bool = False  # weight each token's loss by pi_prox / pi_behavior, bounded (decoupled PPO)
    tis_clip: PosF = 2.0  # upper bound of the weight
    tis_clip_low: NonNegF = 0.0  # lower bound of the weight
    tis_level: Literal["token", "sequence", "geometric"] = "token"  # per token; product per sequence; its geo mean
    tis_mode: Literal["truncate", "mask"] = "truncate"  # out of bounds: clamp (TIS) or weight 0 (MIS/icepop)
    # Non-increasing (checked): staler tokens are further off-policy, so they get the tighter cap.
    tis_clip_by_staleness: list[float] = []  # cap by staleness 0,1,.. (last: older) e.g. 2,1.5,1.2; replaces --tis-clip
    use_kl_loss: bool = False
    kl_loss_coef: NonNegF = 0.0
    kl_loss_type: Literal["k1", "k2", "low_var_kl"] = "low_var_kl"
    entropy_coef: NonNegF = 0.0


class OptimizerConfig(Section):
    """OPTIMIZER."""

    optimizer: Literal["adam"] = "adam"
    lr: PosF = 1e-3  # the peak learning rate
    min_lr: NonNegF = 0.0  # where --lr-decay-style linear/cosine ends
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"  # after the warm-up (policies/lr_schedule.py)
    lr_warmup_iters: NonNeg = 0  # optimizer steps of linear warm-up from 0
    lr_decay_iters: Pos | None = None  # the step the decay ends at; default: the run's last step
    weight_decay: NonNegF = 0.0
    adam_beta1: Annotated[float, Meta(ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, Meta(ge=0, lt=1)] = 0.999
    adam_eps: PosF = 1e-8
    clip_grad: NonNegF = 1.0  # 0: off


class LoraConfig(Section):
    """LORA: train a LoRA adapter (peft) instead of every weight; engines load only the adapter."""

    lora_rank: NonNeg = 0  # 0: full fine-tuning
    lora_alpha: PosF = 32.0  # the adapter's scale is alpha / rank
    lora_dropout: Annotated[float, Meta(ge=0, lt=1)] = 0.0
    target_modules: list[str] = []  # module names to adapt, e.g. q_proj,v_proj; empty: every linear layer

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0
