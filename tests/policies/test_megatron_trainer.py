"""The Megatron trainer on CPU against the HF learner: the same step on the same weights (loss,
figures, updated weights), micro-batching that leaves the update unchanged, the weights it
publishes (HF names, shapes and bucket plan), and a checkpoint that resumes exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch
import transformers

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from policies import weight_ipc, weight_sync  # noqa: E402
from policies.megatron.trainer import MegatronTrainer, micro_batches  # noqa: E402
from policies.model import qwen3_config  # noqa: E402
from policies.trainer import PolicyTrainer, StepStats  # noqa: E402
from runtime.config import GrpoConfig, OptimizerConfig  # noqa: E402
from tests.policies.test_trainer import make_group  # noqa: E402

GRPO = GrpoConfig(use_tis=True, tis_clip=1.2, entropy_coef=0.01)
OPTIM = OptimizerConfig(lr=1e-3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = qwen3_config(vocab_size=96, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=80, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3") / "m"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def batch(version_of_second: int = 0):
    """Two groups of unequal lengths, behavior log-probs off policy (the bound acts), one group stale."""
    return [make_group([1, 4, 5, 13], [[4, 5, 2], [6, 6, 6, 7, 2]], [1.0, 0.0], behavior_logp=-4.0),
            make_group([1, 7, 8], [[9, 2], [10, 11, 2], [12, 2]], [0.0, 1.0, 0.5], version=version_of_second,
                       behavior_logp=-4.6)]


def megatron(path, **kw) -> MegatronTrainer:
    return MegatronTrainer(path, grpo=GRPO, optim=OPTIM, temperature=0.8, pad_id=0, **kw)


def test_micro_batches_respect_the_budget_and_pad_to_the_ranks():
    lengths = [9, 3, 7, 2, 8]
    plan = micro_batches(lengths, max_tokens=16, micro_batch_size=None, world_size=4)
    assert sorted(i for mb in plan for i in mb) == list(range(5)) and len(plan) % 4 == 0
    assert all(max(lengths[i] for i in mb) * len(mb) <= 16 for mb in plan if len(mb) > 1)
    assert micro_batches(lengths, max_tokens=None, micro_batch_size=2, world_size=1) == [[0, 4], [1, 2], [3]]
    assert micro_batches(lengths, max_tokens=None, micro_batch_size=None, world_size=1) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("max_tokens", [None, 12])
def test_a_step_equals_the_hf_learners(checkpoint, max_tokens):
    """Same weights, batch and objective: the figures agree to float32 rounding, and so do the
    weights after the step (exported as HF safetensors and read back by transformers). With a
    12-token budget the batch runs as several micro-batches and the update does not change."""
    hf = PolicyTrainer(checkpoint, grpo=GRPO, optim=OPTIM, temperature=0.8, pad_id=0)
    want = hf.step(batch(version_of_second=1), 2)
    trainer = megatron(checkpoint, max_tokens_per_gpu=max_tokens)
    try:
        got = trainer.step(batch(version_of_second=1), 2)
        assert got.n_tokens == want.n_tokens and got.n_samples == want.n_samples and trainer.version == 3
        for field in ("loss", "pg_clipfrac", "tis_mean", "tis_clipfrac", "kl", "entropy", "grad_norm", "lr"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-5, abs=1e-7), field
        assert got.correction.keys() == want.correction.keys() and {"s2/tokens", "s1/tokens"} <= got.correction.keys()
        assert want.tis_clipfrac > 0  # the bound acted: the importance weight is really in the loss
        out = transformers.AutoModelForCausalLM.from_pretrained(trainer.save_weights(checkpoint.parent / "export"))
        stepped = hf.model.state_dict()
        moved = max((stepped[k] - v).abs().max().item() for k, v in out.state_dict().items())
        assert moved < 2e-5  # the step moved weights by ~1e-3 (lr)
    finally:
        trainer.close()


@pytest.mark.parametrize("tp", [pytest.param(1, marks=pytest.mark.slow, id="dp2"), pytest.param(2, id="tp2")])
def test_two_ranks_take_the_one_rank_step(checkpoint, tmp_path, tp):
    """Two processes over gloo, as data-parallel ranks (each trains half the micro-batches) or as
    tensor-parallel ranks (each holds half of every sharded weight): the step's figures and the
    updated weights (gathered into the HF export) are the single rank's."""
    single = megatron(checkpoint, max_tokens_per_gpu=12)
    try:
        want = single.step(batch(version_of_second=1), 2)
        want_weights = dict(single.weights.tensors())
    finally:
        single.close()
    # a file rendezvous: a free TCP port picked here could be taken by another test worker's
    # connection before rank 0 binds it (EADDRINUSE, seen in CI)
    url = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("megatron_rank.py")), str(checkpoint),
                               str(tmp_path), str(r), "2", url, str(tp)], stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    got = msgspec.json.decode((tmp_path / "stats.json").read_bytes(), type=StepStats)
    for field in ("loss", "pg_clipfrac", "tis_mean", "tis_clipfrac", "entropy", "grad_norm"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-5, abs=1e-7), field
    assert got.n_tokens == want.n_tokens
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    # Adam's first step moves every weight by ~lr (1e-3): float32 reduction order leaves ~1e-6
    assert max((out[k] - v).abs().max().item() for k, v in want_weights.items()) < 1e-5


