"""ROLLOUT and EVAL: the prompts, how they are sampled and scored, and the held-out evaluation."""

from __future__ import annotations

from typing import Literal

from runtime.config.fields import NonNeg, NonNegF, Pos, PosF, Prob, Section


class RolloutConfig(Section):
    """ROLLOUT: prompts, sampling, reward, and the four batch knobs."""

    rollout_batch_size: Pos = 16  # prompts per rollout
    n_samples_per_prompt: Pos = 8
    global_batch_size: Pos = 128  # samples per optimizer step
    num_steps_per_rollout: Pos | None = None  # derived when unset
    num_rollout: Pos = 200
    num_epoch: Pos | None = None  # passes over --prompt-data; sets --num-rollout from the file's rows
    rollout_temperature: NonNegF = 1.0
    rollout_top_p: Prob = 1.0
    rollout_top_k: int = -1
    rollout_max_response_len: Pos = 8
    rollout_num_engines: Pos = 1
    # prompts from a file instead of the recipe's: JSONL or Parquet, one prompt per row (Miles's flags)
    prompt_data: str = ""  # JSONL or .parquet file of prompts; needs --hf-checkpoint (its tokenizer)
    input_key: str = "input"  # the row's prompt: a string, or a list of {role, content} messages
    label_key: str = ""  # the row's label (what the reward checks); empty: none
    metadata_key: str = "metadata"  # the row's metadata object, handed to the reward (optional per row)
    apply_chat_template: bool = False  # render prompts with the model's chat template
    apply_chat_template_kwargs: str = ""  # JSON object for the template, e.g. {"enable_thinking": false}
    rollout_shuffle: bool = False  # shuffle the prompts, anew each epoch (seeded by --rollout-seed)
    rm_type: Literal["", "math", "gsm8k", "exact", "f1"] = ""  # a built-in verifier (launchers/rewards.py)
    custom_rm_path: str = ""  # module:function; empty: --rm-type, else the recipe's reward
    group_rm: bool = False  # the reward scores a whole group in one call: fn(prompt, samples) -> list
    reward_key: str = ""  # the reward returns a dict of components: train on this one, log them all
    # fn(group) -> bool or (keep, reason); a dropped group is counted as filter_<reason> and replaced
    dynamic_sampling_filter_path: str = ""  # module:function; DAPO's: buffers.filters:check_reward_nonzero_std
    reward_timeout: PosF = 10.0  # seconds per sample before the reward counts as failed
    rollout_seed: int = 42
    # multi-turn episodes (actors/generate_fn.py): with one, --rollout-max-response-len bounds one
    # policy turn and the four fields below bound the episode
    custom_generate_function_path: str = ""  # module:function, async (Conversation) -> reward | None, run per sample
    max_turns: Pos = 8  # policy turns per episode
    rollout_max_context_len: NonNeg = 0  # prompt + every turn, in tokens; 0: --max-position-embeddings
    tool_timeout: PosF = 10.0  # seconds for one tool call (Conversation.call_tool)
    generate_timeout: PosF = 120.0  # seconds for one sample's whole episode

    @property
    def steps_per_rollout(self) -> int:
        if self.num_steps_per_rollout is not None:
            return self.num_steps_per_rollout
        return max(1, self.rollout_batch_size * self.n_samples_per_prompt // self.global_batch_size)

    @property
    def groups_per_step(self) -> int:
        """Prompt groups one optimizer step consumes: the unit of staleness admission."""
        return self.global_batch_size // self.n_samples_per_prompt

    @property
    def num_steps(self) -> int:
        return self.num_rollout * self.steps_per_rollout


class EvalConfig(Section):
    """EVAL: periodic evaluation on held-out prompts; flags left unset inherit ROLLOUT's."""

    eval_interval: NonNeg = 25  # learner steps between evaluations; 0: only first and final
    eval_temperature: NonNegF = 0.0  # greedy by default
    eval_top_p: Prob = 1.0
    eval_max_response_len: Pos | None = None
    n_samples_per_eval_prompt: Pos = 1
    eval_num_prompts: Pos = 200
    # held-out prompt files read like --prompt-data; they replace the recipe's held-out prompts
    eval_prompt_data: list[str] = []  # NAME PATH [NAME PATH ...]: each set logged as eval/NAME
