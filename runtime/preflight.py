"""Checks a run makes before anything starts, so a user error is one line and exit 2, not a
traceback minutes in: the run and save directories, the model to start from, the engine's
binary and bind address, the checkpoint to resume, and lengths against the model's context.

Each check raises ``ConfigError`` naming the flag to change. They touch the filesystem and the
network stack (``config.check`` does not), so they run in the launcher's ``main``, not in
``config.build`` (tests and benchmarks build configs for paths that do not exist yet).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from runtime import checkpoint, run_task
from runtime.config import Config, ConfigError

# what a run writes into its directory: --overwrite removes these and nothing else
RUN_FILES = ("config.toml", "metrics.jsonl", "groups.jsonl", "summary.json", "trace.json", "run.log",
             "stall_dump.txt", "logs", "initial_model", "tensorboard", "wandb")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def check_start(cfg: Config, run_dir: Path, *, overwrite: bool, resuming: bool | None = None) -> None:
    """Every start-time check for a run's shared sections (``python -m runtime.launch``);
    ``resuming``: whether it resumes, when ``--load`` is not the checkpoint itself (``check_agents``)."""
    check_run_dir(run_dir, resuming=bool(cfg.ckpt.load) if resuming is None else resuming, overwrite=overwrite)
    if cfg.ckpt.save:
        check_writable_dir(Path(cfg.ckpt.save), flag="--save")
    for path, flag in ((cfg.ckpt.hf_checkpoint, "--hf-checkpoint"), (cfg.ckpt.ref_load, "--ref-load")):
        if path:
            check_model_dir(Path(path), flag=flag)
    if cfg.ckpt.load:
        try:
            checkpoint.load(cfg.ckpt.load)
        except checkpoint.CheckpointError as e:
            raise ConfigError("--load", str(e)) from None
    if cfg.run.backend == "local":  # on Ray the engines run on the cluster's nodes, not here
        check_engine(cfg.engine.engine, cfg.engine.engine_host)


def check_agents(load: str, agents: Mapping[str, tuple[bool, str]]) -> None:
    """A multi-agent run's own checks: each agent's model (``hf_checkpoint``), and with ``--load``
    each trained agent's checkpoint in ``LOAD/NAME``. ``agents``: name -> (frozen, hf_checkpoint)."""
    for name, (frozen, model) in agents.items():
        if model:
            check_model_dir(Path(model), flag=f"[agents.{name}] hf_checkpoint")
        if load and not frozen:
            try:
                checkpoint.load(Path(load) / name)
            except checkpoint.CheckpointError as e:
                raise ConfigError("--load", f"agent {name}: {e}") from None


def check_run_dir(run_dir: Path, *, resuming: bool, overwrite: bool) -> None:
    """A directory this run can write, and not another run's record (its lines would be mixed
    into this one's ``metrics.jsonl``) unless resuming (``--load``) or told to (``--overwrite``)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("--run-dir", f"{run_dir} exists and is not a directory")
    check_writable_dir(run_dir, flag="--run-dir")
    used = sorted(p.name for p in run_dir.iterdir())
    if not used or resuming:
        return
    if not overwrite:
        raise ConfigError("--run-dir", f"{run_dir} is not empty (holds {', '.join(used[:3])}"
                          f"{', ...' if len(used) > 3 else ''}); pass --overwrite to replace its run, or "
                          "--load to resume one")
    clear_run_files(run_dir)


def clear_run_files(run_dir: Path) -> None:
    """Remove what a run wrote into ``run_dir`` (``RUN_FILES``), nothing else."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def check_writable_dir(path: Path, *, flag: str) -> None:
    """Create ``path`` if needed and prove a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(flag, f"cannot write to {path}: {e.strerror or e}") from None


def check_model_dir(path: Path, *, flag: str) -> None:
    """A HF model directory: a readable config.json and weights next to it."""
    if not path.is_dir():
        raise ConfigError(flag, f"{path} is not a directory")
    try:
        json.loads((path / "config.json").read_text())
    except OSError:
        raise ConfigError(flag, f"{path} has no config.json (not a Hugging Face model directory)") from None
    except ValueError as e:
        raise ConfigError(flag, f"{path}/config.json is not valid JSON: {e}") from None
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ConfigError(flag, f"{path} has no weights ({' or '.join(WEIGHT_PATTERNS)})")


def check_engine(engine: str, host: str) -> None:
    """The engine program is installed and its address is one this machine can bind."""
    if engine == "sglang" and importlib.util.find_spec("sglang") is None:
        raise ConfigError("--engine", "sglang is not installed here (pip install 'sglang[all]'), or use "
                          "--engine embedded")
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError("--engine-host", f"cannot resolve {host!r}: {e}") from None
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.bind(address)
    except OSError as e:
        raise ConfigError("--engine-host", f"cannot bind {host!r} on this machine: {e.strerror or e}") from None


def model_context(cfg: Config, model_dir: str | None = None) -> int:
    """Tokens the policy's model can attend to (prompt + response): its ``max_position_embeddings``,
    or SGLang's ``--context-length`` when passed through. ``model_dir``: the model it starts from,
    when known (a resumed agent's checkpoint), else ``--load``'s or the run's model source."""
    override = cfg.engine.sglang_args.get("context-length") if cfg.engine.engine == "sglang" else None
    if override is not None and not isinstance(override, bool):
        return int(override)
    source = (model_dir or cfg.ckpt.load and Path(checkpoint.load(cfg.ckpt.load).model_dir)
              or run_task.model_source(cfg))
    if source:
        config = json.loads((Path(source) / "config.json").read_text())
        return int(config.get("max_position_embeddings") or config.get("max_seq_len") or 1 << 30)
    return cfg.model.max_position_embeddings


def check_lengths(*, context: int, train_lengths: Sequence[int], eval_lengths: Sequence[int],
                  max_response_len: int, eval_max_response_len: int) -> None:
    """Refuse lengths no prompt can be generated with: every request would be refused by the engine.
    Prompts that alone do not fit are dropped and counted at run time (``SampleRunner.fits``)."""
    for lengths, response, flag, what in ((train_lengths, max_response_len, "--rollout-max-response-len", "training"),
                                          (eval_lengths, eval_max_response_len, "--eval-max-response-len", "eval")):
        if not lengths:
            continue
        shortest = min(lengths)
        if shortest + response > context:
            raise ConfigError(flag, f"{response} tokens + the shortest {what} prompt ({shortest} tokens) exceed the "
                              f"model's context of {context} tokens (max_position_embeddings): at most "
                              f"{max(context - shortest, 0)}")

