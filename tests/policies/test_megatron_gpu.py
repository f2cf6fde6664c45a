"""The Megatron learner on a GPU (TP=1): megatron's DDP, distributed optimizer and schedules, bf16
compute over fp32 master weights, against the HF learner on the same weights and batch; then the
default recipe's loop with ``--train-backend megatron`` on the one GPU. Skipped without CUDA (the
CPU parity tests are in test_megatron_trainer.py); run on the lent machine by
benchmarks/megatron_gpu_session.sh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (megatron's GPU path)")

from policies.megatron import convert  # noqa: E402
from policies.megatron.model import Parallelism  # noqa: E402
from policies.megatron.trainer import MegatronTrainer  # noqa: E402
from policies.model import qwen3_config  # noqa: E402
from policies.trainer import PolicyTrainer  # noqa: E402
from runtime.config import GrpoConfig, OptimizerConfig  # noqa: E402
from tests.policies.test_trainer import make_group  # noqa: E402

GRPO = GrpoConfig(use_tis=True, entropy_coef=0.01)
OPTIM = OptimizerConfig(lr=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = qwen3_config(vocab_size=4096, num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=768, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, kv_channels=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3") / "m"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def batch():
    g = torch.Generator().manual_seed(1)
    groups = []
    for gid in range(4):
        prompt = torch.randint(3, 4096, (32,), generator=g).tolist()
        answers = [torch.randint(3, 4096, (int(n),), generator=g).tolist() for n in (60, 90, 120, 150)]
        groups.append(make_group(prompt, answers, [0.0, 1.0, 0.5, 0.25], version=gid % 2, behavior_logp=-8.0))
    return groups


def test_one_step_matches_the_hf_learner_within_bf16(checkpoint):
    """Same weights, batch and objective; both learners compute in bf16 over fp32 weights, so the
    figures agree to bf16 rounding and every gradient points the same way (megatron's main_grad
    against HF's .grad, compared under HF names)."""
    hf = PolicyTrainer(checkpoint, grpo=GRPO, optim=OPTIM, temperature=1.0, pad_id=0, device="cuda")
    want = hf.step(batch(), 1)
    hf_grads = {n: p.grad.detach().double() for n, p in hf.model.named_parameters()}
    del hf
    torch.cuda.empty_cache()
    trainer = MegatronTrainer(checkpoint, grpo=GRPO, optim=OPTIM, temperature=1.0, pad_id=0, device="cuda",
                              max_tokens_per_gpu=512)  # several micro-batches through megatron's schedule
    try:
        got = trainer.step(batch(), 1)
        assert got.n_tokens == want.n_tokens and got.n_samples == want.n_samples
        for field in ("loss", "entropy", "grad_norm", "tis_mean"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=3e-2, abs=1e-3), field
        grads = convert.hf_gradients(trainer.model, transformers.AutoConfig.from_pretrained(checkpoint))
        cosines = {name: torch.nn.functional.cosine_similarity(t.flatten(), hf_grads[name].flatten(), dim=0).item()
                   for name, t in grads.items()}
        assert cosines.keys() == hf_grads.keys()
        assert min(cosines.values()) > 0.99, min(cosines, key=cosines.get)
        out = transformers.AutoModelForCausalLM.from_pretrained(trainer.save_weights(checkpoint.parent / "export"))
        assert {k: v.shape for k, v in out.state_dict().items()} == {
            k: v.shape for k, v in transformers.AutoModelForCausalLM.from_pretrained(checkpoint).state_dict().items()}
    finally:
        trainer.close()


def test_recompute_and_a_distributed_checkpoint_resume_exactly(checkpoint, tmp_path):
    """Full activation recompute (its backward reruns layers on autograd's thread) gives the step the
    plain learner takes; megatron's distributed checkpoint of model and distributed optimizer brings
    the next step back exactly (the optimizer's moments came back)."""
    plain = MegatronTrainer(checkpoint, grpo=GRPO, optim=OPTIM, temperature=1.0, pad_id=0, device="cuda")
    try:
        want_first = plain.step(batch(), 1)
    finally:
        plain.close()
    first = MegatronTrainer(checkpoint, grpo=GRPO, optim=OPTIM, temperature=1.0, pad_id=0, device="cuda",
                            parallelism=Parallelism(recompute_granularity="full"))
    try:
        got_first = first.step(batch(), 1)
        assert got_first.loss == pytest.approx(want_first.loss, rel=1e-3, abs=1e-6)
        assert got_first.grad_norm == pytest.approx(want_first.grad_norm, rel=1e-2)
        first.save_checkpoint(tmp_path / "ckpt")
        want = first.step(batch(), 2)
    finally:
        first.close()
    resumed = MegatronTrainer(tmp_path / "ckpt" / "model", grpo=GRPO, optim=OPTIM, temperature=1.0, pad_id=0,
                              device="cuda", version=2, parallelism=Parallelism(recompute_granularity="full"))
    try:
        resumed.load_checkpoint(tmp_path / "ckpt")
        got = resumed.step(batch(), 2)
        assert got.loss == pytest.approx(want.loss, rel=1e-5)
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-3)  # bf16 backward kernels may sum in any order
    finally:
        resumed.close()


def test_the_default_gpu_loop_runs_with_the_megatron_learner(tmp_path):
    """The default recipe, learner and engine sharing the GPU (CUDA IPC weights): steps complete,
    the staleness bound holds, the engine serves each new version."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.launch", "--train-backend", "megatron", "--actor-num-gpus-per-node", "1",
         "--rollout-num-gpus", "1", "--colocate", "--num-rollout", "8", "--eval-interval", "4", "--max-staleness",
         "1", "--run-dir", str(run), "--progress", "off"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["staleness_max_observed"] <= 1
