"""The micro-batch plan: every sample exactly once, budgets kept, ranks balanced and equal in count."""

import random

import pytest

from policies.microbatch import plan


def flat(p):
    return sorted(i for rank in p.ranks for mb in rank for i in mb)


def test_the_whole_step_is_one_micro_batch_by_default():
    assert plan([5, 3, 9]).ranks == [[[0, 1, 2]]]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_token_budget_is_kept_and_ranks_balanced(world_size):
    rng = random.Random(world_size)
    lengths = [rng.randint(20, 300) for _ in range(101)]
    p = plan(lengths, max_tokens=1000, world_size=world_size)
    assert flat(p) == list(range(len(lengths))) and p.over_budget == 0
    counts = {len(rank) for rank in p.ranks}
    assert len(counts) == 1  # every rank runs the same number of passes
    tokens = [[sum(lengths[i] for i in mb) for mb in rank] for rank in p.ranks]
    assert max(t for rank in tokens for t in rank) <= 1000
    # LPT is within the longest sample of the optimum: the fewest micro-batches the budget allows
    assert sum(counts) * world_size <= -(-(sum(lengths) + 1000) // 1000) + world_size
    per_rank = [sum(rank) for rank in tokens]
    assert max(per_rank) - min(per_rank) <= max(lengths)


def test_never_more_micro_batches_than_samples():
    assert len(plan([30, 40, 50], max_tokens=1).ranks[0]) == 3


def test_a_sample_over_budget_trains_alone_and_is_counted():
    p = plan([50, 700, 40, 30], max_tokens=100)
    assert p.over_budget == 1
    assert [1] in p.ranks[0] and flat(p) == [0, 1, 2, 3]
    assert all(sum([50, 700, 40, 30][i] for i in mb) <= 100 for mb in p.ranks[0] if mb != [1])


def test_micro_batch_size_caps_samples_and_is_ignored_by_the_dynamic_budget():
    p = plan([10] * 7, micro_batch_size=3)
    assert sorted(len(mb) for mb in p.ranks[0]) == [2, 2, 3] and flat(p) == list(range(7))
    assert plan([10] * 7, micro_batch_size=3, max_tokens=1000).ranks == [[list(range(7))]]


def test_more_ranks_than_samples_gives_empty_micro_batches_on_some_ranks():
    p = plan([10, 20, 30], world_size=4)
    assert [len(r) for r in p.ranks] == [1, 1, 1, 1] and flat(p) == [0, 1, 2]
    assert sum(1 for r in p.ranks if r == [[]]) == 1
