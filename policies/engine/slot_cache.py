"""The KV cache of the fixed-shape decode step (slot_decoder.SlotDecoder): preallocated slot buffers.

batch_cache.BatchCache re-concatenates every layer's cache each decode step (HF's DynamicLayer
grows by one column) and its width changes every step, so a decode step can never be a fixed
sequence of kernels. Here each layer has one buffer [2, row capacity, kv_heads, width capacity,
head_dim] holding every row, so a decode step is the same kernels at the same addresses every time
and can be replayed as a CUDA graph. It is used for models whose decode step the runner can write
itself (SlotDecoder.supports); BatchCache otherwise.

Layout invariants:
- Slot i holds the request keys[i]; its cached tokens sit in columns [starts[i], ends[i]) and the
  next decode step writes its token's keys/values at column ends[i]. Columns outside a row's range
  are masked (they may hold another row's old values, never NaN: every value written is the output
  of a finite computation or zero).
- Slots [0, len(self)) are the live rows. `keep` fills the holes left by finished rows with the
  highest live slots, so a row moves at most once per hole and most rows never move (a finished
  row in front of 500 others used to shift all 500 through the whole buffer); callers map their
  rows to slots with `slot_of`. Slots past the live ones are free (a decode step padded to a fixed
  row count writes scratch values in column 0 there).
- Positions come from the caller, never from the column index, as in BatchCache.
- The buffers are kept across `clear` (an idle engine drops its rows after every burst, and the
  decode graphs captured on these buffers stay valid); `generation` changes whenever a buffer is
  reallocated, which invalidates those graphs. They grow one layer at a time, so growing needs one
  layer's worth of spare memory, not a second copy of the whole cache, and by at least a quarter
  (rounded to WIDTH_ALIGN columns) so long answers regrow a few times without doubling the memory
  they hold.
- starts/ends are Python lists (the truth); the decoder uploads them with the step's inputs.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class SlotCache:
    """Keys/values of the running rows in per-layer slot buffers; touched only by the decode thread."""

    MIN_ROWS, ROW_ALIGN, MIN_WIDTH, WIDTH_ALIGN = 16, 64, 64, 256  # allocation granularity

    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.kv: list[torch.Tensor] | None = None  # per layer [2, rows, kv_heads, width, head_dim]
        self.generation = 0
        self.keys: list[int] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        self._slot: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def rows_capacity(self) -> int:
        return 0 if self.kv is None else self.kv[0].shape[1]

    @property
    def width_capacity(self) -> int:
        return 0 if self.kv is None else self.kv[0].shape[3]

    @property
    def width(self) -> int:
        """The longest cached row (the most columns a decode step attends to)."""
        return max((e - s for s, e in zip(self.starts, self.ends)), default=0)

    def length_of(self, key: int) -> int | None:
        slot = self._slot.get(key)
        return None if slot is None else self.ends[slot] - self.starts[slot]

    def slot_of(self, key: int) -> int:
        return self._slot[key]

    def clear(self) -> None:
        """Forget every row; the buffers (and the graphs captured on them) stay."""
        self._set_rows([], [], [])

    def keep(self, keys: list[int]) -> None:
        """Keep only the rows of `keys` (each must have a slot), in slots 0..len(keys)-1: rows in
        slots past that move into the holes (see the module docstring); the others stay put."""
        if len(keys) == len(self.keys) and set(keys) == set(self._slot):
            return
        n = len(keys)
        kept = sorted(self._slot[k] for k in keys)
        holes = iter(sorted(set(range(n)) - set(kept)))
        moves = [(s, next(holes)) for s in kept if s >= n]  # (from, to)
        if moves:
            src = torch.tensor([m[0] for m in moves], device=self.device)
            dst = torch.tensor([m[1] for m in moves], device=self.device)
            columns = max(self.ends[s] for s, _ in moves)
            for layer in self.kv:
                layer[:, dst, :, :columns] = layer[:, src, :, :columns]
        target = dict(moves)
        by_slot = {target.get(s, s): s for s in kept}  # new slot -> old slot, for every slot < n
        self._set_rows(
            [self.keys[by_slot[j]] for j in range(n)],
            [self.starts[by_slot[j]] for j in range(n)],
            [self.ends[by_slot[j]] for j in range(n)],
        )

    def make_room(self) -> None:
        """Before a decode step: make column ends[i] writable for every row, first by cutting the
        leading columns no row uses any more, else by widening the buffers."""
        need = max(self.ends, default=0) + 1
        if need <= self.width_capacity:
            return
        shift = min(self.starts)
        if shift > 0 and need - shift <= self.width_capacity:
            n, live = len(self), need - 1 - shift
            for layer in self.kv:
                layer[:, :n, :, :live] = layer[:, :n, :, shift : shift + live].clone()
                layer[:, :n, :, live:] = 0
            self._set_rows(self.keys, [x - shift for x in self.starts], [x - shift for x in self.ends])
        else:
            self.reserve(len(self), need)

    def reserve(self, rows: int, width: int) -> None:
        """Make room for `rows` slots of `width` columns (reallocating: a new generation)."""
        if self.kv is not None and rows <= self.rows_capacity and width <= self.width_capacity:
            return
        rows_cap = max(self.MIN_ROWS, -(-max(rows, self.rows_capacity) // self.ROW_ALIGN) * self.ROW_ALIGN)
        width_cap = self.width_capacity
        if width > width_cap:
            grown = max(width, width_cap + width_cap // 4, self.MIN_WIDTH)
            # a GPU aligns from the first allocation (its graphs attend to WIDTH_ALIGN buckets); a CPU
            # attends to the whole buffer (SDPA there is faster on the contiguous buffer than on a
            # cut of it), so small buffers stay exact there
            if self.device.type == "cuda" or grown > self.WIDTH_ALIGN:
                grown = -(-grown // self.WIDTH_ALIGN) * self.WIDTH_ALIGN
            width_cap = grown
        n, w = len(self), min(self.width_capacity, width_cap)
        old, self.kv = self.kv, []
        for i in range(self.layers):  # one layer at a time: the old one is freed before the next is made
            shape = (2, rows_cap, self.kv_heads, width_cap, self.head_dim)
            layer = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old is not None:
                if n:
                    layer[:, :n, :, :w] = old[i][:, :n, :, :w]
                old[i] = None
            self.kv.append(layer)
        self.generation += 1

    def release(self) -> None:
        self.kv = None
        self.generation += 1
        self.clear()

    def commit_decode(self) -> None:
        """Record that a decode step wrote one column (at `ends`) for every row."""
        self.ends = [e + 1 for e in self.ends]

    def append(self, keys: list[int], lengths: list[int], kv: DynamicCache, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows (HF's left-padded cache and mask) after the current ones."""
        n, fresh, width = len(self), len(keys), mask.shape[1]
        self.reserve(n + fresh, width + 1)
        pad = mask[:, None, :, None] == 0
        for i, layer in enumerate(kv.layers):
            for j, t in enumerate((layer.keys, layer.values)):
                dest = self.kv[i][j, n : n + fresh]
                dest[:, :, :width] = t.masked_fill(pad, 0)
                dest[:, :, width:] = 0
        self._set_rows(self.keys + keys, self.starts + [width - m for m in lengths], self.ends + [width] * fresh)

    def _set_rows(self, keys: list[int], starts: list[int], ends: list[int]) -> None:
        self.keys, self.starts, self.ends = keys, starts, ends
        self._slot = {k: i for i, k in enumerate(keys)}
