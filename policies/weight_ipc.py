"""Weights by CUDA IPC: the learner's weights as one flat bucket that an engine on the same GPU maps.

    trainer (colocated, same GPU)                          engine
    Exporter.serialize():                                  POST /update_weights_from_tensor
      cast-copy live weights -> persistent flat bf16 ──►     {serialized_named_tensors: [payload], base64,
      one CUDA IPC handle + per-tensor metadata              load_format: "flattened_bucket", ...}
      (pickled by torch.multiprocessing's reductions)      load(payload): map the handle, views by
                                                           metadata, copy into the live weights

This is SGLang's ``update_weights_from_tensor`` contract with its "flattened_bucket" load format
(sglang/srt/weight_sync/tensor_bucket.py; model_runner's weight updater): the payload is what its
``MultiprocessingSerializer`` makes of ``{"flattened_tensor": uint8 tensor, "metadata": [...]}``,
each metadata entry having ``name, shape, dtype, start_idx, end_idx, numel`` (byte offsets, bytes).
SGLang reads the entries by attribute, and its safe unpickler admits ``types.SimpleNamespace``,
so the entries are namespaces: no sglang import here, and real SGLang takes the same bytes. One
bucket means one IPC handle (cudaIpcOpenMemHandle per sync) instead of one per tensor (~300).

Ownership: the exporter's buffer lives as long as the trainer, so a handle stays valid after the
call that made it; what changes the buffer is the next ``serialize`` only (not an optimizer step).
The engine loads from the mapped memory and synchronizes before it answers, and the driver asks
for the next payload only once every engine has answered: no engine can read a half-written buffer.

The engine's unpickler admits only the globals a tensor payload needs (torch's rebuild functions,
dtypes, sizes, storages, namespaces), as SGLang's does: a request body cannot run code.
"""

from __future__ import annotations

import io
import pickle
import types
from multiprocessing.reduction import ForkingPickler
from typing import Any

import msgspec
import torch
import torch.multiprocessing  # noqa: F401 - registers the reductions: CUDA tensors pickle as IPC handles

from policies import weight_sync

LOAD_FORMAT = "flattened_bucket"


class Export(msgspec.Struct, frozen=True):
    """What the trainer hands the driver for one sync: the version of the weights it serialized,
    the bucket's layout (for the run's summary), and the payload the engines are sent."""

    version: int
    meta: weight_sync.BucketMeta
    serialized: bytes  # SGLang's MultiprocessingSerializer bytes: one entry of serialized_named_tensors


class Exporter:
    """The trainer's side: a plan over live tensors (views of the learner's weights, read at each
    ``serialize``) and the persistent flat buffer they are cast into, in the engines' dtype."""

    def __init__(self, tensors: list[tuple[str, torch.Tensor]], *, dtype: torch.dtype):
        (self.meta,) = weight_sync.plan_buckets(tensors, dtype=dtype, bucket_bytes=1 << 62)  # one bucket
        by_name = dict(tensors)
        self._sources = [by_name[n] for n in self.meta.names]
        self.flat = weight_sync.empty_bucket(self.meta, tensors[0][1].device)
        self._views = [t for _, t in weight_sync.unflatten(self.flat, self.meta)]
        if not self.flat.is_cuda:
            # CPU (tests only; the runtime refuses ipc without GPUs): share by /dev/shm file name,
            # since the default (file descriptors) needs the receiver to share our authkey
            torch.multiprocessing.set_sharing_strategy("file_system")

    def retarget(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Read the next ``serialize`` from ``tensors`` (the plan's names and shapes), for a trainer
        whose served tensors are rebuilt at each sync (the Megatron learner's gathered HF tensors);
        the buffer, and so the engines' handle, stays the same."""
        by_name = dict(tensors)
        self._sources = [by_name[n] for n in self.meta.names]

    @torch.no_grad()
    def serialize(self) -> bytes:
        """Copy the current weights into the buffer and return the payload that names it."""
        torch._foreach_copy_(self._views, [t.detach() for t in self._sources])
        if self.flat.is_cuda:
            # the engine's process reads through its own stream: the copy must be done, not queued
            torch.cuda.current_stream(self.flat.device).synchronize()
        return dumps({"flattened_tensor": self.flat, "metadata": metadata(self.meta)})


def metadata(meta: weight_sync.BucketMeta) -> list[types.SimpleNamespace]:
    """SGLang's FlattenedTensorMetadata fields for each tensor of a one-dtype bucket."""
    out, offset = [], 0
    for name, dtype_s, shape in zip(meta.names, meta.dtypes, meta.shapes, strict=True):
        size = torch.Size(shape)
        nbytes = size.numel() * weight_sync.dtype_of(dtype_s).itemsize
        out.append(types.SimpleNamespace(name=name, shape=size, dtype=weight_sync.dtype_of(dtype_s),
                                         start_idx=offset, end_idx=offset + nbytes, numel=nbytes))
        offset += nbytes
    return out


def dumps(obj: Any) -> bytes:
    """SGLang's MultiprocessingSerializer.serialize (bytes; JSON bodies carry them base64)."""
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    return _Unpickler(io.BytesIO(data)).load()


def named_tensors(payload: Any) -> list[tuple[str, torch.Tensor]]:
    """Views of a flattened-bucket payload's tensor, one per metadata entry (no copy)."""
    if not isinstance(payload, dict) or not {"flattened_tensor", "metadata"} <= payload.keys():
        raise ValueError("a flattened_bucket payload is a dict with flattened_tensor and metadata")
    flat = payload["flattened_tensor"]
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError("flattened_tensor must be a 1-d uint8 tensor")
    out = []
    for m in payload["metadata"]:
        if not 0 <= m.start_idx <= m.end_idx <= flat.numel() or m.start_idx % m.dtype.itemsize:
            raise ValueError(f"tensor {m.name}: bytes [{m.start_idx}, {m.end_idx}) out of the bucket or unaligned")
        out.append((m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)))
    return out


def _allowed() -> set[tuple[str, str]]:
    dtypes = {("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}
    reductions = {("torch.multiprocessing.reductions", n) for n in (
        "rebuild_tensor", "rebuild_cuda_tensor", "rebuild_typed_storage", "rebuild_storage_filename",
        "rebuild_storage_empty")}
    return dtypes | reductions | {
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("types", "SimpleNamespace"),
        ("torch", "Tensor"), ("torch", "Size"), ("torch", "device"), ("torch", "UntypedStorage"),
        ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
        ("torch._utils", "_rebuild_tensor_v2"),
    }


class _Unpickler(pickle.Unpickler):
    ALLOWED = frozenset(_allowed())

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} in a tensor payload")
        return super().find_class(module, name)
