"""Each --rm-type on fixed answers: what it accepts, what it refuses."""

from __future__ import annotations

import pytest

from buffers.types import Prompt, Sample
from launchers.rewards import RM_TYPES, exact_reward, f1_reward, gsm8k_reward, last_boxed, math_reward
from runtime.plugins import load_function


def score(fn, label: str, response: str) -> float:  # noqa: ANN001
    return fn(Prompt(index=0, input_ids=[1], label=label), Sample(group_id=0, index=0, prompt_ids=[1],
                                                                   response_text=response))


@pytest.mark.parametrize("label, response, want", [
    ("12", "3 + 9 = 12", 1.0),  # the last number
    ("12", "The sum is 12.", 1.0),
    ("12", "12 is wrong, it is 13", 0.0),
    ("12", "so the answer is \\boxed{12} (not 13)", 1.0),  # a boxed answer wins over later numbers
    ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),  # math-verify: equal values in other forms
    ("0.5", "It is 1/2", 1.0),
    ("x^2+1", "\\boxed{1 + x^2}", 1.0),
    ("1,234", "1234", 1.0),
    ("7", "I do not know", 0.0),
    ("7", "", 0.0),
])
def test_math(label: str, response: str, want: float) -> None:
    assert score(math_reward, label, response) == want


def test_math_runs_off_the_main_thread() -> None:
    """Rewards run on worker threads, where math-verify's SIGALRM timeout would raise."""
    import threading

    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(score(math_reward, "12", "\\boxed{12}")))
    t.start()
    t.join(timeout=60)
    assert out == [1.0]


@pytest.mark.parametrize("label, response, want", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "3 + 4 = 7 so\n#### 7", 1.0),  # GSM8K's whole worked answer as label
    ("72", "The answer is 72.", 1.0),
    ("1,000", "#### $1000", 1.0),
    ("72", "#### 71 (I said 72 before)", 0.0),  # the number after #### decides
    ("72", "no idea", 0.0),
    ("2.50", "#### 2.5", 1.0),
])
def test_gsm8k(label: str, response: str, want: float) -> None:
    assert score(gsm8k_reward, label, response) == want


def test_exact_and_f1() -> None:
    assert score(exact_reward, "Paris", "  Paris\n") == 1.0
    assert score(exact_reward, "Paris", "paris") == 0.0
    assert score(f1_reward, "the Eiffel Tower", "Eiffel tower!") == 1.0  # case, punctuation, articles
    assert score(f1_reward, "Eiffel Tower", "the tower") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert score(f1_reward, "Paris", "London") == 0.0


def test_every_rm_type_loads_as_a_plugin() -> None:
    assert set(RM_TYPES) == {"math", "gsm8k", "exact", "f1"}
    for path in RM_TYPES.values():
        assert callable(load_function(path, flag="--rm-type"))
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{a{b}c}") == "a{b}c"
