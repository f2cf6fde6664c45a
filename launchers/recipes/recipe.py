"""A built-in recipe: a task (prompts, reward, tokenizer) plus the config defaults it was tuned with."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    defaults: dict[str, dict[str, Any]]  # config overrides, by section
    make_task: Callable[..., Any]  # (seed=int, eval_num_prompts=int) -> Task
    # a multi-agent recipe (runtime/agents.py): its [agents.NAME] tables and its [episodes] table
    agents: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    episodes: dict[str, Any] = dataclasses.field(default_factory=dict)
    # files the recipe needs before the run starts (a model to convert, prompts to write); run once
    # by the launcher after the config is resolved
    prepare: Callable[[], None] | None = None
