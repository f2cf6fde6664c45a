"""The run's task, held-out sets and reward, from the recipe or from prompt files and an HF model.

``--prompt-data`` replaces the recipe's prompts (the recipe still gives its config defaults; the
real-model recipe sets ``--prompt-data`` itself, so it runs the path a user's own file takes).
``--eval-prompt-data`` replaces the recipe's held-out prompts. The reward is ``--custom-rm-path``,
else ``--rm-type``'s built-in verifier, else the recipe's own.
"""

from __future__ import annotations

from buffers.types import Prompt
from launchers.file_task import PromptEncoder, eval_sets, file_task, load_tokenizer
from launchers.recipes import get_recipe
from launchers.recipes.task import Task
from launchers.rewards import RM_TYPES
from launchers.sft_task import sft_task
from runtime.config import Config, ConfigError


def model_source(cfg: Config) -> str:
    """The HF directory the run starts from: ``--hf-checkpoint``, else ``--ref-load`` (Miles warm-starts
    the actor from the reference); empty: the recipe's random-init model."""
    return cfg.ckpt.hf_checkpoint or cfg.ckpt.ref_load


def make_task(cfg: Config) -> Task:
    r = cfg.rollout
    if cfg.grpo.loss_type == "sft_loss":  # rows of messages, an assistant-only mask each
        return sft_task(model_dir=model_source(cfg), prompt_data=r.prompt_data, input_key=r.input_key,
                        apply_chat_template=r.apply_chat_template, template_kwargs=r.apply_chat_template_kwargs,
                        shuffle=r.rollout_shuffle, seed=r.rollout_seed)
    if not r.prompt_data:
        return get_recipe(cfg.run.recipe).make_task(seed=r.rollout_seed, eval_num_prompts=cfg.eval.eval_num_prompts)
    return file_task(model_dir=model_source(cfg), prompt_data=r.prompt_data, input_key=r.input_key,
                     label_key=r.label_key, metadata_key=r.metadata_key, apply_chat_template=r.apply_chat_template,
                     template_kwargs=r.apply_chat_template_kwargs, shuffle=r.rollout_shuffle, seed=r.rollout_seed)


def held_out(cfg: Config, task: Task) -> dict[str, list[Prompt]]:
    """Named held-out sets: ``--eval-prompt-data``'s, else the recipe's own (named "")."""
    if not cfg.eval.eval_prompt_data:
        return {"": task.eval_prompts}
    r = cfg.rollout
    tokenizer = load_tokenizer(model_source(cfg)) if model_source(cfg) else task.tokenizer
    encoder = PromptEncoder(tokenizer, apply_chat_template=r.apply_chat_template,
                            template_kwargs=r.apply_chat_template_kwargs)
    return eval_sets(cfg.eval.eval_prompt_data, encoder, input_key=r.input_key, label_key=r.label_key,
                     metadata_key=r.metadata_key)


def reward_path(cfg: Config, task: Task) -> str:
    r = cfg.rollout
    path = r.custom_rm_path or (RM_TYPES[r.rm_type] if r.rm_type else task.reward_path)
    if not path:
        raise ConfigError("--rm-type", "prompts from a file need a reward: --rm-type (math, gsm8k, exact, f1) "
                          "or --custom-rm-path module:function")
    return path
