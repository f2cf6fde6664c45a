"""The Megatron trainer's files: HF weights in (``--hf-checkpoint``), HF safetensors out (serving,
and the policy of a resume), and the resume state.

A checkpoint directory (``save``) holds:
    model/       HF config + model.safetensors (fp32 master weights: the resume loads them exactly;
                 transformers and engines load them as any HF checkpoint)
    reference/   the KL reference, when there is one (it must stay the initial policy)
    megatron/    GPU: megatron's distributed checkpoint (``dist_checkpointing``) of the model and the
                 distributed optimizer's sharded state, each rank writing its shard;
                 CPU: torch's AdamW state per rank (``optimizer.<rank>.pt``)
    trainer.pt   torch's RNG state and the LR schedule (rank 0)
Every trainer rank calls ``save`` / ``load`` together (the HF export gathers across ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors import safe_open
from safetensors.torch import save_file

from policies.megatron import convert, publish

# the distributed optimizer's state as its own buckets, each rank writing and reading its shard with no
# communication (resharding only across data parallel ranks). megatron-core 0.16's default,
# "fully_sharded_model_space", builds flattened ShardedTensors its own torch_dist backend then
# refuses ("ShardedTensor.flattened_range is not supported": measured on the lent H200).
OPTIM_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def hf_reader(path: Path):
    """``name -> tensor`` over the checkpoint's safetensors file(s), read lazily."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    where = {}
    for f in files:
        with safe_open(str(path / f), framework="pt") as h:
            where.update(dict.fromkeys(h.keys(), f))

    def read(name: str) -> torch.Tensor:
        with safe_open(str(path / where[name]), framework="pt") as h:
            return h.get_tensor(name)

    return read


def stage_layout(hf_config) -> convert.Layout:
    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    per = hf_config.num_hidden_layers // pp
    return convert.Layout.of(hf_config, num_layers=per, layer_offset=stage * per,
                             tp_size=ps.get_tensor_model_parallel_world_size(),
                             tp_rank=ps.get_tensor_model_parallel_rank(), pre_process=stage == 0,
                             post_process=stage == pp - 1)


@torch.no_grad()
def load_hf(model: torch.nn.Module, path: Path, hf_config) -> None:
    """Fill this rank's stage and TP shard of ``model`` from an HF checkpoint directory."""
    state = convert.to_megatron(hf_reader(path), stage_layout(hf_config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"HF checkpoint {path} does not fit the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def save_hf(weights: publish.HfWeights, hf_config, out_dir: Path) -> Path:
    """``model.safetensors`` + ``config.json`` in ``out_dir`` (written by global rank 0)."""
    rank0 = dist.get_rank() == 0
    state = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in weights.tensors() if rank0}
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out_dir / "model.safetensors"))
        hf_config.save_pretrained(out_dir)
    return out_dir


def save(trainer, out_dir: Path) -> None:
    save_hf(trainer.weights, trainer.hf_config, out_dir / "model")
    if trainer.ref is not None:
        save_hf(publish.HfWeights(trainer.ref, trainer.hf_config), trainer.hf_config, out_dir / "reference")
    shards = out_dir / "megatron"
    shards.mkdir(parents=True, exist_ok=True)
    if trainer.opt.on_gpu:
        from megatron.core import dist_checkpointing
        model_sd = trainer.model.sharded_state_dict()  # the bare model: DDP would prefix "module."
        optim_sd = trainer.opt.optimizer.sharded_state_dict(model_sd, metadata=OPTIM_FORMAT)
        dist_checkpointing.save({"model": model_sd, "optimizer": optim_sd}, str(shards))
    else:
        torch.save(trainer.opt.optimizer.state_dict(), shards / f"optimizer.{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        torch.save({"rng": torch.get_rng_state(), "lr_schedule": msgspec.to_builtins(trainer.lr_schedule)},
                   out_dir / "trainer.pt")


def load(trainer, ckpt_dir: Path) -> None:
    """Restore what ``save`` wrote beyond ``model/`` (from which the trainer was built)."""
    shards = ckpt_dir / "megatron"
    if trainer.opt.on_gpu:
        from megatron.core import dist_checkpointing
        model_sd = trainer.model.sharded_state_dict()
        _allocate_adam_state(trainer.opt.optimizer)
        state = dist_checkpointing.load(
            {"model": model_sd,
             "optimizer": trainer.opt.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIM_FORMAT)},
            str(shards))
        with torch.no_grad():  # the fp32 main params it copies into are views of leaves that require grad
            trainer.model.load_state_dict(state["model"])
            trainer.opt.optimizer.load_state_dict(state["optimizer"])
    else:
        trainer.opt.optimizer.load_state_dict(torch.load(shards / f"optimizer.{dist.get_rank()}.pt",
                                                         weights_only=True))
    state = torch.load(ckpt_dir / "trainer.pt", weights_only=True)
    torch.set_rng_state(state["rng"])
    if trainer.ref is not None and (ckpt_dir / "reference").is_dir():
        load_hf(trainer.ref, ckpt_dir / "reference", trainer.hf_config)


def _allocate_adam_state(optimizer) -> None:
    """Give a fresh distributed optimizer's inner torch AdamW its state (step 0, zero moments) before a
    load, which then overwrites it.

    Why: building the sharded state dict to load into calls the optimizer's ``state_dict()``, which
    without Transformer Engine or Apex reads every parameter's ``step`` and asserts they agree: on a
    trainer that has not stepped there are none (AssertionError, measured on the lent H200; with this,
    tests/policies/test_megatron_gpu.py's resume passes there)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            on_device = group.get("fused") or group.get("capturable")  # where torch's AdamW keeps ``step``
            for p in group["params"]:
                if not inner.state[p]:
                    step = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                    inner.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
