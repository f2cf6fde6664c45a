"""One real optimizer step on a tiny random model moves probability toward positive advantage."""

import torch

from buffers.types import Group, Prompt, Sample, Status
from policies.model import qwen3_config, write_random_checkpoint
from policies.trainer import PolicyTrainer, collate
from runtime.config import GrpoConfig, OptimizerConfig


def make_group(prompt, responses, rewards, version=0):
    samples = []
    for i, (resp, r) in enumerate(zip(responses, rewards)):
        s = Sample(group_id=0, index=i, prompt_ids=prompt)
        s.add_segment(resp, [-2.0] * len(resp), version)
        s.status, s.reward = Status.COMPLETED, r
        samples.append(s)
    return Group(group_id=0, prompt=Prompt(0, prompt), samples=samples, admitted_version=0, deadline_version=0)


def test_collate_aligns_response_tokens_with_shifted_positions():
    s = Sample(group_id=0, index=0, prompt_ids=[1, 5, 6])
    s.add_segment([7, 2], [-0.5, -0.25], 0)
    tb = collate([s], [1.0], pad_id=0)
    # position j predicts token j+1: response tokens 7, 2 are predicted at positions 2, 3
    assert tb.mask.tolist() == [[0, 0, 1, 1]]
    assert tb.input_ids[0, 1:][tb.mask[0].bool()].tolist() == [7, 2]
    assert tb.behavior_logp[0, 2:].tolist() == [-0.5, -0.25]


def test_a_step_raises_logprob_of_rewarded_response(copy_task, tmp_path):
    tok = copy_task.tokenizer
    cfg = qwen3_config(vocab_size=len(tok), num_layers=1, hidden_size=32, num_attention_heads=2,
                       num_query_groups=1, ffn_hidden_size=64, max_position_embeddings=32,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = write_random_checkpoint(tmp_path / "m", cfg, tok, seed=0)
    trainer = PolicyTrainer(path, grpo=GrpoConfig(use_tis=True), optim=OptimizerConfig(lr=1e-2),
                            temperature=1.0, pad_id=0)
    good, bad = [4, 5, 2], [6, 6, 2]
    group = make_group([1, 4, 5, 13], [good, bad], [1.0, 0.0])

    def logp(resp):
        tb = collate([group.samples[0 if resp is good else 1]], [0.0], pad_id=0)
        with torch.no_grad():
            lp, _ = trainer._token_logp(trainer.model, tb)
        return (lp * tb.mask).sum().item()

    before = logp(good), logp(bad)
    stats = trainer.step([group])
    after = logp(good), logp(bad)
    assert after[0] > before[0] and after[1] < before[1]
    assert stats.n_tokens == 6 and stats.n_samples == 2 and stats.tis_mean > 0
    saved = trainer.save_weights(tmp_path / "v1")
    assert (saved / "model.safetensors").exists()
