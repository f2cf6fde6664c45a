"""The task of an SFT run (``--loss-type sft_loss``): ``--prompt-data`` rows of OpenAI ``messages``,
each tokenized once at start with the model's chat template and its assistant-only loss mask
(``policies.sft.assistant_mask``). A bad row fails at start naming its file and line.

The run's machinery is the RL run's: the data cursor admits "prompts" in the file's epoch order
(``launchers/prompt_data.py``), and ``actors.sft_samples.SftSamples`` turns each into its one
sample without an engine. So a prompt here is the conversation's head (up to its first trained
token), and ``example(cursor)`` the whole conversation with its mask.
"""

from __future__ import annotations

import dataclasses

from buffers.types import Prompt
from launchers.file_task import load_tokenizer
from launchers.prompt_data import EpochOrder, read_rows
from launchers.recipes.task import Task
from policies.chat import ChatFormatError, parse_template_kwargs, stop_token_ids
from policies.sft import assistant_mask
from runtime.core.errors import ConfigError

NO_REWARD = "launchers.sft_task:no_reward"


def no_reward(*args: object, **kwargs: object) -> float:
    """SFT samples are never scored (``SftSamples`` returns none to score)."""
    raise RuntimeError("an SFT run scores nothing")


@dataclasses.dataclass
class SftTask(Task):
    examples: list[tuple[list[int], list[int]]] = dataclasses.field(default_factory=list)  # (ids, mask) per row

    def example(self, cursor: int) -> tuple[list[int], list[int]]:
        """The conversation the data cursor's prompt stands for: (token ids, assistant mask)."""
        return self.examples[self.order(cursor) if self.order else cursor % len(self.examples)]


def sft_task(*, model_dir: str, prompt_data: str, input_key: str, apply_chat_template: bool,
             template_kwargs: str, shuffle: bool, seed: int, max_len: int | None = None) -> SftTask:
    if not apply_chat_template:
        raise ConfigError("--apply-chat-template", "SFT rows are messages, rendered by the model's chat template")
    tok = load_tokenizer(model_dir)
    kwargs = parse_template_kwargs(template_kwargs)
    prompts, examples = [], []
    for row in read_rows(prompt_data, input_key=input_key):
        if isinstance(row.input, str):
            raise ConfigError("--prompt-data", f"{row.where}: an SFT row's {input_key!r} must be a list of messages")
        try:
            ids, mask = assistant_mask(tok, row.input, template_kwargs=kwargs)
        except ChatFormatError as e:
            raise ConfigError("--prompt-data", f"{row.where}: {e}") from None
        if max_len is not None and len(ids) > max_len:
            raise ConfigError("--prompt-data", f"{row.where}: {len(ids)} tokens, over the model's context {max_len}")
        first = mask.index(1)
        prompts.append(Prompt(index=len(prompts), input_ids=ids[:first], label="", text="", metadata={}))
        examples.append((ids, mask))
    return SftTask(tokenizer=tok, train_prompts=prompts, eval_prompts=[], reward_path=NO_REWARD,
                   stop_token_ids=stop_token_ids(tok, model_dir), order=EpochOrder(len(prompts), shuffle=shuffle,
                                                                                  seed=seed),
                   skip_special_tokens=True, examples=examples)
