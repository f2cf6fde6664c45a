"""Decode attention over the slot buffer: one query token per row against its live columns.

SlotDecoder (slot_decoder.py) calls `prepare` once per step with each row's live column range
[start, end] and then the attention once per layer. Three implementations, same results up to
rounding:

- TritonDecode (the default on CUDA when triton is importable; ASYNCRL_ENGINE_ATTENTION=sdpa turns
  it off): triton_decode.py's split-KV kernel, each row reading only its live columns and each KV
  head once for the query heads that share it. One compile serves every row/width bucket.

- SdpaDecode: torch's scaled_dot_product_attention with a boolean mask over the step's width
  bucket. Grouped-query attention folds the query heads sharing a KV head into the query length
  (q [rows, kv_heads, group, head_dim]): the same dot products without copying K/V per group.
  Every row reads every column of the bucket, live or not. Runs everywhere.
- FlexDecode: torch's flex_attention (compiled to a Triton split-KV decode kernel) with a block
  mask built from the live ranges, so each row reads only the 128-column blocks it uses. Opt-in
  (ASYNCRL_ENGINE_FLEX=1; CUDA, half precision, head_dim 64/128/256). The kernel alone is faster
  (H200, 512 rows x 600 cached tokens, benchmarks/engine_gpu_profile.py: 350 us per layer against
  612 us for SDPA's fastest backend over the same bucket, 3.6 against 2.1 TB/s of live K/V), but
  through the engine it was slower (512 x (128 + 1,024): 7,214 tokens/s against 16,957 with
  SDPA), most likely because it recompiles (~8 s each) at graph captures of new row/width
  buckets despite dynamic=True: not the default until that is found and measured. Its first eager
  run is checked against SdpaDecode, and any failure (compile, kernel, mismatch) falls back to
  SdpaDecode for good (SlotDecoder does that).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os

import torch

log = logging.getLogger("engine.runner")

FLEX_ENV = "ASYNCRL_ENGINE_FLEX"  # "1" turns FlexDecode on
ATTENTION_ENV = "ASYNCRL_ENGINE_ATTENTION"  # "sdpa" keeps the Triton kernel off on CUDA


class SdpaDecode:
    name = "sdpa"

    def __init__(self, *, kv_heads: int, group: int) -> None:
        self.kv_heads, self.group = kv_heads, group
        self.mask: torch.Tensor | None = None

    def prepare(self, starts: torch.Tensor, ends: torch.Tensor, width: int) -> None:
        columns = torch.arange(width, device=starts.device)
        self.mask = ((columns >= starts[:, None]) & (columns <= ends[:, None]))[:, None, None, :]  # [b, 1, 1, w]

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """q [b, heads, 1, d] (head h = kv_head * group + g), keys/values [b, kv_heads, w, d] -> [b, heads, 1, d]."""
        b, heads, _, d = q.shape
        folded = q.reshape(b, self.kv_heads, self.group, d)
        out = torch.nn.functional.scaled_dot_product_attention(folded, keys, values, attn_mask=self.mask, scale=scale)
        return out.reshape(b, heads, 1, d)


class FlexDecode:
    name = "flex"
    BLOCK = 128  # flex_attention's sparse block size: rows skip whole blocks of this many columns

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        self._from_kv_blocks = BlockMask.from_kv_blocks
        params = inspect.signature(BlockMask.from_kv_blocks).parameters
        self._extra = {"compute_q_blocks": False} if "compute_q_blocks" in params else {}  # no backward here
        # shapes change with the row and width buckets: compiled once for any shape (a compile
        # takes seconds), and a failure to compile shows at the first step (then SDPA takes over)
        self._flex = torch.compile(flex_attention, dynamic=True)
        self.block = None

    @staticmethod
    def usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or head_dim not in (64, 128, 256):
            return False
        if os.environ.get(FLEX_ENV, "0") != "1":
            return False
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None

    def prepare(self, starts: torch.Tensor, ends: torch.Tensor, width: int) -> None:
        """The block mask of this step: row i's blocks from starts[i] // BLOCK to ends[i] // BLOCK, the
        partial ones cut to [start, end] by the mask function."""
        blocks = -(-width // self.BLOCK)
        first = torch.div(starts, self.BLOCK, rounding_mode="floor").to(torch.int32)
        count = torch.div(ends, self.BLOCK, rounding_mode="floor").to(torch.int32) - first + 1
        index = (first[:, None] + torch.arange(blocks, dtype=torch.int32, device=starts.device)).clamp(max=blocks - 1)

        def live(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex_attention's mask_mod signature
            return (kv_idx >= starts[b]) & (kv_idx <= ends[b])

        self.block = self._from_kv_blocks(
            count[:, None, None], index[:, None, None, :], BLOCK_SIZE=self.BLOCK, mask_mod=live,
            seq_lengths=(1, width), **self._extra,
        )  # fmt: skip

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        return self._flex(q, keys, values, block_mask=self.block, scale=scale, enable_gqa=True)


class TritonDecode:
    name = "triton"

    def __init__(self, device: torch.device, *, kv_heads: int) -> None:
        from policies.engine import triton_decode

        self._kernel, self.kv_heads = triton_decode, kv_heads
        # (row, head, split) programs enough to keep every SM busy through a few waves
        self._programs = 8 * torch.cuda.get_device_properties(device).multi_processor_count
        self.starts = self.ends = None
        self.splits = 1

    @staticmethod
    def usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or head_dim not in (64, 128, 256):
            return False
        if os.environ.get(ATTENTION_ENV, "triton") != "triton" or os.environ.get(FLEX_ENV, "0") == "1":
            return False
        return importlib.util.find_spec("triton") is not None

    def prepare(self, starts: torch.Tensor, ends: torch.Tensor, width: int) -> None:
        self.starts, self.ends = starts, ends
        self.splits = self._kernel.splits_for(len(starts), self.kv_heads, width, self._programs)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        return self._kernel.decode_attention(q, keys, values, self.starts, self.ends, scale, self.splits)


def agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Half-precision attention outputs equal up to rounding (|diff| within 2% of the output's scale)."""
    scale = want.float().abs().max().clamp(min=1e-3)
    return bool(((got.float() - want.float()).abs().max() <= 0.02 * scale).item())
