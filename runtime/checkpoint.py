"""Checkpoints a run can be SIGKILLed after and resumed from, losing nothing and training nothing twice.

A checkpoint is taken by the learner between steps (``after_step``), so the trainer's weights and
optimizer are exactly those of ``version``. Everything else is snapshotted in one synchronous
instant of the event loop and encoded at once, so it is consistent with them:

    SAVE_DIR/step{v}/model/          the policy at version v: HF safetensors + config (transformers loads it)
                    trainer.pt       optimizer state and the trainer's RNG
                    optimizer/       with N data-parallel learner ranks: the optimizer's shards
                                     (torch.distributed.checkpoint; trainer.pt then holds the RNG only)
                    state.msgpack    RunState: version, data cursor, ledger, buffer (ready groups with
                                     every token's version and logprob), live groups with their partial
                                     samples, the driver's RNG
    SAVE_DIR/latest                  the name of the newest complete checkpoint (written last, atomically)

A multi-agent run keeps one such directory per trained agent (``SAVE_DIR/NAME/``), each taken by
that agent's learner at its own steps; its live groups are the slots of episodes still running
(``LiveSlot``), which a resume runs again with only those slots trained, so every slot still
ends exactly once in that agent's ledger whatever the other agents' checkpoints hold.

Resume: engines start on ``model/`` at version v; ready groups go back into the buffer with their
deadlines; live groups go back to ADMITTED in the ledger and are continued from the tokens they
had (their deadlines unchanged, so the staleness bound still holds); the data cursor continues.
Groups trained after the checkpoint in the killed run are trained again, which is correct: the
weights they trained were lost with the run. A checkpoint directory is renamed into place only
when complete, so a kill during a save leaves the previous one as ``latest``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from actors.episode_driver import LiveSlot
from actors.generator import LiveGroupState, RedoGroup
from buffers.buffer import BufferState, StalenessBuffer
from runtime.core.ledger import Ledger, LedgerState

log = logging.getLogger(__name__)

KEEP = 2  # checkpoints kept; older ones are deleted once a newer one is complete


class RunState(msgspec.Struct):
    version: int
    cursor: int
    ledger: LedgerState
    buffer: BufferState
    live: list[LiveGroupState]
    py_random: Any  # random.getstate() as plain lists
    redo: list[RedoGroup] = []  # expired groups waiting to be regenerated (over-provisioned runs)
    slots: list[LiveSlot] = []  # a multi-agent run's live groups: slots of episodes still running


class ProducerState(msgspec.Struct):
    """What the producer (generator or episode driver) contributes to one agent's checkpoint."""

    cursor: int  # the data cursor (prompts admitted) or episodes started
    live: list[LiveGroupState] = []
    redo: list[RedoGroup] = []
    slots: list[LiveSlot] = []


class Resume(msgspec.Struct):
    path: str  # the checkpoint directory
    state: RunState

    @property
    def model_dir(self) -> Path:
        return Path(self.path) / "model"

    @property
    def trainer_state(self) -> Path:
        return Path(self.path) / "trainer.pt"

    @property
    def live_group_ids(self) -> list[int]:
        """Groups admitted and not yet buffered at the checkpoint: generated again on resume."""
        return [g.group_id for g in self.state.live] + [s.group_id for s in self.state.slots]


class SavesTrainer(Protocol):
    async def save_trainer(self, out_dir: Path) -> None: ...


class Checkpointer:
    def __init__(self, *, save_dir: Path, interval: int, num_steps: int, learner: SavesTrainer,
                 buffer: StalenessBuffer, ledger: Ledger, producer: Callable[[], ProducerState],
                 announce: Callable[[str], None] = print, tokenizer_dir: str | Path | None = None):
        """``producer``: the producer's part of this agent's state, taken synchronously.
        ``tokenizer_dir``: the run's HF model directory, whose tokenizer, chat template and
        generation config each checkpoint's ``model/`` gets too, so that it is a complete HF model
        directory another run can start from (``--hf-checkpoint``: SFT, then RL)."""
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.save_dir = save_dir
        self.interval = interval
        self.num_steps = num_steps
        self.learner, self.buffer, self.ledger, self.producer = learner, buffer, ledger, producer
        self.announce = announce
        self.saved: list[int] = []

    async def after_step(self, version: int) -> None:
        if version == self.num_steps or (self.interval and version % self.interval == 0):
            await self.save(version)

    async def save(self, version: int) -> Path:
        p = self.producer()
        state = RunState(version=version, cursor=p.cursor, ledger=self.ledger.snapshot(), buffer=self.buffer.snapshot(),
                         live=p.live, redo=p.redo, slots=p.slots, py_random=random.getstate())
        data = msgspec.msgpack.encode(state)  # now, before any await: one consistent instant
        self.save_dir.mkdir(parents=True, exist_ok=True)
        tmp, final = self.save_dir / f".step{version}.partial", self.save_dir / f"step{version}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        await self.learner.save_trainer(tmp)
        if self.tokenizer_dir is not None:
            _copy_tokenizer(self.tokenizer_dir, tmp / "model")
        await asyncio.to_thread(_write_and_sync, tmp / "state.msgpack", data)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _write_and_sync(self.save_dir / ".latest.partial", final.name.encode())
        os.replace(self.save_dir / ".latest.partial", self.save_dir / "latest")
        self.saved.append(version)
        self._prune()
        self.announce(f"checkpoint at step {version}: {final}")
        return final

    def _prune(self) -> None:
        done = sorted((p for p in self.save_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in done[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def _copy_tokenizer(src: Path, model_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (model_dir / name).exists():
            shutil.copy2(src / name, model_dir / name)


def _write_and_sync(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class CheckpointError(ValueError):
    pass


def load(load_dir: str | Path) -> Resume:
    """The newest complete checkpoint in ``load_dir`` (``--load``)."""
    root = Path(load_dir)
    latest = root / "latest"
    if not latest.is_file():
        raise CheckpointError(f"no checkpoint in {root} (no 'latest' file)")
    path = root / latest.read_text().strip()
    missing = [name for name in ("state.msgpack", "trainer.pt", "model/config.json") if not (path / name).is_file()]
    if not any((path / "model").glob("*.safetensors")):
        missing.append("model/*.safetensors")
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {', '.join(missing)}")
    try:
        state = msgspec.msgpack.decode((path / "state.msgpack").read_bytes(), type=RunState)
    except (OSError, msgspec.DecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None
    return Resume(path=str(path), state=state)


def restore_driver_rng(state: RunState) -> None:
    version, internal, gauss = state.py_random
    random.setstate((version, tuple(internal), gauss))