def test_published_weights_have_the_hf_learners_names_shapes_and_plan(checkpoint):
    hf = PolicyTrainer(checkpoint, grpo=GRPO, optim=OPTIM, temperature=0.8, pad_id=0)
    trainer = megatron(checkpoint)
    try:
        ours = list(trainer.weights.tensors())
        theirs = hf._served_tensors()
        # the same set (megatron's parameter order differs; engines load by name)
        assert sorted((n, tuple(t.shape)) for n, t in ours) == sorted((n, tuple(t.shape)) for n, t in theirs)
        by_name = dict(theirs)
        assert all(torch.equal(t, by_name[n]) for n, t in ours)
        plan = weight_sync.plan_buckets(ours, dtype=torch.bfloat16, bucket_bytes=20_000)
        assert len(plan) > 1 and sum(len(m.names) for m in plan) == len(theirs)
    finally:
        trainer.close()


def test_ipc_syncs_carry_each_versions_gathered_weights_in_one_buffer(checkpoint):
    """The same-GPU transport (exercised on CPU, as weight_ipc's tests do): the payload holds the HF
    tensors, and after a step the next sync rewrites the same buffer with the new weights."""
    trainer = megatron(checkpoint)
    try:
        def synced():
            export = msgspec.msgpack.decode(trainer.ipc_weights("float32"), type=weight_ipc.Export)
            payload = weight_ipc.loads(export.serialized)
            return export.version, payload["flattened_tensor"], dict(weight_ipc.named_tensors(payload))

        v0, flat0, before = synced()
        assert before.keys() == dict(trainer.weights.tensors()).keys()
        first = {k: v.clone() for k, v in before.items()}
        trainer.step(batch(), 0)
        v1, flat1, after = synced()
        assert (v0, v1) == (0, 1) and flat1.data_ptr() == flat0.data_ptr()
        now = dict(trainer.weights.tensors())
        assert all(torch.equal(after[k], now[k]) for k in now)
        assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"],
                               first["model.layers.0.self_attn.q_proj.weight"])
    finally:
        trainer.close()


def test_a_checkpoint_resumes_the_same_next_step(checkpoint, tmp_path):
    """Step, checkpoint, step again; a trainer built from the checkpoint takes the same second step
    (the optimizer's moments came back: a fresh optimizer would step differently)."""
    first = megatron(checkpoint)
    try:
        first.step(batch(), 0)
        first.save_checkpoint(tmp_path / "ckpt")
        want = first.step(batch(1), 1)
        after = {n: t.clone() for n, t in first.weights.tensors()}
    finally:
        first.close()
    resumed = megatron(tmp_path / "ckpt" / "model", version=1)
    try:
        resumed.load_checkpoint(tmp_path / "ckpt")
        got = resumed.step(batch(1), 1)
        assert got.loss == pytest.approx(want.loss, rel=1e-6) and got.grad_norm == pytest.approx(want.grad_norm)
        assert all(torch.allclose(t, after[n], atol=1e-7) for n, t in resumed.weights.tensors())
    finally:
        resumed.close()
    fresh = megatron(tmp_path / "ckpt" / "model", version=1)
    try:
        fresh.step(batch(1), 1)
        assert any(not torch.allclose(t, after[n], atol=1e-7) for n, t in fresh.weights.tensors())
    finally:
        fresh.close()


def test_cpu_refuses_what_needs_cuda_in_one_line(checkpoint):
    from policies.megatron.model import Parallelism
    with pytest.raises(ValueError, match="need CUDA"):
        megatron(checkpoint, parallelism=Parallelism(recompute_granularity="full"))


def test_the_state_allocated_before_a_gpu_load_is_a_fresh_adamw():
    """Before loading a distributed checkpoint, the GPU resume gives the optimizer's inner AdamW a
    state (step 0, zero moments; megatron's state_dict() asserts on an empty one). That state must
    be one torch's AdamW steps from exactly as from nothing. The megatron wrapper around the AdamW
    is a stand-in (a namespace with ``.optimizer``): its DistributedOptimizer allocates on CUDA."""
    from types import SimpleNamespace

    from policies.megatron.checkpoint import _allocate_adam_state

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    prefilled, fresh = torch.optim.AdamW(params, lr=0.1), torch.optim.AdamW(twins, lr=0.1)
    _allocate_adam_state(SimpleNamespace(optimizer=prefilled))
    assert {s["step"].item() for s in prefilled.state.values()} == {0.0} and len(prefilled.state) == 2
    for _ in range(2):
        for p, q in zip(params, twins, strict=True):
            p.grad = q.grad = torch.ones_like(p)
        prefilled.step()
        fresh.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins, strict=True))
