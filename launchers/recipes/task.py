"""What a recipe's task provides to the runtime."""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedTokenizerFast

from buffers.types import Prompt


@dataclasses.dataclass
class Task:
    """A prompt stream with a cursor, held-out eval prompts, a tokenizer and the reward's path.

    ``train_prompt(i)`` is a pure function of ``i`` (and the task's seed), so a data cursor is
    all a checkpoint needs to resume the stream.
    """

    tokenizer: PreTrainedTokenizerFast
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    reward_path: str  # module:function
    stop_token_ids: list[int]

    def train_prompt(self, index: int) -> Prompt:
        base = self.train_prompts[index % len(self.train_prompts)]
        return Prompt(index=index, input_ids=base.input_ids, label=base.label, text=base.text)
