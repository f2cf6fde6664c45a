"""The same-GPU weight transport (``ipc``): a real trainer process hands real engine processes its
weights over SGLang's /update_weights_from_tensor ("flattened_bucket": one CUDA IPC handle).

On a GPU the trainer and the engine share it, as ``--colocate`` places them, and the handle is a
CUDA IPC handle. Without CUDA the same path runs on CPU tensors shared by /dev/shm file name (what
torch.multiprocessing makes of a CPU tensor): every part but the CUDA mapping is exercised here.
"""

from __future__ import annotations

import asyncio
import os
import pickle

import msgspec
import pytest
import torch

from policies import weight_ipc
from policies.engine.client import EngineError
from policies.engine.process import EngineProcess
from policies.trainer_process import TrainerProcess
from runtime import cli
from runtime.config import GrpoConfig, OptimizerConfig
from runtime.engines import EngineSet
from runtime.ipc_weights import IpcWeights
from runtime.weight_transport import choose
from tests.conftest import run

GREEDY = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
CUDA = torch.cuda.is_available()
NO_CUDA = "CUDA IPC needs a CUDA device (torch.cuda.is_available() is False here)"


def test_auto_picks_ipc_when_colocated_on_gpus_and_shm_on_cpus():
    assert choose("auto", learner_gpus=1, engine_gpus=1, colocate=True) == "ipc"
    assert choose("auto", learner_gpus=0, engine_gpus=0, colocate=True) == "shm"  # CPU: no CUDA IPC
    assert choose("auto", learner_gpus=1, engine_gpus=1, colocate=False) == "nccl"
    assert choose("ipc", learner_gpus=1, engine_gpus=1, colocate=True) == "ipc"


