"""Splitting one optimizer step's samples into micro-batches, and the micro-batches among ranks.

Miles's flags choose the rule: ``--use-dynamic-batch-size --max-tokens-per-gpu N`` packs samples
into micro-batches of at most N tokens each (``micro_batch_size`` is then ignored, as in Miles);
``--micro-batch-size M`` alone makes micro-batches of at most M samples; neither: the whole step
is one micro-batch. The plan never changes the update, only memory and speed (the trainer
normalises by the whole step's token count).

Rules, each checked by a test:
- As few micro-batches as the budget allows, rounded up to a multiple of ``world_size`` so every
  rank runs the same number of forward/backward passes (a data-parallel rank's collectives must
  pair up); the samples go to them longest first, each to the lightest micro-batch it fits in
  (LPT), which balances tokens; a sample that fits nowhere opens more micro-batches.
- Micro-batches go to ranks heaviest first, each to the lightest rank that has room, so ranks
  carry about equal tokens.
- A sample longer than the budget is trained alone in its micro-batch (a sequence cannot be split
  across micro-batches without context parallelism); ``over_budget`` counts them for the log.
- A micro-batch is empty only when there are fewer samples than micro-batches (e.g. more ranks
  than samples); the trainer runs an empty one as a zero-weight pass.
"""

from __future__ import annotations

import math

import msgspec


class Plan(msgspec.Struct, frozen=True):
    """``ranks[r]`` lists rank r's micro-batches, each a sorted list of sample indices."""

    ranks: list[list[list[int]]]
    over_budget: int = 0  # samples longer than max_tokens, each alone in a micro-batch


def plan(lengths: list[int], *, max_tokens: int | None = None, micro_batch_size: int | None = None,
         world_size: int = 1) -> Plan:
    """Micro-batches of the samples whose token counts are ``lengths``, per rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if max_tokens is not None:
        count = math.ceil(sum(lengths) / max_tokens)
    elif micro_batch_size is not None:
        count = math.ceil(len(lengths) / micro_batch_size)
    else:
        count = 1
    count = min(count, len(lengths))  # never more micro-batches than samples (but for ranks, below)
    while True:
        bins = _pack(lengths, _round_up(max(count, 1), world_size), max_tokens=max_tokens,
                     max_samples=None if max_tokens is not None else micro_batch_size)
        if len(bins) % world_size == 0:
            break
        count = len(bins)  # LPT opened some: pack again into the next multiple, balanced
    over = sum(1 for n in lengths if max_tokens is not None and n > max_tokens)
    return Plan(ranks=_to_ranks(bins, lengths, world_size), over_budget=over)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _pack(lengths: list[int], count: int, *, max_tokens: int | None, max_samples: int | None) -> list[list[int]]:
    bins: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        fits = [b for b in range(len(bins))
                if not bins[b] or ((max_tokens is None or load[b] + n <= max_tokens)
                                   and (max_samples is None or len(bins[b]) < max_samples))]
        if not fits:
            bins.append([])
            load.append(0)
            fits = [len(bins) - 1]
        b = min(fits, key=lambda b: (load[b], len(bins[b]), b))
        bins[b].append(i)
        load[b] += n
    return [sorted(b) for b in bins]


def _to_ranks(bins: list[list[int]], lengths: list[int], world_size: int) -> list[list[list[int]]]:
    per_rank = len(bins) // world_size
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for b in sorted(bins, key=lambda b: (-sum(lengths[i] for i in b), b)):
        r = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (load[r], r))
        ranks[r].append(b)
        load[r] += sum(lengths[i] for i in b)
    return ranks
