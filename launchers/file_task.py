"""The task of a run on prompt files and a Hugging Face model (``--prompt-data``, ``--hf-checkpoint``).

The model directory gives the tokenizer, the chat template and the stop tokens; the prompt file
gives the training prompts (read and tokenized at start, so a bad row fails before anything runs),
in the epoch order of ``launchers/prompt_data.py``; ``--eval-prompt-data`` files give named
held-out sets. The reward comes from the run's flags (``--rm-type``, ``--custom-rm-path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from buffers.types import Prompt
from launchers.prompt_data import EpochOrder, PromptRow, read_rows
from launchers.recipes.task import Task
from policies.chat import ChatFormatError, parse_template_kwargs, prompt_ids, stop_token_ids
from runtime.core.errors import ConfigError


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ConfigError("--hf-checkpoint", f"no tokenizer in {model_dir}: {e}") from None
    if tok.pad_token_id is None:  # the learner pads batches; the pad id is masked out of the loss
        tok.pad_token = tok.eos_token
    return tok


class PromptEncoder:
    """Rows -> Prompts with one tokenizer and one set of chat-template settings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, apply_chat_template: bool,
                 template_kwargs: str | dict[str, Any] = ""):
        self.tokenizer, self.apply_chat_template = tokenizer, apply_chat_template
        try:
            self.template_kwargs = (parse_template_kwargs(template_kwargs) if isinstance(template_kwargs, str)
                                    else dict(template_kwargs))
        except ChatFormatError as e:
            raise ConfigError("--apply-chat-template-kwargs", str(e)) from None

    def prompts(self, rows: list[PromptRow], *, flag: str) -> list[Prompt]:
        out = []
        for i, row in enumerate(rows):
            try:
                text, ids = prompt_ids(self.tokenizer, row.input, apply_chat_template=self.apply_chat_template,
                                       template_kwargs=self.template_kwargs)
            except ChatFormatError as e:
                raise ConfigError(flag, f"{row.where}: {e}") from None
            out.append(Prompt(index=i, input_ids=ids, label=row.label, text=text, metadata=row.metadata))
        return out


def file_task(*, model_dir: str, prompt_data: str, input_key: str, label_key: str, metadata_key: str,
              apply_chat_template: bool, template_kwargs: str, shuffle: bool, seed: int,
              reward_path: str = "") -> Task:
    tok = load_tokenizer(model_dir)
    encoder = PromptEncoder(tok, apply_chat_template=apply_chat_template, template_kwargs=template_kwargs)
    rows = read_rows(prompt_data, input_key=input_key, label_key=label_key, metadata_key=metadata_key)
    train = encoder.prompts(rows, flag="--prompt-data")
    return Task(tokenizer=tok, train_prompts=train, eval_prompts=[], reward_path=reward_path,
                stop_token_ids=stop_token_ids(tok, model_dir), order=EpochOrder(len(train), shuffle=shuffle, seed=seed),
                skip_special_tokens=True)


def eval_sets(pairs: list[str], encoder: PromptEncoder, *, input_key: str, label_key: str, metadata_key: str
              ) -> dict[str, list[Prompt]]:
    """``--eval-prompt-data NAME PATH [NAME PATH ...]`` as named held-out sets, in the given order."""
    sets: dict[str, list[Prompt]] = {}
    for name, path in zip(pairs[::2], pairs[1::2]):
        if name in sets:
            raise ConfigError("--eval-prompt-data", f"the name {name!r} is given twice")
        rows = read_rows(path, input_key=input_key, label_key=label_key, metadata_key=metadata_key,
                         flag="--eval-prompt-data")
        sets[name] = encoder.prompts(rows, flag="--eval-prompt-data")
    return sets
