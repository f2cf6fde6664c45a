"""A split-KV decode attention kernel in Triton: each row reads only its live columns, each KV head once.

Why a kernel of our own: at RL lengths a decode step is mostly attention (H200, 512 rows x ~600
cached tokens: 71% of the step, benchmarks/engine_gpu_profile.py), and neither of torch's paths
reads the cache at the speed the memory allows: SDPA (cuDNN) reads the whole width bucket of every
row at ~2 TB/s, and flex_attention recompiles at every new row/width bucket inside a CUDA graph
capture. FlashInfer's and FlashAttention's decode kernels need wheels built for the GPU machine's
CUDA, which cannot be carried there; Triton ships with CUDA torch. The algorithm is
flash-decoding's (Dao et al., 2023), written from its description:

  stage 1, one program per (row, KV head, split): the split's share of the row's live columns
      [start, end], read block by block; the GROUP query heads that share the KV head are the rows
      of one small matrix, so each K/V block is loaded once for all of them (grouped-query
      attention without copying K/V per query head); online softmax; writes the split's
      unnormalised output and its log-sum-exp.
  stage 2, one program per (row, KV head): merges the splits by their log-sum-exps.

Splits give a step with few rows and long contexts enough programs to fill the GPU; with many rows
there is one split per row and stage 2 is a copy. Every shape is a runtime argument except the head
dimension, the group size and the block, so one compile serves every row count and width (and a
CUDA graph replays it: nothing is allocated or decided on the host inside the kernel calls).

Checked against SDPA on CPU with Triton's interpreter (tests/policies/test_triton_decode.py, when
triton is installed) and on the GPU (the same file's CUDA test); SlotDecoder also compares its first
eager step with SDPA and falls back to SDPA for good on any disagreement or failure.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # columns per load: 64 x head_dim x 2 bytes per K (or V) tile
WARPS, STAGES = 4, 2  # the split kernel's launch (read at each call: the profile script tries others)


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, starts_ptr, ends_ptr, part_ptr, lse_ptr,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    scale_log2, kv_heads, splits,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row_head = tl.program_id(0)
    split = tl.program_id(1)
    row = (row_head // kv_heads).to(tl.int64)  # row * its stride passes 2**31 in a large cache
    kv_head = row_head % kv_heads
    start = tl.load(starts_ptr + row).to(tl.int32)
    end = tl.load(ends_ptr + row).to(tl.int32) + 1  # exclusive
    chunk = tl.cdiv(tl.cdiv(end - start, splits), BLOCK) * BLOCK
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, end)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + row * sq_b + (kv_head * GROUP + g)[:, None] * sq_h + d[None, :]
    q = tl.load(q_rows, mask=(g < GROUP)[:, None], other=0.0)  # [GROUP_PAD, HEAD_DIM]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    k_base = k_ptr + row * sk_b + kv_head * sk_h
    v_base = v_ptr + row * sv_b + kv_head * sv_h
    n = tl.arange(0, BLOCK)
    for block in range(lo, hi, BLOCK):  # every block holds a live column at its start: m_i is finite after it
        cols = block + n
        live = cols < hi
        k = tl.load(k_base + cols[:, None] * sk_n + d[None, :], mask=live[:, None], other=0.0)  # [BLOCK, D]
        s = tl.dot(q, tl.trans(k)) * scale_log2  # [GROUP_PAD, BLOCK], log2 units
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * sv_n + d[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0  # a split past the row's end (or a padded query head)
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    slot = (row_head * splits + split) * GROUP + g  # partials [rows * kv_heads, splits, GROUP, ...]
    keep = g < GROUP
    tl.store(part_ptr + slot[:, None] * HEAD_DIM + d[None, :], out, mask=keep[:, None])
    tl.store(lse_ptr + slot, lse, mask=keep)


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr, so_b, so_h, kv_heads, splits,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
):  # fmt: skip
    row_head = tl.program_id(0)
    row = row_head // kv_heads
    kv_head = row_head % kv_heads
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    keep = g < GROUP
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    for split in range(splits):
        lse = tl.load(lse_ptr + (row_head * splits + split) * GROUP + g, mask=keep, other=float("-inf"))
        m = tl.maximum(m, lse)
    m = tl.where(keep, m, 0.0)  # split 0 of a real head is never empty: m is finite there
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for split in range(splits):
        slot = (row_head * splits + split) * GROUP + g
        lse = tl.load(lse_ptr + slot, mask=keep, other=float("-inf"))
        w = tl.exp2(lse - m)
        part = tl.load(part_ptr + slot[:, None] * HEAD_DIM + d[None, :], mask=keep[:, None], other=0.0)
        acc += w[:, None] * part
        total += w
    out = acc / tl.where(keep, total, 1.0)[:, None]
    dest = out_ptr + row * so_b + (kv_head * GROUP + g)[:, None] * so_h + d[None, :]
    tl.store(dest, out.to(out_ptr.dtype.element_ty), mask=keep[:, None])


def splits_for(rows: int, kv_heads: int, width: int, programs: int) -> int:
    """Splits per row: enough (row, head, split) programs to fill the GPU (`programs`), at most one per
    4 blocks of the width."""
    return max(1, min(-(-programs // max(rows * kv_heads, 1)), -(-width // (4 * BLOCK_N))))


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
    scale: float, splits: int, *, block: int | None = None, warps: int | None = None, stages: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [b, heads, 1, d] (head h = kv_head * group + g), keys/values [b, kv_heads, w, d] (any strides,
    last dim contiguous), row i attends to columns starts[i]..ends[i] inclusive -> [b, heads, 1, d].
    block, warps, stages: the split kernel's launch parameters (benchmarks/engine_gpu_profile.py
    times the alternatives); BLOCK_N, WARPS, STAGES when None."""
    block, warps, stages = block or BLOCK_N, warps or WARPS, stages or STAGES
    b, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    if keys.stride(3) != 1 or values.stride(3) != 1 or q.stride(3) != 1:
        raise ValueError("decode_attention needs the head dimension contiguous")
    part = torch.empty(b * kv_heads, splits, group, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(b * kv_heads, splits, group, dtype=torch.float32, device=q.device)
    out = torch.empty(b, heads, 1, dim, dtype=q.dtype, device=q.device)
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot's smallest tile
    _split_kernel[(b * kv_heads, splits)](
        q, keys, values, starts, ends, part, lse,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        scale * math.log2(math.e), kv_heads, splits,
        HEAD_DIM=dim, GROUP=group, GROUP_PAD=group_pad, BLOCK=block, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _merge_kernel[(b * kv_heads,)](
        part, lse, out, out.stride(0), out.stride(1), kv_heads, splits,
        HEAD_DIM=dim, GROUP=group, GROUP_PAD=group_pad, num_warps=4,
    )  # fmt: skip
    return out
