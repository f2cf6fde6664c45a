"""Learning-rate schedules (Megatron's, as Miles uses them): values at the warm-up's end, mid-decay
and the end, the rate a real trainer steps with, and the same rates after a checkpoint resume."""

import math

import pytest
import torch

from policies.lr_schedule import LrSchedule
from policies.trainer import PolicyTrainer
from runtime.config import GrpoConfig, OptimizerConfig
from tests.policies.test_trainer import make_group, tiny_checkpoint


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_warmup_then_decay_to_min_lr(style):
    s = LrSchedule(lr=1e-3, min_lr=1e-4, style=style, warmup_iters=10, decay_iters=110)
    assert s.at(0) == 0.0  # Megatron's first warm-up step
    assert s.at(5) == pytest.approx(5e-4)
    assert s.at(10) == pytest.approx(1e-3)  # warm-up end: the peak
    mid = 1e-4 + 0.5 * (1e-3 - 1e-4)  # halfway through the decay both styles are halfway down
    assert s.at(60) == pytest.approx(mid)
    quarter = 0.75 if style == "linear" else 0.5 * (math.cos(math.pi / 4) + 1)
    assert s.at(35) == pytest.approx(1e-4 + quarter * 9e-4)
    assert s.at(110) == pytest.approx(1e-4)  # the end
    assert s.at(500) == 1e-4  # past it


def test_constant_ignores_decay_and_bad_bounds_are_refused():
    s = LrSchedule(lr=2e-5, min_lr=0.0, style="constant", warmup_iters=4, decay_iters=8)
    assert [s.at(i) for i in (2, 4, 8, 100)] == pytest.approx([1e-5, 2e-5, 2e-5, 2e-5])
    with pytest.raises(ValueError, match="min_lr"):
        LrSchedule(lr=1e-5, min_lr=1e-4)
    with pytest.raises(ValueError, match="warmup_iters"):
        LrSchedule(lr=1e-5, style="cosine", warmup_iters=5, decay_iters=5)


def _optim() -> OptimizerConfig:
    return OptimizerConfig(lr=1e-2, min_lr=1e-3, lr_decay_style="cosine", lr_warmup_iters=2, lr_decay_iters=6)


def _steps(trainer, versions):
    group = make_group([1, 4, 5, 13], [[4, 5, 2], [6, 6, 2]], [1.0, 0.0], version=versions[0])
    out = []
    for v in versions:
        for s in group.samples:
            s.token_versions = [v] * len(s.token_versions)
        out.append(trainer.step([group], version=v).lr)
    return out


def test_trainer_steps_with_the_schedule_and_resumes_it_exactly(copy_task, tmp_path):
    path = tiny_checkpoint(copy_task, tmp_path)
    kw = dict(grpo=GrpoConfig(), optim=_optim(), temperature=1.0, pad_id=0)
    torch.manual_seed(0)
    whole = PolicyTrainer(path, **kw)
    expected = [LrSchedule(lr=1e-2, min_lr=1e-3, style="cosine", warmup_iters=2, decay_iters=6).at(v) for v in range(6)]
    assert _steps(whole, range(6)) == expected
    assert [g["lr"] for g in whole.optimizer.param_groups] == [expected[-1]]

    torch.manual_seed(0)
    first = PolicyTrainer(path, **kw)
    _steps(first, range(3))
    first.save_checkpoint(tmp_path / "ckpt")
    assert torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=True)["lr_schedule"]["style"] == "cosine"
    resumed = PolicyTrainer(tmp_path / "ckpt" / "model", **kw, version=3)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert _steps(resumed, range(3, 6)) == expected[3:]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name  # the resumed run is the uninterrupted one
