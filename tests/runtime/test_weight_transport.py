"""The collective weight transport on CPUs (gloo): a real trainer process broadcasting to real
engine processes over SGLang's /init_weights_update_group + /update_weights_from_distributed.
The NCCL path is the same code with another backend; it runs on a lent GPU (benchmarks/gpu_sync.py)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from policies import weight_sync
from policies.engine.client import EngineClient, EngineError
from policies.engine.process import EngineProcess
from policies.trainer_process import TrainerProcess
from runtime.config import FaultConfig, GrpoConfig, OptimizerConfig
from runtime.engines import EngineSet
from runtime.weight_transport import CollectiveWeights, choose
from tests.conftest import run

GREEDY = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}


def test_buckets_round_trip_every_tensor_in_plan_order():
    named = [("a", torch.randn(3, 4)), ("b", torch.randn(7)), ("c", torch.randn(2, 2, 2))]
    plan = weight_sync.plan_buckets(named, dtype=torch.bfloat16, bucket_bytes=30)
    assert [m.names for m in plan] == [["a"], ["b", "c"]]  # a (24 B) fills a bucket; b + c fit one
    assert plan[1].nbytes == (7 + 8) * 2
    got = {}
    for meta in plan:
        flat = weight_sync.flatten([t for n, t in named if n in meta.names], torch.bfloat16)
        got.update(weight_sync.unflatten(flat, meta))
    for name, tensor in named:
        assert torch.equal(got[name], tensor.to(torch.bfloat16))
    with pytest.raises(ValueError, match="plan says"):
        weight_sync.unflatten(torch.zeros(3, dtype=torch.uint8), plan[0])


def test_auto_picks_nccl_only_for_gpus_of_their_own():
    assert choose("auto", learner_gpus=1, engine_gpus=1, colocate=False) == "nccl"
    assert choose("auto", learner_gpus=1, engine_gpus=1, colocate=True) == "ipc"  # tests/runtime/test_ipc_transport.py
    assert choose("auto", learner_gpus=0, engine_gpus=0, colocate=False) == "shm"
    assert choose("gloo", learner_gpus=0, engine_gpus=0, colocate=False) == "gloo"


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("backend", [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(gpus() < 2, reason="NCCL needs 2 GPUs: learner 0, engines 1+")),
])
def test_broadcast_brings_engines_to_the_trainers_weights_and_refits_a_replacement(checkpoints, tmp_path, backend):
    (v0, v1), pad_id = checkpoints
    prompt = [1, 5, 6, 7]
    gpu = backend == "nccl"  # learner on GPU 0, engines on the others, bf16 on the wire and in the engines
    dtype = "bfloat16" if gpu else "float32"

    def engine(i, path, **kwargs):
        if gpu:
            kwargs |= dict(device="cuda", gpus=str(1 + i))
        return EngineProcess(path, **kwargs)

    # NCCL allows one rank per GPU in a group: as many engines as GPUs beside the learner's (up to 2)
    n = min(2, gpus() - 1) if gpu else 2

    async def scenario():
        fault = FaultConfig(health_check_interval=0.2, health_check_timeout=5.0)
        engines = EngineSet(model_path=v0, n=n, log_dir=tmp_path / "set", timeout_s=30, start_timeout_s=90,
                            fault=fault, dtype=dtype, process_factory=engine)
        reference = EngineSet(model_path=v1, n=1, log_dir=tmp_path / "ref", timeout_s=30, start_timeout_s=90,
                              dtype=dtype, process_factory=engine)
        # the trainer holds v1's weights at version 1; the engines serve v0 until the broadcast
        trainer = TrainerProcess(v1, grpo=GrpoConfig(), optim=OptimizerConfig(), temperature=1.0, pad_id=pad_id,
                                 version=1, **(dict(device="cuda", gpus="0") if gpu else {}))
        engines.collective = CollectiveWeights(trainer, backend=backend, dtype=dtype, bucket_bytes=8192,
                                               timeout_s=60)
        await asyncio.gather(engines.start(), reference.start())
        monitor = asyncio.create_task(engines.monitor(), name="monitor")
        try:
            want = await reference.slots[0].client.generate(prompt, GREEDY)
            before = await engines.slots[0].client.generate(prompt, GREEDY)
            assert before.logprobs != want.logprobs  # v0 and v1 differ

            await engines.sync_weights(None, 1, "in_place")
            assert len(engines.collective.plan) > 1  # several buckets crossed
            for slot in engines.slots:
                got = await slot.client.generate(prompt, GREEDY)
                assert (got.output_ids, got.logprobs, got.weight_version) == (want.output_ids, want.logprobs, "1")
            assert engines.current == (1, None)

            os.kill(engines.slots[0].process.pid, signal.SIGKILL)  # the replacement starts on v0's files
            await engines.wait_until(lambda: engines.counters["engine_restarts"] == 1 or engines.fatal is not None)
            assert engines.fatal is None
            assert engines.restart_records[0].refit_version == 1
            got = await engines.slots[0].client.generate(prompt, GREEDY)
            assert (got.logprobs, got.weight_version) == (want.logprobs, "1")
            assert engines.collective.members == ((0, 1),)  # refit alone in a group of two

            await engines.sync_weights(None, 1, "in_place")  # the next sync regroups every engine
            members = ((0, 1), (1, 0))[:n]
            assert engines.collective.members == members and engines.collective.regroups == (3 if n > 1 else 2)
            with pytest.raises(RuntimeError, match="sent version 1 for version 2"):
                await engines.collective.send([(members[-1], engines.slots[n - 1].client)], 2)
        finally:
            monitor.cancel()
            trainer.close()
            engines.collective.close()
            await asyncio.gather(engines.stop(), reference.stop())

    run(scenario(), timeout=240)


def test_an_engine_refuses_a_bucket_that_does_not_match_its_model_after_receiving_it(checkpoints, tmp_path):
    """The sender's collective must complete even when the receiver refuses what it got."""
    (v0, _), _ = checkpoints

    async def scenario():
        engines = EngineSet(model_path=v0, n=1, log_dir=tmp_path, timeout_s=30, start_timeout_s=90)
        await engines.start()
        client: EngineClient = engines.slots[0].client
        port = weight_sync.free_port()
        loop = asyncio.get_running_loop()
        try:
            join = loop.run_in_executor(None, lambda: weight_sync.new_group(
                backend="gloo", master_address="127.0.0.1", master_port=port, rank=0, world_size=2, group_name="g",
                timeout_s=30))
            _, pg = await asyncio.gather(client.init_weights_update_group(
                master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=2, group_name="g",
                backend="gloo"), join)
            meta = weight_sync.BucketMeta(["model.no_such.weight"], ["float32"], [[4]])
            sent = loop.run_in_executor(None, weight_sync.broadcast, torch.ones(4).view(torch.uint8), pg)
            with pytest.raises(EngineError, match="unknown parameter"):
                await asyncio.gather(client.update_weights_from_distributed(
                    names=meta.names, dtypes=meta.dtypes, shapes=meta.shapes, group_name="g", weight_version="9"),
                    sent)
            assert await client.get_weight_version() == "0"
            with pytest.raises(EngineError, match="needs a CUDA engine"):
                await client.init_weights_update_group(master_address="127.0.0.1", master_port=port, rank_offset=1,
                                                       world_size=2, group_name="h", backend="nccl")
        finally:
            await engines.stop()

    run(scenario(), timeout=120)


