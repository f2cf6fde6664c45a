"""Real optimizer steps on a tiny random model: the update's direction and its off-policy weights."""

import pytest

from buffers.types import Group, Prompt, Sample, Status
from policies.advantages import grpo_advantages
from policies.model import qwen3_config, write_random_checkpoint
from policies.trainer import PolicyTrainer, collate
from policies.trainer_process import TrainerProcess
from runtime.config import GrpoConfig, OptimizerConfig


def make_group(prompt, responses, rewards, version=0, behavior_logp=-2.0):
    """``version``: one int for every token, or a list per response of per-token versions."""
    samples = []
    for i, (resp, r) in enumerate(zip(responses, rewards)):
        s = Sample(group_id=0, index=i, prompt_ids=prompt)
        s.add_segment(resp, [behavior_logp] * len(resp), version if isinstance(version, int) else version[i])
        s.status, s.reward = Status.COMPLETED, r
        samples.append(s)
    return Group(group_id=0, prompt=Prompt(0, prompt), samples=samples, admitted_version=0, deadline_version=0)


def tiny_checkpoint(copy_task, tmp_path):
    tok = copy_task.tokenizer
    cfg = qwen3_config(vocab_size=len(tok), num_layers=1, hidden_size=32, num_attention_heads=2,
                       num_query_groups=1, ffn_hidden_size=64, max_position_embeddings=32,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return write_random_checkpoint(tmp_path / "m", cfg, tok, seed=0)


def test_collate_aligns_response_tokens_with_shifted_positions():
    s = Sample(group_id=0, index=0, prompt_ids=[1, 5, 6])
    s.add_segment([7], [-0.5], 3)
    s.add_segment([2], [-0.25], 4)
    tb = collate([s], [1.0], pad_id=0, version=5)
    # position j predicts token j+1: response tokens 7, 2 are predicted at positions 2, 3
    assert tb.mask.tolist() == [[0, 0, 1, 1]]
    assert tb.input_ids[0, 1:][tb.mask[0].bool()].tolist() == [7, 2]
    assert tb.behavior_logp[0, 2:].tolist() == [-0.5, -0.25]
    assert tb.staleness.tolist() == [[0, 0, 2, 1]]
    with pytest.raises(ValueError, match="above the training version"):
        collate([s], [1.0], pad_id=0, version=3)


def test_a_step_raises_logprob_of_rewarded_response(copy_task, tmp_path):
    path = tiny_checkpoint(copy_task, tmp_path)
    trainer = PolicyTrainer(path, grpo=GrpoConfig(use_tis=True), optim=OptimizerConfig(lr=1e-2),
                            temperature=1.0, pad_id=0)
    good, bad = [4, 5, 2], [6, 6, 2]
    group = make_group([1, 4, 5, 13], [good, bad], [1.0, 0.0])

    def logp(resp):
        tb = collate([group.samples[0 if resp is good else 1]], [0.0], pad_id=0, version=0)
        lp, _ = trainer.token_logprobs(tb)
        return (lp * tb.mask).sum().item()

    before = logp(good), logp(bad)
    stats = trainer.step([group], version=0)
    after = logp(good), logp(bad)
    assert after[0] > before[0] and after[1] < before[1]
    assert stats.n_tokens == 6 and stats.n_samples == 2 and stats.tis_mean > 0
    assert stats.correction["s0/tokens"] == 6 and set(stats.correction) == {
        "s0/tokens", "s0/is_mean", "s0/clip_frac", "s0/ess"}
    saved = trainer.save_weights(tmp_path / "v1")
    assert (saved / "model.safetensors").exists()


def test_staleness_caps_bound_a_stale_token_tighter_in_the_step(copy_task, tmp_path):
    path = tiny_checkpoint(copy_task, tmp_path)
    grpo = GrpoConfig(use_tis=True, tis_clip_by_staleness=[2.0, 1.2])
    trainer = PolicyTrainer(path, grpo=grpo, optim=OptimizerConfig(lr=1e-2), temperature=1.0, pad_id=0)
    # trained at version 3; per token: fresh (v3, staleness 0) or stale (v2, staleness 1)
    versions = [[3, 3, 3], [3, 2, 2], [2, 2, 2]]
    # the engine's logprobs far below the learner's: every raw weight is huge, so each sits at its cap
    group = make_group([1, 4, 5, 13], [[4, 5, 2], [6, 6, 2], [7, 8, 2]], [1.0, 0.0, 0.0], versions,
                       behavior_logp=-30.0)
    stats = trainer.step([group], version=3)
    c = stats.correction
    assert (c["s0/tokens"], c["s0/is_mean"], c["s0/clip_frac"]) == (4, pytest.approx(2.0), 1.0)
    assert (c["s1/tokens"], c["s1/is_mean"], c["s1/clip_frac"]) == (5, pytest.approx(1.2), 1.0)
    # the weights multiply the loss: at the step the PPO ratio is 1, so loss = -sum(adv * w) / tokens
    adv = grpo_advantages(group.rewards, [True] * 3)
    weights = [[2.0 if v == 3 else 1.2 for v in row] for row in versions]
    assert stats.loss == pytest.approx(-sum(a * sum(w) for a, w in zip(adv, weights)) / 9, rel=1e-5)
    assert abs(stats.loss) > 0.1  # unweighted, the advantages would cancel to 0


def test_trainer_process_steps_at_the_learners_version(copy_task, tmp_path):
    trainer = TrainerProcess(tiny_checkpoint(copy_task, tmp_path), grpo=GrpoConfig(), optim=OptimizerConfig(),
                             temperature=1.0, pad_id=0)
    try:
        stats = trainer.step([make_group([1, 4, 5, 13], [[4, 5, 2], [6, 6, 2]], [1.0, 0.0], 1)], 2)
    finally:
        trainer.close()
    assert stats.n_tokens == 6 and stats.correction["s1/tokens"] == 6
