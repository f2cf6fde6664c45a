"""What a recipe's task provides to the runtime."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from buffers.types import Prompt


@dataclasses.dataclass
class Task:
    """A prompt stream with a cursor, held-out eval prompts, a tokenizer and the reward's path.

    ``train_prompt(i)`` is a pure function of ``i`` (and the task's seed), so a data cursor is
    all a checkpoint needs to resume the stream. ``order`` maps the cursor to a prompt (a prompt
    file's epochs and shuffling, launchers/prompt_data.py); None: the prompts in turn, cycling.
    """

    tokenizer: PreTrainedTokenizerBase
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    reward_path: str  # module:function; empty: the run must name one (--rm-type, --custom-rm-path)
    stop_token_ids: list[int]
    order: Callable[[int], int] | None = None
    # rewards see the answer's text: with special tokens for the word-level recipes (their <eos> is
    # part of the reward), without them for HF models (as SGLang's text output)
    skip_special_tokens: bool = False

    def train_prompt(self, index: int) -> Prompt:
        base = self.train_prompts[self.order(index) if self.order else index % len(self.train_prompts)]
        return Prompt(index=index, input_ids=base.input_ids, label=base.label, text=base.text,
                      metadata=base.metadata)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
