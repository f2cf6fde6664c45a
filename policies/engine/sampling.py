"""Batched next-token sampling with per-request randomness.

Invariants:
- Row i's token depends only on row i's logits, its parameters and its own generator, so a
  request samples the same tokens whatever else is in the batch (given equal logits).
- Each sampled (temperature > 0) row draws exactly one uniform number per step from its generator;
  greedy rows draw nothing. A seeded request is therefore reproducible. The generator is a
  Python `random.Random`: one draw costs ~0.1 us against ~2 us for a `torch.Generator`, which at
  128 rows was a tenth of a decode step.
- Truncation (top-k / top-p) runs only when some row asks for it; it is a no-op otherwise.
- The reported logprob is log_softmax(logits / T)[token] (log_softmax(logits) when greedy),
  before top-k/top-p truncation, as SGLang reports it. A row's logit_bias is added to its logits
  first (as SGLang's sampler does, before the temperature): it shifts the argmax, the draw and
  the reported logprobs alike. Top logprobs (top_logprobs > 0) come from the same distribution.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
from typing import NamedTuple

import torch


class RowParams(NamedTuple):
    """Sampling parameters of one batch row. generator is None exactly when temperature == 0.

    bias: (token id, added logit) pairs (SGLang's logit_bias); top_logprobs: how many of the most
    likely tokens to report with their logprobs at each step (SGLang's top_logprobs_num).
    """

    temperature: float
    top_p: float
    top_k: int
    generator: random.Random | None
    bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0


TopLogprobs = list[tuple[float, int]]  # (logprob, token id), most likely first


class Sampled(NamedTuple):
    """One step's results, row-aligned: the token, its logprob and (None unless the row asked for
    top_logprobs) the most likely tokens with their logprobs."""

    tokens: list[int]
    logprobs: list[float]
    top: list[TopLogprobs | None]


def sample(logits: torch.Tensor, rows: list[RowParams]) -> Sampled:
    """Pick one token per row of `logits` [B, V]; returns the tokens, their logprobs and top logprobs."""
    if logits.is_cuda and _kernel_serves(rows):
        return _sample_by_kernel(logits, rows)
    logits = logits.float()
    if any(r.bias for r in rows):
        logits = logits + bias_tensor(rows, logits.shape[-1], logits.device)
    temperatures = {r.temperature for r in rows}
    if max(temperatures) <= 0:  # all greedy
        tokens, scaled = logits.argmax(dim=-1), logits
    else:
        if temperatures == {1.0}:  # x / 1.0 == x exactly: skip a pass over [B, V]
            scaled = logits
        elif len(temperatures) == 1:  # the usual batch: one temperature (the same division, row by row)
            scaled = logits / temperatures.pop()
        else:
            temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows], device=logits.device)
            scaled = logits / temps[:, None]
        vocab = logits.shape[-1]
        truncated = _truncate(scaled, rows) if any(0 < r.top_k < vocab or r.top_p < 1.0 for r in rows) else scaled
        tokens = _draw(truncated, rows)
        if min(r.temperature for r in rows) <= 0:  # some greedy rows
            greedy = torch.tensor([r.temperature <= 0.0 for r in rows], device=logits.device)
            tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    log_probs = torch.log_softmax(scaled, dim=-1)
    logprobs = log_probs.gather(-1, tokens[:, None])[:, 0]
    # one device-to-host copy for both (float64 holds every token id and float32 logprob exactly)
    both = torch.stack([tokens.double(), logprobs.double()]).tolist()
    return Sampled([int(t) for t in both[0]], both[1], top_logprobs(log_probs, [r.top_logprobs for r in rows]))


SAMPLER_ENV = "ASYNCRL_ENGINE_SAMPLER"  # "torch" keeps the Triton sampling kernel off on CUDA


@functools.cache
def _kernel_available() -> bool:
    return os.environ.get(SAMPLER_ENV, "triton") == "triton" and importlib.util.find_spec("triton") is not None


def _kernel_serves(rows: list[RowParams]) -> bool:
    """The Triton kernel (triton_sample.py) draws plain temperature sampling and greedy rows; logit
    bias, top-k/top-p and top logprobs take the torch path below."""
    return _kernel_available() and not any(r.bias or r.top_logprobs or 0 < r.top_k or r.top_p < 1.0 for r in rows)


def _sample_by_kernel(logits: torch.Tensor, rows: list[RowParams]) -> Sampled:
    """The same draw as below (one uniform per sampled row from its generator, inverse CDF) in one
    kernel reading the logits twice, instead of ~8 passes over a float32 copy."""
    from policies.engine.triton_sample import sample_rows

    params = [[r.temperature for r in rows], [r.generator.random() if r.generator is not None else 0.0 for r in rows]]
    temps, uniforms = torch.tensor(params, dtype=torch.float32).to(logits.device, non_blocking=True)
    tokens, logprobs = sample_rows(logits if logits.stride(-1) == 1 else logits.contiguous(), temps, uniforms)
    both = torch.stack([tokens.double(), logprobs.double()]).tolist()
    return Sampled([int(t) for t in both[0]], both[1], [None] * len(rows))


def bias_tensor(rows: list[RowParams], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32: each row's logit_bias at its token ids, 0 elsewhere."""
    bias = torch.zeros(len(rows), vocab)
    for i, r in enumerate(rows):
        for token, value in r.bias:
            bias[i, token] += value
    return bias.to(device)


def top_logprobs(log_probs: torch.Tensor, counts: list[int]) -> list[TopLogprobs | None]:
    """The `counts[i]` most likely tokens of row i of log_probs [B, V] (None where counts[i] is 0)."""
    k = min(max(counts, default=0), log_probs.shape[-1])
    if k <= 0:
        return [None] * len(counts)
    values, ids = log_probs.topk(k, dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return [list(zip(values[i][:n], ids[i][:n], strict=True)) if n > 0 else None for i, n in enumerate(counts)]


def _truncate(scaled: torch.Tensor, rows: list[RowParams]) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p set to -inf (the argmax always survives)."""
    vocab = scaled.shape[-1]
    top_k = torch.tensor([r.top_k if 0 < r.top_k < vocab else vocab for r in rows], device=scaled.device)
    top_p = torch.tensor([r.top_p for r in rows], device=scaled.device)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    probs = sorted_logits.softmax(dim=-1)
    # mass strictly before each token: the first token is always kept, so the set is never empty;
    # top_p == 1 is skipped outright so float rounding in the cumsum never drops a tail token
    mass_before = probs.cumsum(dim=-1) - probs
    over_p = (mass_before > top_p[:, None]) & (top_p[:, None] < 1.0)
    drop_sorted = (rank >= top_k[:, None]) | over_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


def _draw(truncated: torch.Tensor, rows: list[RowParams]) -> torch.Tensor:
    """Inverse-CDF sampling with one uniform per sampled row from that row's generator."""
    uniforms = [r.generator.random() if r.generator is not None else 0.0 for r in rows]
    u = torch.tensor(uniforms, device=truncated.device, dtype=torch.float32)
    cdf = truncated.softmax(dim=-1).cumsum(dim=-1)
    # scale u by the row total so float rounding in the cumsum can never push u past the end
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return idx.clamp(max=truncated.shape[-1] - 1)


class Row(NamedTuple):
    """One sequence to extend by a token.

    key identifies the request while it runs (its row in the batch cache); tokens is its full
    context (prompt + generated so far); the cache holds all of it but the last token.
    """

    key: int
    tokens: list[int]
    params: RowParams


def position_logprobs(logits: torch.Tensor, targets: list[int], params: RowParams) -> Sampled:
    """Logprobs of `targets[j]` under row j of logits [P, V], all positions of one request
    (its prompt, for prompt logprobs), with the request's bias and temperature as in `sample`."""
    logits = logits.float()
    if params.bias:
        logits = logits + bias_tensor([params], logits.shape[-1], logits.device)
    if params.temperature > 0 and params.temperature != 1.0:
        logits = logits / params.temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    index = torch.tensor(targets, device=logits.device)[:, None]
    chosen = log_probs.gather(-1, index)[:, 0].double().tolist()
    return Sampled(targets, chosen, top_logprobs(log_probs, [params.top_logprobs] * len(targets)))
