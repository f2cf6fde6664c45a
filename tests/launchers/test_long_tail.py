"""The long-tailed recipe: its target lengths, its reward, and that its defaults admit the tail."""

import random
import statistics

from buffers.types import Prompt, Sample
from launchers.recipes import get_recipe
from launchers.recipes.long_tail import MAX_LEN, make_task, reward, target_length


def test_target_lengths_are_long_tailed():
    rng = random.Random(0)
    lengths = sorted(target_length(rng) for _ in range(50_000))
    q = lambda p: lengths[int(p * len(lengths))]  # noqa: E731
    assert q(0.5) == 3 and 10 <= q(0.9) <= 16
    assert q(0.99) >= 20 * q(0.5)  # one answer in a hundred is tens of times the median
    assert 0.01 <= sum(n >= 64 for n in lengths) / len(lengths) <= 0.025
    assert lengths[0] == 2 and lengths[-1] == MAX_LEN  # the cap is reached, never passed
    heavier = [target_length(rng, alpha=0.5) for _ in range(20_000)]
    assert statistics.median(heavier) > 2 * q(0.5)


def test_prompts_state_the_target_and_the_stream_is_reproducible():
    task = make_task(seed=3, eval_num_prompts=50)
    p = task.train_prompt(7)
    assert p.text == " ".join(["<bos>", *p.label, "="])
    assert task.tokenizer.decode(p.input_ids) == p.text
    assert make_task(seed=3, eval_num_prompts=50).train_prompt(7) == p
    assert not set(task.eval_prompts[0].label) - set("0123456789")


def _answer(task, text):
    ids = task.tokenizer.encode(text)
    return Sample(group_id=0, index=0, prompt_ids=[], response_ids=ids, response_text=text)


def test_reward_scores_length_at_every_scale_and_content():
    task = make_task(seed=0, eval_num_prompts=10)
    for target in (2, 3, 40, MAX_LEN):
        prompt = Prompt(index=0, input_ids=[], label=str(target))
        exact = _answer(task, " ".join(["x"] * target + ["<eos>"]))
        assert reward(prompt, exact) == 1.0
        if target >= 3:
            short = reward(prompt, _answer(task, " ".join(["x"] * (target // 2) + ["<eos>"])))
            long = reward(prompt, _answer(task, " ".join(["x"] * (2 * target) + ["<eos>"])))
            assert 0.4 < short < 1.0 and 0.4 < long < 1.0  # off by a factor two: the same partial credit
        wrong = _answer(task, " ".join(["7"] * target + ["<eos>"]))
        assert reward(prompt, wrong) == 0.8  # right length, wrong content
    assert reward(prompt, _answer(task, "<eos>")) == 0.0


def test_recipe_defaults_admit_the_longest_answer():
    for name in ("long_tail", "long_tail_warmup"):
        recipe = get_recipe(name)
        longest_prompt = len(recipe.make_task(seed=0, eval_num_prompts=10).tokenizer.encode(f"<bos> {MAX_LEN} ="))
        max_response = recipe.defaults["rollout"]["rollout_max_response_len"]
        assert max_response >= MAX_LEN + 1  # the answer and its <eos>
        assert recipe.defaults["model"]["max_position_embeddings"] >= longest_prompt + max_response - 1