def test_one_bucket_in_place_swaps_between_decode_steps_without_a_pause(checkpoints, tmp_path):
    """A request generating across the sync goes on: tokens before the swap are dated 0, after it 1."""
    (v0, v1), pad_id = checkpoints
    long = {"temperature": 1.0, "max_new_tokens": 56, "ignore_eos": True}

    async def scenario():
        engines = EngineSet(model_path=v0, n=1, log_dir=tmp_path, timeout_s=30, start_timeout_s=90)
        trainer = TrainerProcess(v1, grpo=GrpoConfig(), optim=OptimizerConfig(), temperature=1.0, pad_id=pad_id,
                                 version=1)
        engines.collective = CollectiveWeights(trainer, backend="gloo", dtype="float32", bucket_bytes=1 << 30,
                                               timeout_s=60)
        await engines.start()
        try:
            slot = engines.slots[0]
            await engines.collective.join([((0, 0), slot.client)])  # the group exists: the sync is only the swap
            assert engines.collective.pauseless("in_place") and not engines.collective.pauseless("abort")
            spans = set()
            for _ in range(5):  # a request usually spans the swap; the test needs one that does
                request = asyncio.create_task(slot.client.generate([1, 5, 6, 7], long))
                sent = asyncio.Event()
                held = await engines.sync_weights(None, 1, "in_place", sent)
                out = await request
                assert sent.is_set() and out.finish_reason == "length" and 0 < held < 5
                versions = out.token_versions
                assert versions == sorted(versions) and set(versions) <= {"0", "1"}
                spans.add(tuple(sorted(set(versions))))
                if ("0", "1") in spans:
                    break
                await slot.client.update_weight_version("0")  # (same weights: v1's) and try again
            assert ("0", "1") in spans
        finally:
            trainer.close()
            engines.collective.close()
            await engines.stop()

    run(scenario(), timeout=180)
