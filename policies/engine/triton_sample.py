"""One-kernel next-token sampling on a GPU: inverse-CDF draws from bf16/fp32 logits in two reads.

Why: torch's sampling path (sampling.py: float(), softmax, cumsum, log_softmax, gather) makes ~8
full passes over a [rows, vocab] float32 tensor; at 512 rows x 151,936 columns that is ~2.5 GB of
traffic and ~1.3 ms of a ~20 ms decode step (H200, benchmarks/engine_gpu_profile.py). The same
draw needs only two reads of the logits per row:

  pass 1: the row's max and sum of exp((x - max) / T) (online, block by block), and its argmax;
  pass 2: the running sum again, block by block (tl.cumsum within a block); the token is the first
          column whose inclusive running sum exceeds u * total, as `torch.searchsorted(cdf, u *
          cdf[-1], right=True)` picks it in sampling._draw.

The logprob is (x[token] - max) / T - log(total): log_softmax(logits / T)[token], as sampling.sample
reports it. Greedy rows (T = 0) take the argmax and the T = 1 logprob, as there. Rows that ask for
logit_bias, top-k, top-p or top logprobs take torch's path (sampling.sample decides).

Same law, not the same bits: the running sums add in another order than torch's cumsum, so a
uniform within float rounding of a CDF step can pick the neighbouring token. Both of the engine's
paths (the slot decoder and the recompute reference) sample through this kernel on a GPU, so they
agree with each other exactly; tests/policies/test_triton_sample.py checks it against sampling.sample.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # columns per load


@triton.jit
def _sample_kernel(
    logits_ptr, stride, temps_ptr, uniforms_ptr, tokens_ptr, logprobs_ptr, vocab, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    temp = tl.load(temps_ptr + row)
    greedy = temp <= 0.0
    t = tl.where(greedy, 1.0, temp)
    cols = tl.arange(0, BLOCK)

    m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane running max and sum (online softmax)
    s = tl.zeros([BLOCK], tl.float32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane argmax of the raw logits
    best_col = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        c = start + cols
        x = tl.load(base + c, mask=c < vocab, other=float("-inf")).to(tl.float32)
        better = x > best
        best_col = tl.where(better, c, best_col)
        best = tl.where(better, x, best)
        y = x / t
        m_new = tl.maximum(m, y)
        s = s * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + tl.where(
            y == float("-inf"), 0.0, tl.exp(y - m_new)
        )
        m = m_new
    row_max = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(tl.where(m == float("-inf"), float("-inf"), m - row_max)), axis=0)
    top = tl.max(best, axis=0)
    argmax = tl.min(tl.where(best == top, best_col, vocab), axis=0)  # the first maximal column, as torch's

    target = tl.load(uniforms_ptr + row) * total
    running = 0.0
    pick = vocab
    for start in range(0, vocab, BLOCK):
        c = start + cols
        x = tl.load(base + c, mask=c < vocab, other=float("-inf")).to(tl.float32)
        e = tl.where(c < vocab, tl.exp(x / t - row_max), 0.0)
        inclusive = tl.cumsum(e, axis=0) + running
        pick = tl.minimum(pick, tl.min(tl.where((inclusive > target) & (c < vocab), c, vocab), axis=0))
        running += tl.sum(e, axis=0)
    # a uniform past the running total by rounding: the argmax (a token of positive probability)
    token = tl.where(greedy | (pick >= vocab), argmax, pick)
    x_token = tl.load(base + token).to(tl.float32)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, x_token / t - row_max - tl.log(total))


def sample_rows(
    logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (last dim contiguous), temperatures [B] float32 (0 = greedy), uniforms [B] float32
    in [0, 1) -> (tokens [B] int64, logprobs [B] float32)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("sample_rows needs the vocabulary dimension contiguous")
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _sample_kernel[(rows,)](
        logits, logits.stride(0), temperatures, uniforms, tokens, logprobs, vocab, BLOCK=BLOCK, num_warps=8
    )
    return tokens, logprobs
