"""Causal attention over packed sequences: several samples in one row, none attending across another.

``use_packed_attention(model)`` switches a transformers model to the attention function
registered here as ``"packed_varlen"``; the trainer then calls the model with one packed row,
per-sequence ``position_ids`` and ``cu_seq_lens_q`` (the cumulative sequence starts, int32, as
flash-attn's varlen API takes them) plus ``max_length_q``, which transformers passes through to
every attention call as keyword arguments.

Exact on every device, and memory-sane: no (tokens x tokens) mask is ever built.
- On a GPU with torch's ``varlen_attn`` (flash attention over cumulative lengths, torch >= 2.9):
  one kernel call per layer; its cost is the sum of each sequence's own causal attention.
- Otherwise (CPU, float64 tests, older torch): one ``scaled_dot_product_attention`` call per
  sequence with ``is_causal=True``, which runs flash/efficient kernels on a GPU and the exact math
  kernel on a CPU. Why not transformers' own packed-sequence support: with SDPA or eager it builds
  a block-diagonal (tokens x tokens) mask (17 GB at 128k tokens, and the masked kernel computes
  every cross-sequence block), and flex attention needs torch.compile; flash-attn is not installed.
Without ``cu_seq_lens_q`` (a plain padded call: the KL reference on old code paths, tests) the
function falls back to transformers' SDPA attention unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "packed_varlen"


def _varlen() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_VARLEN = _varlen()
_VARLEN_PARAMS = set(inspect.signature(_VARLEN).parameters) if _VARLEN is not None else set()


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q (1, Hq, T, D), k/v (1, Hkv, T, D) -> (1, T, Hq, D)."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed row, got a batch of {query.shape[0]}")
    if _VARLEN is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return _flash_varlen(query, key, value, cu_seq_lens_q, max_length_q, scaling), None
    return _per_sequence(query, key, value, cu_seq_lens_q, scaling), None


def _flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
                  max_len: int | None, scaling: float | None) -> torch.Tensor:
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    kw: dict[str, Any] = {"scale": scaling}
    if "enable_gqa" in _VARLEN_PARAMS:
        kw["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:  # older torch: repeat the key/value heads for grouped-query attention
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "window_size" in _VARLEN_PARAMS:
        kw["window_size"] = (-1, 0)  # causal
    else:
        kw["is_causal"] = True
    max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
    out = _VARLEN(q, k, v, cu, cu, max_len, max_len, **kw)
    return out[None]


def _per_sequence(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor,
                  scaling: float | None) -> torch.Tensor:
    bounds = cu.tolist()
    gqa = key.shape[1] != query.shape[1]
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, enable_gqa=gqa)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


AttentionInterface.register(NAME, packed_attention)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Run ``model``'s attention through ``packed_attention`` (saved checkpoints keep their own setting)."""
    model.set_attn_implementation(NAME)
