"""Data parallelism (policies/fsdp.py, policies/trainer_ranks.py): two gloo ranks with FSDP2 take the
same steps as one rank, write an HF checkpoint transformers loads, and resume from it exactly."""

import pytest
import torch
import transformers
from safetensors.torch import load_file

from policies import fsdp
from policies.trainer import PolicyTrainer
from policies.trainer_process import TrainerDied
from policies.trainer_ranks import TrainerRanks
from runtime.config import GrpoConfig, OptimizerConfig
from tests.policies.test_trainer import make_group, tiny_checkpoint
from tests.policies.test_trainer_microbatch import batch

# every loss term that is not the reference's: PPO clip, importance weights by staleness, entropy
KWARGS = dict(grpo=GrpoConfig(use_tis=True, tis_clip_by_staleness=[2.0, 1.5], entropy_coef=0.01),
              optim=OptimizerConfig(lr=1e-2), temperature=0.7, pad_id=0, max_tokens_per_gpu=24)


def steps(v0, n):
    """Batch ``v`` (trained at version v): batch()'s groups, with token versions moved to stay at most 1 behind."""
    out = []
    for v in range(v0, v0 + n):
        groups = batch()
        for g in groups:
            for s in g.samples:
                s.token_versions = [max(0, v - (3 - t)) for t in s.token_versions]
        out.append(groups)
    return out


def weights(path):
    return load_file(path / "model.safetensors")


def assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_ranks_take_the_same_steps_as_one_and_resume_exactly(copy_task, tmp_path):
    path = tiny_checkpoint(copy_task, tmp_path)
    one = PolicyTrainer(path, **KWARGS)
    two = TrainerRanks(path, world_size=2, **KWARGS)
    try:
        # the last batch has one sample: rank 1 has no micro-batch and runs an empty pass
        for v, b in enumerate([*steps(0, 3), [make_group([1, 4, 5, 13], [[4, 5, 2]], [1.0], 3)]]):
            s1, s2 = one.step(b, v), two.step(b, v)
            # the same figures of the whole batch on both: each rank's sums are all-reduced
            assert (s2.n_tokens, s2.n_samples) == (s1.n_tokens, s1.n_samples)
            for f in ("loss", "pg_clipfrac", "tis_mean", "tis_clipfrac", "entropy", "grad_norm"):
                assert getattr(s2, f) == pytest.approx(getattr(s1, f), rel=1e-4, abs=1e-6), f
            assert s2.correction == pytest.approx(s1.correction, rel=1e-4, abs=1e-6)
        w1 = weights(one.save_weights(tmp_path / "w1"))
        assert_close(weights(two.save_weights(tmp_path / "w2")), w1)
        two.save_checkpoint(tmp_path / "ckpt")
        # the policy is an HF directory: transformers loads the weights the ranks hold
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "model").state_dict()
        assert_close({k: hf[k] for k in w1}, w1)
        assert (tmp_path / "ckpt" / "optimizer" / ".metadata").exists()
        nxt = steps(4, 1)[0]
        expect = two.step(nxt, 4)
        after = weights(two.save_weights(tmp_path / "w3"))
    finally:
        two.close()
    resumed = TrainerRanks(tmp_path / "ckpt" / "model", world_size=2, version=4, **KWARGS)
    try:
        resumed.load_checkpoint(tmp_path / "ckpt")
        got = resumed.step(nxt, 4)  # lossless: the optimizer's moments came back, shard by shard
        assert (got.loss, got.grad_norm) == (pytest.approx(expect.loss, abs=1e-6), pytest.approx(expect.grad_norm))
        assert_close(weights(resumed.save_weights(tmp_path / "w4")), after)
        # a failure on a rank takes the group down with one error, never a hang
        with pytest.raises(RuntimeError, match="ipc weights need one learner rank"):
            resumed.ipc_weights("float32")
        with pytest.raises(TrainerDied, match="stopped"):
            resumed.step(nxt, 5)
    finally:
        resumed.close()


def test_a_sharded_sender_gathers_one_bucket_at_a_time():
    """On one rank (world of 1) the gathering sender's plan is the plain sender's, and its one
    buffer holds the largest bucket, not the model."""
    named = [("a", torch.zeros(10)), ("b", torch.zeros(300)), ("c", torch.zeros(5))]
    sender = fsdp.GatheringSender(None, named, dtype=torch.float32, bucket_bytes=1024)
    assert [m.names for m in sender.plan] == [["a"], ["b"], ["c"]]
    assert sender._buffer is None  # not rank 0: gathers only
    rank0 = fsdp.GatheringSender(object(), named, dtype=torch.float32, bucket_bytes=1024)
    assert rank0._buffer.numel() == 300 * 4


@pytest.mark.slow  # (two processes that import torch to fail: slow on a busy 2-core machine)
def test_a_rank_that_cannot_start_fails_the_group_at_once(tmp_path):
    with pytest.raises(RuntimeError, match="failed to start"):
        TrainerRanks(tmp_path / "missing", world_size=2, **KWARGS)


