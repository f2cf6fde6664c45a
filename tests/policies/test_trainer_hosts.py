"""One trainer interface (policies/trainer_api.py): every host answers as the in-process trainer does."""

import inspect

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from policies import trainer_api
from policies.trainer import PolicyTrainer
from policies.trainer_process import TrainerDied, TrainerProcess
from runtime.config import GrpoConfig, OptimizerConfig
from tests.policies.test_trainer import make_group, tiny_checkpoint


def protocol_methods() -> set[str]:
    return {n for n, v in vars(trainer_api.Trainer).items() if inspect.isfunction(v) and not n.startswith("_")}


def test_every_method_of_the_protocol_is_a_typed_request_on_every_host():
    methods = protocol_methods()
    assert {"step", "save_weights", "save_checkpoint", "load_checkpoint", "init_weight_group",
            "broadcast_weights", "ipc_weights", "close"} <= methods
    for host in (PolicyTrainer, trainer_api.RemoteTrainer, TrainerProcess):
        missing = {m for m in methods if getattr(host, m, None) is getattr(trainer_api.Trainer, m)}
        assert not missing, f"{host.__name__} lacks {missing}"
        for m in methods - {"close"}:  # same parameters as the Protocol's, so callers cannot tell them apart
            assert list(inspect.signature(getattr(host, m)).parameters) == \
                list(inspect.signature(getattr(trainer_api.Trainer, m)).parameters), (host.__name__, m)
    requests = {cls.__name__ for cls in trainer_api.AnyRequest.__args__}
    assert len(requests) == len(methods) - 1  # every method but close is one request


def test_a_request_round_trips_as_bytes_with_its_typed_fields():
    group = make_group([1, 4, 5, 13], [[4, 5, 2]], [1.0], 1)
    raw = msgspec.msgpack.encode(trainer_api.Step([group], 2))
    decoded = msgspec.msgpack.decode(raw, type=trainer_api.AnyRequest)
    assert isinstance(decoded, trainer_api.Step) and decoded.version == 2 and decoded.batch == [group]
    with pytest.raises(msgspec.ValidationError):  # a call the interface does not have
        msgspec.msgpack.decode(msgspec.msgpack.encode({"type": "Evict"}), type=trainer_api.AnyRequest)


def test_the_process_host_answers_as_the_in_process_trainer(copy_task, tmp_path):
    path = tiny_checkpoint(copy_task, tmp_path)
    kwargs = dict(grpo=GrpoConfig(use_tis=True), optim=OptimizerConfig(lr=1e-2), temperature=1.0, pad_id=0)
    batches = [[make_group([1, 4, 5, 13], [[4, 5, 2], [6, 6, 2]], [1.0, 0.0], v)] for v in range(3)]
    local = PolicyTrainer(path, **kwargs)
    remote = TrainerProcess(path, **kwargs)
    try:
        for v, batch in enumerate(batches):
            assert remote.step(batch, v) == local.step(batch, v)
        a, b = local.save_weights(tmp_path / "local"), remote.save_weights(tmp_path / "remote")
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        # a call that fails there fails here with its traceback, and the host keeps serving
        with pytest.raises(trainer_api.RemoteFailure, match="broadcast_weights before init_weight_group"):
            remote.broadcast_weights()
        with pytest.raises(RuntimeError, match="broadcast_weights before init_weight_group"):
            local.broadcast_weights()
        remote.save_checkpoint(tmp_path / "ckpt")
        remote.load_checkpoint(tmp_path / "ckpt")
        assert remote.step(batches[0], 3) == local.step(batches[0], 3)
    finally:
        remote.close()


def test_a_trainer_that_cannot_start_or_dies_fails_the_call_never_hangs(copy_task, tmp_path):
    with pytest.raises(trainer_api.RemoteFailure, match="failed to start"):
        TrainerProcess(tmp_path / "no-such-model", grpo=GrpoConfig(), optim=OptimizerConfig(), temperature=1.0,
                       pad_id=0)
    trainer = TrainerProcess(tiny_checkpoint(copy_task, tmp_path), grpo=GrpoConfig(), optim=OptimizerConfig(),
                             temperature=1.0, pad_id=0)
    trainer._proc.kill()
    with pytest.raises(TrainerDied, match="died"):
        trainer.save_weights(tmp_path / "w")
    trainer.close()
