"""A micro-batch's samples as the model sees them (one packed row) and as the loss sees them (padded).

The model runs on one row holding every sample back to back, with per-sample positions and the
cumulative sequence starts that ``policies.packed_attention`` needs: no padding is computed. The
loss arithmetic (PPO ratio, importance weight per sequence, KL) runs on small right-padded
(samples, tokens) tensors of ``TokenBatch``, which cost a few floats per token, not a vocabulary.
``Packed`` maps between the two: its ``rows``/``cols`` are the trained positions in the padded
layout and ``src`` the packed positions whose hidden states predict them.
"""

from __future__ import annotations

import dataclasses

import torch

from buffers.types import Sample


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


@dataclasses.dataclass
class Packed:
    """``tb``'s sequences in one row, and where its trained positions are in both layouts."""

    input_ids: torch.Tensor  # (1, T) long: every sequence, unpadded, back to back
    position_ids: torch.Tensor  # (1, T) long: 0 .. len-1 within each sequence
    cu_seqlens: torch.Tensor  # (B+1,) int32: sequence starts in the row, then T
    max_len: int  # the longest sequence
    rows: torch.Tensor  # (K,) long: padded row of each trained position
    cols: torch.Tensor  # (K,) long: padded column (aligned with input_ids[:, 1:])
    src: torch.Tensor  # (K,) long: the packed position whose hidden state predicts it
    targets: torch.Tensor  # (K,) long: the token it predicts

    def to(self, device: torch.device) -> Packed:
        if device.type == "cpu":
            return self
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Packed(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def scatter(self, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Per-trained-position ``values`` (K,) into a zero (B, L-1) tensor (differentiable)."""
        return values.new_zeros(shape).index_put((self.rows, self.cols), values)


def pack(tb: TokenBatch, *, positions: torch.Tensor | None = None) -> Packed:
    """Pack ``tb`` (on CPU). ``positions``: a (B, L-1) bool of the positions to score, default the
    trained ones (``tb.mask > 0``); only those reach the output head."""
    lengths = tb.attention_mask.sum(1)
    keep = tb.attention_mask.bool()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    pos = torch.arange(tb.input_ids.shape[1]).expand_as(tb.input_ids)[keep]
    rows, cols = (tb.mask > 0 if positions is None else positions).nonzero(as_tuple=True)
    return Packed(
        input_ids=tb.input_ids[keep][None], position_ids=pos[None], cu_seqlens=cu, max_len=int(lengths.max()),
        rows=rows, cols=cols, src=cu[rows].long() + cols, targets=tb.input_ids[rows, cols + 1],
    )
