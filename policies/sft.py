"""Supervised fine-tuning (Miles's ``--loss-type sft_loss``): conversations as tokens with an
assistant-only loss mask, and the cross-entropy on the masked tokens.

The mask comes from the chat template's turn boundaries, not from guessing at role markers: for
each assistant message ``i`` the template renders the conversation up to it with the assistant's
opening (``messages[:i]``, ``add_generation_prompt``) and up to its end (``messages[:i+1]``); the
characters between the two are the assistant's turn (its content and its end-of-turn token,
which the model must learn to emit; whitespace the template writes after that token is not).
Both renderings must be prefixes of the whole conversation's (a template that rewrites earlier
turns, e.g. one that drops old reasoning, is refused), and tokens are mapped to characters with
the fast tokenizer's offsets. A token is trained when it starts inside an assistant span.

The loss, ``--calculate-per-token-loss``: the mean over every trained token of the step (long
answers weigh more), else Megatron's default, each sample's mean over its tokens, averaged over
the step's samples. ``token_weights`` gives each token its share of that mean, so a step split
into micro-batches sums to exactly the whole step's loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from policies.chat import ChatFormatError, Message, check_messages, render_messages


def assistant_mask(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *,
                   template_kwargs: Mapping[str, Any] | None = None) -> tuple[list[int], list[int]]:
    """(token ids of the whole conversation, 1 on each assistant token else 0)."""
    messages = check_messages(list(messages))
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("an SFT conversation needs at least one assistant message")
    full = render_messages(tokenizer, messages, add_generation_prompt=False, template_kwargs=template_kwargs)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render_messages(tokenizer, messages[:i], add_generation_prompt=True, template_kwargs=template_kwargs)
        turn = render_messages(tokenizer, messages[: i + 1], add_generation_prompt=False,
                               template_kwargs=template_kwargs)
        if not (full.startswith(head) and full.startswith(turn) and len(turn) > len(head)):
            raise ChatFormatError(f"the chat template renders the turns before assistant message {i} differently "
                                  "in the whole conversation: its turn boundaries cannot be found")
        spans.append((len(head), len(turn.rstrip())))
    if not getattr(tokenizer, "is_fast", False):
        raise ChatFormatError("the assistant mask needs a fast tokenizer (character offsets)")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def token_weights(mask: torch.Tensor, *, per_token: bool, step_tokens: int, step_samples: int) -> torch.Tensor:
    """Each token's weight in the step's loss, ``-(logp * weights).sum()``; ``mask``: (samples, tokens)
    of one micro-batch (or the whole step), ``step_tokens``/``step_samples``: the whole step's."""
    if per_token:
        return mask / max(step_tokens, 1)
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    return mask / lengths / max(step_samples, 1)


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, *, per_token: bool) -> torch.Tensor:
    """The whole step's loss from its token log-probs (``logp``, ``mask``: (samples, tokens))."""
    weights = token_weights(mask, per_token=per_token, step_tokens=int(mask.sum()),
                            step_samples=int((mask.sum(-1) > 0).sum()))
    return -(logp * weights).sum()
