"""Chat templates and stop tokens of a Hugging Face model: how a prompt becomes token ids.

A prompt is either plain text or a conversation (OpenAI ``messages``: a list of ``{"role",
"content"}`` dicts). With a chat template (Miles's ``--apply-chat-template``) text becomes one
user turn, the model's template renders the conversation with the assistant's opening
(``add_generation_prompt``), and the rendered text is tokenized without adding special tokens
(the template already wrote them, e.g. SmolLM2's ``<|im_start|>``). Without one, text is
tokenized as it is (the tokenizer's own BOS rules apply) and a conversation is refused: there is
no right way to flatten it. ``template_kwargs`` go to the template (``enable_thinking`` for
Qwen3, a ``tools`` list, ...).

Multi-turn callers render a conversation so far with ``render_messages`` and continue it with
``continuation_ids``, which tokenizes only what a turn adds (token-in/token-out: earlier tokens
are never re-tokenized).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

Message = Mapping[str, Any]
PromptInput = str | Sequence[Message]


class ChatFormatError(ValueError):
    """A prompt the tokenizer cannot render (a bad message, no chat template): one line."""


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as a list of dicts with a string ``role`` and a string (or list) ``content``."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"message {i} is a {type(m).__name__}, not an object")
        if not isinstance(m.get("role"), str):
            raise ChatFormatError(f"message {i} has no string 'role'")
        if not isinstance(m.get("content"), (str, list)) and "tool_calls" not in m:
            raise ChatFormatError(f"message {i} has no string 'content'")
        out.append(dict(m))
    return out


def render_messages(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *,
                    add_generation_prompt: bool = True, template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The conversation as the model's chat template writes it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("the tokenizer has no chat template (drop --apply-chat-template, or give a model "
                              "directory whose tokenizer_config.json or chat_template.jinja has one)")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **dict(template_kwargs or {}))
    except Exception as e:  # jinja errors (a template that raises on a role it does not know, ...)
        raise ChatFormatError(f"the chat template failed: {type(e).__name__}: {e}") from None


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: PromptInput, *, apply_chat_template: bool,
                template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The text the model sees for ``prompt`` (module doc: the rules)."""
    if isinstance(prompt, str):
        if not apply_chat_template:
            return prompt
        return render_messages(tokenizer, [{"role": "user", "content": prompt}], template_kwargs=template_kwargs)
    if not apply_chat_template:
        raise ChatFormatError("a messages prompt needs --apply-chat-template")
    return render_messages(tokenizer, check_messages(list(prompt)), template_kwargs=template_kwargs)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: PromptInput, *, apply_chat_template: bool,
               template_kwargs: Mapping[str, Any] | None = None) -> tuple[str, list[int]]:
    """(text, token ids) of ``prompt``: a template's output is tokenized without special tokens."""
    text = prompt_text(tokenizer, prompt, apply_chat_template=apply_chat_template, template_kwargs=template_kwargs)
    ids = tokenizer(text, add_special_tokens=not apply_chat_template)["input_ids"]
    if not ids:
        raise ChatFormatError("the prompt is empty after tokenization")
    return text, list(ids)


def continuation_ids(tokenizer: PreTrainedTokenizerBase, before: Sequence[Message], after: Sequence[Message], *,
                     template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids of what ``after`` (which extends ``before``) adds to the rendered conversation,
    ending with the assistant's opening: for a turn appended to a token history that is never
    re-tokenized. Raises when the template rewrites the earlier text (some templates drop old
    reasoning): then the history is not a prefix and the caller must decide."""
    head = render_messages(tokenizer, before, add_generation_prompt=False, template_kwargs=template_kwargs)
    full = render_messages(tokenizer, after, add_generation_prompt=True, template_kwargs=template_kwargs)
    if not full.startswith(head):
        raise ChatFormatError("the chat template renders the earlier turns differently once a turn is added")
    return list(tokenizer(full[len(head):], add_special_tokens=False)["input_ids"])


# a stand-in history for ``turn_continuation``: a system turn (so the template adds no default one)
# and one exchange
_ANSWER = "stand-in-answer"
_STAND_IN = [{"role": "system", "content": "stand-in-system"}, {"role": "user", "content": "stand-in-user"},
             {"role": "assistant", "content": _ANSWER}]


def turn_continuation(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *,
                      after_turn_end: bool = True, template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The text that follows an assistant turn the *engine* wrote to add ``messages`` and the next
    generation prompt, for a multi-turn episode (``actors.conversation``) whose history is never
    rendered again: the template renders a fixed stand-in history plus ``messages``, and the text
    past the stand-in is kept. Cut where the assistant's end-of-turn token ends, not where the
    rendered history ends: the engine stopped on that token, so the separator the template writes
    after it (ChatML's newline, the one verl#6719 drops) belongs to the new text.
    ``after_turn_end`` False: the turn was cut by a length bound, and its end-of-turn text comes first."""
    head = render_messages(tokenizer, _STAND_IN, add_generation_prompt=False, template_kwargs=template_kwargs)
    full = render_messages(tokenizer, _STAND_IN + list(messages), template_kwargs=template_kwargs)
    if not full.startswith(head):
        raise ChatFormatError("the chat template renders the earlier turns differently once a turn is added")
    answer_end = head.rindex(_ANSWER) + len(_ANSWER)
    if not after_turn_end:
        return full[answer_end:]
    eos = tokenizer.eos_token or ""
    at = head.find(eos, answer_end) if eos else -1
    return full[at + len(eos) if at >= 0 else len(head):]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model_dir: str | Path | None = None) -> list[int]:
    """Token ids that end an answer: the generation config's ``eos_token_id`` (an int or a list;
    chat models list their end-of-turn token there) and the tokenizer's EOS."""
    ids: list[int] = []
    gen = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else [int(t) for t in eos or []]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def parse_template_kwargs(text: str) -> dict[str, Any]:
    """``--apply-chat-template-kwargs``: a JSON object (``{"enable_thinking": false}``)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatFormatError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ChatFormatError(f"must be a JSON object, got {type(value).__name__}")
    return value
