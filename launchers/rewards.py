"""Built-in verifiers (``--rm-type``): reward 1.0 for an answer matching the prompt's label, else 0.0.

- ``math``: the answer is the last ``\\boxed{...}`` of the response or, without one, its last
  number; it and the label are compared by Hugging Face's math-verify (``1/2`` = ``0.5`` =
  ``\\frac{1}{2}``). math-verify's own timeout uses SIGALRM, which only works on the main thread;
  rewards run on worker threads with the scorer's ``--reward-timeout`` instead, so it is off here.
- ``gsm8k``: GSM8K's convention: the number right after the last ``####`` (else the last number), and
  the label's (the dataset's whole worked answer, or just the number) compared as numbers.
- ``exact``: the stripped response equals the stripped label.
- ``f1``: SQuAD's token F1 between response and label (lowercased, punctuation and articles
  removed): partial credit in [0, 1].
"""

from __future__ import annotations

import collections
import logging
import re
import string
from fractions import Fraction

from buffers.types import Prompt, Sample

RM_TYPES = {name: f"launchers.rewards:{name}_reward" for name in ("math", "gsm8k", "exact", "f1")}

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_PLAIN_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")  # 1,234.5: the commas group digits


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def math_reward(prompt: Prompt, sample: Sample) -> float:
    from math_verify import parse, verify  # imported on first use: a heavy import (sympy)

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its warning that our timeout is off, per call

    answer = last_boxed(sample.response_text)
    if answer is None:
        answer = last_number(sample.response_text)
    if answer is None or not prompt.label.strip():
        return 0.0
    gold = parse(_as_math(prompt.label), parsing_timeout=None)
    pred = parse(_as_math(answer), parsing_timeout=None)
    return 1.0 if gold and pred and verify(gold, pred, timeout_seconds=None) else 0.0


def _as_math(text: str) -> str:
    """math-verify reads LaTeX between ``$``; a bare expression is wrapped so both forms parse."""
    text = text.strip()
    if _PLAIN_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    return text if text.startswith("$") or "\\boxed" in text else f"${text}$"


def gsm8k_reward(prompt: Prompt, sample: Sample) -> float:
    want, got = _gsm8k_number(prompt.label), _gsm8k_number(sample.response_text)
    return 1.0 if want is not None and want == got else 0.0


def _gsm8k_number(text: str) -> Fraction | None:
    if "####" in text:  # the number right after the last ####
        found = _NUMBER.search(text.rsplit("####", 1)[1].replace("$", ""))
        found = found.group().replace(",", "") if found else None
    else:
        found = last_number(text)
    if found is None:
        return None
    try:
        return Fraction(found)
    except (ValueError, ZeroDivisionError):
        return None


def exact_reward(prompt: Prompt, sample: Sample) -> float:
    return 1.0 if sample.response_text.strip() == prompt.label.strip() else 0.0


def f1_reward(prompt: Prompt, sample: Sample) -> float:
    got, want = _squad_tokens(sample.response_text), _squad_tokens(prompt.label)
    common = sum((collections.Counter(got) & collections.Counter(want)).values())
    if not got or not want:
        return float(got == want)
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def _squad_tokens(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()