@pytest.mark.parametrize("argv", [
    ["--weight-transport", "ipc"],  # CPU
    ["--weight-transport", "ipc", "--colocate"],  # colocated, but on CPUs
    ["--weight-transport", "ipc", "--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1"],  # GPUs of their own
])
def test_ipc_is_refused_unless_colocated_on_gpus(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.resolve(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--weight-transport: ipc needs" in err, err


def test_ipc_is_accepted_when_colocated_on_a_gpu():
    cfg = cli.resolve(["--weight-transport", "ipc", "--colocate", "--actor-num-gpus-per-node", "1"])
    assert cfg.placement.weight_transport == "ipc"


def test_payload_is_one_flat_bucket_whose_views_are_the_cast_weights():
    named = [("a", torch.randn(3, 4)), ("b", torch.randn(7)), ("c", torch.randn(2, 2, 2))]
    exporter = weight_ipc.Exporter(named, dtype=torch.bfloat16)
    payload = weight_ipc.loads(exporter.serialize())
    assert set(payload) == {"flattened_tensor", "metadata"}
    assert [m.name for m in payload["metadata"]] == ["a", "b", "c"]
    assert [(m.start_idx, m.end_idx, m.numel) for m in payload["metadata"]] == [(0, 24, 24), (24, 38, 14),
                                                                                  (38, 54, 16)]
    for (name, want), (got_name, got) in zip(named, weight_ipc.named_tensors(payload), strict=True):
        assert name == got_name and torch.equal(got, want.to(torch.bfloat16))
    # the buffer is the trainer's for life: the next serialize rewrites it in place, same storage
    named[0][1].fill_(1.0)
    again = weight_ipc.loads(exporter.serialize())
    assert torch.equal(weight_ipc.named_tensors(again)[0][1], torch.ones(3, 4, dtype=torch.bfloat16))


def test_a_payload_cannot_run_code():
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        weight_ipc.loads(pickle.dumps([("w", Evil())]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason=NO_CUDA))])
def test_ipc_update_matches_an_engine_loaded_from_the_same_weights_on_disk(checkpoints, tmp_path, device):
    """Trainer and engine on one device (colocated): after an ipc sync the engine answers exactly
    as an engine started from the trainer's checkpoint; live (in_place) it swaps between decode
    steps; a replacement refits by ipc; memory release and resume keep it serving."""
    (v0, v1), pad_id = checkpoints
    prompt = [1, 5, 6, 7]
    gpu = device == "cuda"
    dtype = "bfloat16" if gpu else "float32"
    on_gpu = dict(device="cuda", gpus="0") if gpu else {}

    def engine(i, path, **kwargs):
        return EngineProcess(path, **kwargs, **on_gpu)

    async def scenario():
        engines = EngineSet(model_path=v0, n=1, log_dir=tmp_path / "set", timeout_s=60, start_timeout_s=120,
                            dtype=dtype, process_factory=engine)
        reference = EngineSet(model_path=v1, n=1, log_dir=tmp_path / "ref", timeout_s=60, start_timeout_s=120,
                              dtype=dtype, process_factory=engine)
        # the trainer holds v1's weights at version 1; the engine serves v0 until the sync
        trainer = TrainerProcess(v1, grpo=GrpoConfig(), optim=OptimizerConfig(), temperature=1.0, pad_id=pad_id,
                                 version=1, **on_gpu)
        engines.collective = IpcWeights(trainer, dtype=dtype, timeout_s=60)
        await asyncio.gather(engines.start(), reference.start())
        try:
            client = engines.slots[0].client
            want = await reference.slots[0].client.generate(prompt, GREEDY)
            before = await client.generate(prompt, GREEDY)
            assert before.logprobs != want.logprobs  # v0 and v1 differ

            sent = asyncio.Event()
            await engines.sync_weights(None, 1, "abort", sent)  # paused: a plain update
            assert sent.is_set() and engines.current == (1, None)
            got = await client.generate(prompt, GREEDY)
            assert (got.output_ids, got.logprobs, got.weight_version) == (want.output_ids, want.logprobs, "1")
            ipc = engines.collective
            assert (ipc.sends, len(ipc.plan)) == (1, 1) and ipc.plan[0].dtypes[0] == dtype
            assert 0 < ipc.broadcast_s <= ipc.send_s
            print(f"ipc sync on {device}: trainer's part {ipc.broadcast_s * 1e3:.1f} ms, "
                  f"loaded {ipc.send_s * 1e3:.1f} ms, {ipc.plan[0].nbytes} bytes")

            # live: swapped in between decode steps, a request in flight goes on
            request = asyncio.create_task(client.generate(prompt, {**GREEDY, "max_new_tokens": 40}))
            held = await engines.sync_weights(None, 1, "in_place")
            assert (await request).finish_reason == "length" and 0 <= held < 5

            await client.release_memory_occupation(["kv_cache"])
            await client.resume_memory_occupation(["kv_cache"])
            await client.resume()
            got = await client.generate(prompt, GREEDY)
            assert (got.output_ids, got.logprobs) == (want.output_ids, want.logprobs)

            with pytest.raises(EngineError, match="unknown memory tags"):
                await client.release_memory_occupation(["gpu_everything"])
            # a CPU payload (shared by file name, whatever the engine's device) naming no parameter
            stranger = weight_ipc.Exporter([("model.no_such.weight", torch.zeros(2))], dtype=torch.float32)
            bad = stranger.serialize()  # (valid while ``stranger`` lives: it owns the memory)
            with pytest.raises(EngineError, match="unknown parameter"):
                await client.update_weights_from_tensor([bad], weight_version="9")
            with pytest.raises(EngineError, match="not a list of"):
                await client.update_weights_from_tensor([bad], weight_version="9", load_format=None)
            assert await client.get_weight_version() == "1"

            # a replacement starts on v0's files and refits by ipc before it serves
            engines.fail(engines.slots[0], "test kill")
            await engines.wait_until(lambda: engines.counters["engine_restarts"] == 1 or engines.fatal is not None)
            assert engines.fatal is None and engines.restart_records[0].refit_version == 1
            got = await engines.slots[0].client.generate(prompt, GREEDY)
            assert (got.logprobs, got.weight_version) == (want.logprobs, "1")
        finally:
            trainer.close()
            engines.collective.close()
            await asyncio.gather(engines.stop(), reference.stop())

    run(scenario(), timeout=220)


def test_export_travels_as_msgpack():
    meta = weight_ipc.weight_sync.BucketMeta(["w"], ["bfloat16"], [[2]])
    raw = msgspec.msgpack.encode(weight_ipc.Export(3, meta, b"\x80\x05"))
    assert msgspec.msgpack.decode(raw, type=weight_ipc.Export) == weight_ipc.Export(3, meta, b"\x80\x05")
