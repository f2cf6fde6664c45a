"""SFT: the assistant-only loss mask from two chat templates' turn boundaries (multi-turn, built
here, no download), and the SFT loss with and without --calculate-per-token-loss against a
float64 reference, whole and split into micro-batches."""

import pytest
import torch

from buffers.types import Group, Prompt, Sample, Status
from policies.chat import ChatFormatError
from policies.model import load_causal_lm
from policies.sft import assistant_mask, sft_loss, token_weights
from policies.tokenizer import word_tokenizer
from policies.trainer import PolicyTrainer
from runtime.config import GrpoConfig, OptimizerConfig
from tests.policies.test_trainer import tiny_checkpoint

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = ["system", "user", "assistant", "you", "add", "what", "is", "1", "2", "3", "+", "=", "and", "then"]
CONVERSATION = [
    {"role": "system", "content": "you add"},
    {"role": "user", "content": "what is 1 + 2"},
    {"role": "assistant", "content": "1 + 2 = 3"},
    {"role": "user", "content": "and then 3 + 3"},
    {"role": "assistant", "content": "3 + 3 = then"},
]


def tokenizer(template: str):
    tok = word_tokenizer(WORDS)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template, end", [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")], ids=["chatml", "llama3"])
def test_only_assistant_turns_and_their_end_token_are_trained(template, end):
    tok = tokenizer(template)
    ids, mask = assistant_mask(tok, CONVERSATION)
    tokens = tok.convert_ids_to_tokens(ids)
    assert len(ids) == len(mask)
    trained = [t for t, m in zip(tokens, mask) if m]
    assert trained == "1 + 2 = 3".split() + [end] + "3 + 3 = then".split() + [end]
    # every assistant token is trained, in place: the two runs sit right after each assistant header
    runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert [tokens[i - 1] for i in runs] == (["assistant", "assistant"] if template is CHATML
                                              else ["<|end_header_id|>", "<|end_header_id|>"])
    assert tok.decode(ids, skip_special_tokens=False).count("you add") == 1  # the whole conversation, once


def test_conversations_the_template_cannot_split_are_refused():
    rewrites = tokenizer(CHATML.replace("{{ m['content'] }}", "{{ m['content'] }}{% if loop.last %} and{% endif %}"))
    with pytest.raises(ChatFormatError, match="differently"):
        assistant_mask(rewrites, CONVERSATION)
    with pytest.raises(ChatFormatError, match="assistant message"):
        assistant_mask(tokenizer(CHATML), CONVERSATION[:2])


def test_sft_loss_and_its_micro_batch_weights_match_float64():
    torch.manual_seed(0)
    logp = -torch.rand(3, 7, dtype=torch.float64) * 3
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    rows = [logp[i][mask[i].bool()].tolist() for i in range(3)]
    per_token = -sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    per_sample = -sum(sum(r) / len(r) for r in rows) / 3
    assert sft_loss(logp, mask, per_token=True).item() == pytest.approx(per_token, rel=1e-12)
    assert sft_loss(logp, mask, per_token=False).item() == pytest.approx(per_sample, rel=1e-12)
    for per in (True, False):  # two micro-batches weighted by the whole step's counts add up to the step
        parts = [-(logp[s] * token_weights(mask[s], per_token=per, step_tokens=9, step_samples=3)).sum()
                 for s in (slice(0, 2), slice(2, 3))]
        assert sum(parts).item() == pytest.approx(per_token if per else per_sample, rel=1e-12)


def _sft_group(gid: int, prompt: list[int], answer: list[int], mask: list[int]) -> Group:
    s = Sample(group_id=gid, index=0, prompt_ids=prompt)
    s.add_segment(answer, [0.0] * len(answer), 0)
    s.loss_mask, s.status = list(mask), Status.COMPLETED
    return Group(group_id=gid, prompt=Prompt(gid, prompt), samples=[s], admitted_version=0, deadline_version=1)


@pytest.mark.parametrize("per_token", [True, False])
def test_trainer_sft_step_loss_is_the_float64_cross_entropy(copy_task, tmp_path, per_token):
    path = tiny_checkpoint(copy_task, tmp_path)
    groups = [_sft_group(0, [1, 4], [5, 6, 7, 2], [1, 1, 1, 1]), _sft_group(1, [1, 8, 9, 4], [5, 2], [1, 1]),
              _sft_group(2, [1, 5], [6, 13, 7, 8, 2], [1, 0, 0, 1, 1])]  # a masked stretch mid-answer (a user turn)
    reference = load_causal_lm(path, dtype=torch.float64).eval()
    rows = []
    with torch.no_grad():
        for g in groups:
            s = g.samples[0]
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logp = torch.log_softmax(reference(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            trained = logp[len(s.prompt_ids) - 1:][torch.tensor(s.loss_mask, dtype=torch.bool)]
            rows.append(trained.tolist())
    want = (-sum(sum(r) for r in rows) / sum(len(r) for r in rows) if per_token
            else -sum(sum(r) / len(r) for r in rows) / len(rows))
    trainer = PolicyTrainer(path, grpo=GrpoConfig(loss_type="sft_loss", calculate_per_token_loss=per_token),
                            optim=OptimizerConfig(lr=1e-3), temperature=0.7, pad_id=0)  # temperature: unused by SFT
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stats = trainer.step(groups, version=0)
    assert stats.loss == pytest.approx(want, rel=1e-5)
    assert stats.n_tokens == 4 + 2 + 3 and stats.n_samples == 3
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    again = trainer.step(groups, version=1)
    assert again.loss < stats.loss  # the step lowered the loss it was taken on
