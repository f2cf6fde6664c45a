"""A step is the same update whatever the micro-batching, packing or rank split (float64, real torch)."""

import pytest
import torch

from policies.microbatch import plan
from policies.packing import collate
from policies.trainer import PolicyTrainer
from runtime.config import GrpoConfig, OptimizerConfig
from tests.policies.test_trainer import make_group, tiny_checkpoint

# every loss term on: PPO clip, sequence-level importance weights, KL to the reference, entropy bonus
GRPO = GrpoConfig(use_tis=True, tis_level="sequence", tis_clip_by_staleness=[2.0, 1.5], use_kl_loss=True,
                  kl_loss_coef=0.1, entropy_coef=0.01)


def batch():
    """Three groups of uneven lengths, stale and fresh tokens, one failed sample (no trained tokens)."""
    a = make_group([1, 4, 5, 13], [[4, 5, 2], [6, 6, 6, 6, 2], [7, 2]], [1.0, 0.0, 0.5], [[3, 3, 3], [2] * 5, [3, 2]],
                   behavior_logp=-1.5)
    b = make_group([1, 7, 13], [[8, 9, 10, 11, 12, 2], [8, 2]], [0.0, 1.0], 3, behavior_logp=-3.0)
    c = make_group([1, 9, 9, 9, 9, 13], [[9, 2], [5, 5, 2]], [1.0, 0.0], 2, behavior_logp=-2.5)
    c.samples[1].fail("test: a failed sample trains nothing")
    return [a, b, c]


def trainer(path, **kw):
    t = PolicyTrainer(path, grpo=GRPO, optim=OptimizerConfig(lr=1e-2), temperature=0.7, pad_id=0, **kw)
    t.model.double()
    t.ref.double()
    # a reference different from the policy, so the KL term has a gradient
    with torch.no_grad():
        for p in t.ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return t


def grads(t):
    return {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def seeded(path, **kw):
    torch.manual_seed(0)
    return trainer(path, **kw)


@pytest.fixture(scope="module")
def path(copy_task, tmp_path_factory):
    return tiny_checkpoint(copy_task, tmp_path_factory.mktemp("mb"))


def lengths():
    return [len(s.prompt_ids) + len(s.response_ids) for g in batch() for s in g.samples]


@pytest.mark.parametrize(("split", "count"), [(dict(micro_batch_size=4), 2), (dict(max_tokens_per_gpu=20), 3),
                                              (dict(max_tokens_per_gpu=1), 7)])
def test_micro_batches_give_the_gradients_and_stats_of_one_batch(path, split, count):
    assert len(plan(lengths(), micro_batch_size=split.get("micro_batch_size"),
                    max_tokens=split.get("max_tokens_per_gpu")).ranks[0]) == count
    whole, parts = seeded(path), seeded(path, **split)
    sums_whole, sums_parts = whole.accumulate(batch(), 3), parts.accumulate(batch(), 3)
    g1, g2 = grads(whole), grads(parts)
    assert g1.keys() == g2.keys() and any(g.abs().sum() > 0 for g in g1.values())
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-10, atol=1e-12, msg=name)
    s1, s2 = whole.apply(sums_whole, 3), parts.apply(sums_parts, 3)
    assert s1.n_tokens == s2.n_tokens == 20 and s1.n_samples == s2.n_samples == 7
    assert s1.correction.keys() == s2.correction.keys() == {f"s{s}/{k}" for s in (0, 1) for k in
                                                            ("tokens", "is_mean", "clip_frac", "ess")}
    for field in ("loss", "pg_clipfrac", "tis_mean", "tis_clipfrac", "kl", "entropy", "grad_norm"):
        assert getattr(s2, field) == pytest.approx(getattr(s1, field), rel=1e-10, abs=1e-12), field
    for key, value in s1.correction.items():
        assert s2.correction[key] == pytest.approx(value, rel=1e-10), key
    assert s1.kl > 0 and s1.entropy > 0
    assert {n: p for n, p in whole.model.state_dict().items()}.keys() == parts.model.state_dict().keys()
    for (n, p), q in zip(whole.model.state_dict().items(), parts.model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("world_size", [3, 8])  # 8 ranks for 7 samples: one rank runs an empty pass
def test_ranks_train_their_share_and_their_gradients_and_sums_add_to_one_ranks(path, world_size):
    whole = seeded(path, max_tokens_per_gpu=20)
    whole.accumulate(batch(), 3)
    expected = grads(whole)
    total = {n: torch.zeros_like(g) for n, g in expected.items()}
    sums = []
    for rank in range(world_size):
        t = seeded(path, max_tokens_per_gpu=20, rank=rank, world_size=world_size)
        sums.append(t.accumulate(batch(), 3))
        for n, g in grads(t).items():
            total[n] += g
    for n in expected:
        torch.testing.assert_close(total[n], expected[n], rtol=1e-10, atol=1e-12, msg=n)
    reduced = sums[0]
    for s in sums[1:]:
        reduced += s
    single = seeded(path).accumulate(batch(), 3)
    torch.testing.assert_close(reduced.values, single.values, rtol=1e-10, atol=1e-12)


def test_packed_log_probs_equal_padded_ones(path):
    t = seeded(path)
    samples = [s for g in batch() for s in g.samples]
    tb = collate(samples, [0.0] * len(samples), pad_id=0, version=3)
    packed_logp, packed_ent = t.token_logprobs(tb)
    with torch.no_grad():  # the reference: the padded batch through the stock model and a full softmax
        t.model.set_attn_implementation("sdpa")
        logits = t.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]
    logp_all = torch.log_softmax(logits / 0.7, dim=-1)
    valid = tb.attention_mask[:, 1:].bool()
    want_logp = logp_all.gather(-1, tb.input_ids[:, 1:, None])[..., 0]
    want_ent = -(logp_all.exp() * logp_all).sum(-1)
    torch.testing.assert_close(packed_logp[valid], want_logp[valid], rtol=0, atol=1e-10)
    torch.testing.assert_close(packed_ent[valid], want_ent[valid], rtol=0, atol=1e-10)
    assert (packed_logp[~valid] == 0).all()


@pytest.mark.parametrize("per_token", [True, False])
def test_sft_micro_batches_give_the_gradients_and_loss_of_one_batch(path, per_token):
    def sft(**kw):
        torch.manual_seed(0)
        t = PolicyTrainer(path, grpo=GrpoConfig(loss_type="sft_loss", calculate_per_token_loss=per_token),
                          optim=OptimizerConfig(lr=1e-2), temperature=0.7, pad_id=0, **kw)
        t.model.double()
        return t

    whole, parts = sft(), sft(max_tokens_per_gpu=10)
    s1, s2 = whole.accumulate(batch(), 3), parts.accumulate(batch(), 3)
    g1, g2 = grads(whole), grads(parts)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-10, atol=1e-12, msg=name)
    a, b = whole.apply(s1, 3), parts.apply(s2, 3)
    assert (a.n_samples, a.n_tokens) == (b.n_samples, b.n_tokens) == (6, 20)  # the failed sample is left out
    assert b.loss == pytest.approx(a.loss, rel=1e-10) and b.entropy == pytest.approx(a.entropy, rel=1e-10)
