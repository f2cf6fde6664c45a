"""Chat templates applied to *new* messages only, for multi-turn episodes (token-in/token-out).

A multi-turn transcript is never re-rendered: re-rendering the history through the template can
change it (Qwen3's template strips earlier think blocks, prime-rl#1334; consecutive tool messages
merge, slime#2263), so the tokens the learner trains on would not be those the engine saw. Instead
the template renders a fixed stand-in history plus the new messages, and the text past the
stand-in's end is what is appended. Cut where the assistant's end-of-turn token ends (not where the
stand-in's text ends), so the separator the template writes after that token (ChatML's newline,
the token verl#6719 drops) is part of the new text, since the engine stopped on the token itself.
"""

from __future__ import annotations

from typing import Any

# a stand-in history: a system turn (so the template adds no default one) and one exchange
_ANSWER = "stand-in-answer"
_STAND_IN = [{"role": "system", "content": "stand-in-system"}, {"role": "user", "content": "stand-in-user"},
             {"role": "assistant", "content": _ANSWER}]


class TemplateError(ValueError):
    """The tokenizer's template cannot be applied incrementally (or there is none)."""


def render(tokenizer: Any, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
           add_generation_prompt: bool = True) -> str:
    """The whole conversation through the template: an episode's first prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def continuation(tokenizer: Any, messages: list[dict[str, Any]], *, after_turn_end: bool = True) -> str:
    """The text that follows an assistant turn to add ``messages`` and the next generation prompt.

    ``after_turn_end``: the transcript ends with the assistant's end-of-turn token (the engine
    stopped on it); False: it was cut by a bound, and the end-of-turn text comes first."""
    head = render(tokenizer, _STAND_IN, add_generation_prompt=False)
    full = render(tokenizer, _STAND_IN + messages)
    if not full.startswith(head):
        raise TemplateError("the template renders the same history differently when messages follow it")
    end = _turn_end(tokenizer, head)
    return full[end if after_turn_end else head.rindex(_ANSWER) + len(_ANSWER):]


def _turn_end(tokenizer: Any, head: str) -> int:
    """Where the stand-in assistant turn's end-of-turn token ends in ``head``."""
    after = head.rindex(_ANSWER) + len(_ANSWER)
    eos = tokenizer.eos_token or ""
    at = head.find(eos, after) if eos else -1
    return at + len(eos) if at >= 0 else len(head)
