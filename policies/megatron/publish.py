"""The Megatron trainer's weights as HF-named full tensors, one at a time, for engines and exports.

``HfWeights.tensors()`` walks the model in HF order (embedding, layers 0..L-1, final norm, head):
the stage that owns a tensor all-gathers its TP shards (``convert.to_hf`` reassembles them), and
under pipeline parallelism broadcasts the result over the PP group, so every rank yields the same
sequence while at most one full tensor (one layer's largest) exists beyond the shards. The
engines therefore see the names and shapes an HF checkpoint (and the FSDP/HF learner) has.

``Sender`` puts that sequence on the existing weight-update group (``policies.weight_sync``,
SGLang's flattened-bucket contract) bucket by bucket through ONE reused send buffer, the size of
the largest bucket: the bucket plan is the same ``plan_buckets`` of the same (name, shape) list,
so the driver and the engines cannot tell this learner from the HF one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import transformers
from megatron.core import parallel_state as ps

from policies import weight_sync
from policies.megatron import convert


class HfWeights:
    """``model``: this rank's ``PolicyGPT`` stage; ``hf_config``: the checkpoint's config."""

    def __init__(self, model: torch.nn.Module, hf_config):
        self.model = model
        self.params = dict(model.named_parameters())
        self.stages = ps.get_pipeline_model_parallel_world_size()
        self.layers_per_stage = hf_config.num_hidden_layers // self.stages
        # the order and shapes, from a meta-device dry run of the conversion (no memory)
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(hf_config).state_dict()
        self.full = full = convert.Layout.of(hf_config)  # names here carry global layer indices
        self.order: list[tuple[str, list[tuple[str, torch.Size]]]] = [
            (name, [(n, t.shape) for n, t in convert.to_hf(name, [t], full)])
            for name, t in convert.to_megatron(hf.__getitem__, full).items()
        ]

    def names_and_shapes(self) -> list[tuple[str, torch.Size]]:
        return [pair for _, outs in self.order for pair in outs]

    def _owner(self, global_name: str) -> tuple[int, str]:
        """(PP stage, local parameter name) of a tensor named with global layer indices."""
        if global_name.startswith("embedding."):
            return 0, global_name
        if not global_name.startswith("decoder.layers."):
            return self.stages - 1, global_name
        _, _, idx, rest = global_name.split(".", 3)
        stage, local = divmod(int(idx), self.layers_per_stage)
        return stage, f"decoder.layers.{local}.{rest}"

    @torch.no_grad()
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every HF tensor, full, in order, on this rank's device (same sequence on every rank)."""
        me = ps.get_pipeline_model_parallel_rank()
        tp = ps.get_tensor_model_parallel_world_size()
        for global_name, outs in self.order:
            stage, local = self._owner(global_name)
            if stage == me and local in self.params:
                shard = self.params[local].detach()
                shards = [shard] if tp == 1 else _all_gather(shard, ps.get_tensor_model_parallel_group())
                produced = dict(convert.to_hf(global_name, shards, self.full))
            else:
                produced = {}
            for name, shape in outs:
                t = produced.get(name)
                if self.stages > 1:
                    if t is None:
                        t = torch.empty(shape, dtype=self._dtype, device=self.device)
                    dist.broadcast(t, src=ps.get_pipeline_model_parallel_global_ranks()[stage],
                                   group=ps.get_pipeline_model_parallel_group())
                yield name, t

    @property
    def _dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device


def _all_gather(shard: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, shard.contiguous(), group=group)
    return out


class Sender:
    """Rank 0's side of the weight-update group for a Megatron learner (module doc). Every trainer
    rank must call ``send`` together (the TP gathers and PP broadcasts are collectives); only the
    rank holding ``pg`` broadcasts to the engines."""

    def __init__(self, pg: torch.distributed.ProcessGroup | None, weights: HfWeights, *, dtype: torch.dtype,
                 bucket_bytes: int = weight_sync.DEFAULT_BUCKET_BYTES):
        self.pg, self.weights, self.dtype = pg, weights, dtype
        shapes = [(n, torch.empty(s, device="meta")) for n, s in weights.names_and_shapes()]
        self.plan = weight_sync.plan_buckets(shapes, dtype=dtype, bucket_bytes=bucket_bytes)
        self._flat = torch.empty(max(m.nbytes for m in self.plan), dtype=torch.uint8, device=weights.device) \
            if pg is not None else None

    @torch.no_grad()
    def send(self) -> None:
        stream = self.weights.tensors()
        for meta in self.plan:
            flat = self._flat[: meta.nbytes] if self._flat is not None else None
            # views first: zip stops at the bucket's end without drawing the next bucket's tensor
            for (_, view), (_, t) in zip(_views(flat, meta), stream):
                if view is not None:
                    view.copy_(t)
            if flat is not None:
                weight_sync.broadcast(flat, self.pg)

    def close(self) -> None:
        if self.pg is not None:
            weight_sync.destroy_group(self.pg)


def _views(flat: torch.Tensor | None, meta: weight_sync.BucketMeta):
    if flat is None:
        return ((n, None) for n in meta.names)
    return weight_sync.unflatten(flat, meta)
