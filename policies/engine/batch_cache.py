"""The KV cache of the running batch: one left-padded tensor pair per layer, rows keyed by request.

Why this layout (and not per-request tensors restacked every step, or a paged pool): a decode step
must be one forward over every running row, and HF attention takes one [rows, kv_heads, width,
head_dim] key/value tensor per layer plus a [rows, width] padding mask. Keeping the cache in
exactly that shape makes a decode step free of copies beyond the one-column append HF does itself
(`DynamicLayer.update`); the cost moves to the rare events where the batch changes: rows that
leave are dropped with one `index_select` per tensor, rows that join are left-padded and
concatenated once. It works for any model whose HF cache is a list of plain `DynamicLayer`s
(every Qwen3/Llama-shaped model built by `policies/model.py`); `supports` says whether it does.

Layout invariants:
- Rows are right-aligned: every row's real tokens end at the last column, so a decode step adds
  one column for all rows, and `mask[i]` is 0 on the row's left padding and 1 on its tokens.
- `lengths[i]` is how many tokens row i has in the cache (its prompt + generated tokens, minus the
  last sampled one, which is fed by the next decode step). Positions come from the caller, never
  from the column index, so the padding does not shift rotary embeddings.
- After `keep`, the width is the longest row's length: leading columns that are padding in every
  row are cut, so the width never exceeds the context length.
- Pad slots hold zeros, never NaN: a masked slot gets weight 0, and 0 * NaN would still poison
  the weighted sum (what an attention implementation writes for an all-padding query varies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def supports(config: object) -> bool:
    """True when the model's HF cache is plain growing layers (no sliding window, no linear state)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


class BatchCache:
    """Keys/values of the rows the runner decodes; touched only by the decode thread."""

    def __init__(self) -> None:
        self.kv: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, width], int64, 1 on real tokens
        self.keys: list[int] = []  # row i belongs to the request with key keys[i]
        self.lengths: list[int] = []
        self._row: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def length_of(self, key: int) -> int | None:
        """Tokens cached for `key`, or None when it has no row."""
        row = self._row.get(key)
        return None if row is None else self.lengths[row]

    def clear(self) -> None:
        self.kv = self.mask = None
        self._set_rows([], [])

    def keep(self, keys: list[int]) -> None:
        """Keep only the rows of `keys`, in that order (each must have a row); cut dead columns."""
        if keys == self.keys:
            return
        if not keys:
            self.clear()
            return
        rows = [self._row[k] for k in keys]
        lengths = [self.lengths[r] for r in rows]
        start = self.mask.shape[1] - max(lengths)
        index = torch.tensor(rows, device=self.mask.device)
        for layer in self.kv.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = self.mask.index_select(0, index)[:, start:]
        self._set_rows(keys, lengths)

    def grown_mask(self) -> torch.Tensor:
        """The mask a decode step attends with: the cache plus one column for the token it feeds."""
        return F.pad(self.mask, (0, 1), value=1)

    def commit_decode(self, mask: torch.Tensor) -> None:
        """Record that a decode step appended one column (HF grew `kv` in place)."""
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]

    def append(self, keys: list[int], lengths: list[int], kv: DynamicCache, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows (their own left-padded cache and mask) after the current ones."""
        pad = mask[:, None, :, None] == 0
        for layer in kv.layers:
            layer.keys.masked_fill_(pad, 0)
            layer.values.masked_fill_(pad, 0)
        if not self.keys:
            self.kv, self.mask = kv, mask
            self._set_rows(keys, lengths)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.kv.layers, kv.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
        self._set_rows(self.keys + keys, self.lengths + lengths)

    def _set_rows(self, keys: list[int], lengths: list[int]) -> None:
        self.keys, self.lengths = keys, lengths
        self._row = {k: i for i, k in enumerate(keys)}


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` on the left of dimension `dim` (-1 or -2) up to `width`."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    return F.pad(t, (missing, 0) if dim == -1 else (0, 0, missing, 0))


class SlotCache:
    """Keys/values of the running rows in preallocated buffers, for the fixed-shape decode step.

    BatchCache above re-concatenates every layer's cache each decode step (HF's DynamicLayer
    grows by one column) and its width changes every step, so a decode step can never be a fixed
    sequence of kernels. Here one buffer `kv` [layers, 2, row capacity, kv_heads, width capacity,
    head_dim] holds every row, so a decode step is the same kernels at the same addresses every
    time and can be replayed as a CUDA graph (slot_decoder.SlotDecoder). It is used for models whose
    decode step the runner can write itself (slot_decoder.SlotDecoder.supports); BatchCache otherwise.

    Layout invariants:
    - Row i (slot i) belongs to request keys[i]; its cached tokens sit in columns
      [starts[i], ends[i]) and the next decode step writes its token's keys/values at column
      ends[i]. Columns outside a row's range are masked (they may hold another row's old values,
      never NaN: every value written is the output of a finite computation or zero).
    - Slots [0, len(self)) are the live rows, in the order `keep` was given; slots past them are
      free (a decode step padded to a fixed row count writes scratch values in column 0 there).
    - Positions come from the caller, never from the column index, as in BatchCache.
    - The buffers are kept across `clear` (an idle engine drops its rows after every burst, and
      the decode graphs captured on these buffers stay valid); `generation` changes whenever `kv`
      is reallocated, which invalidates those graphs.
    - starts/ends are Python lists (the truth); the decoder uploads them with the step's inputs.
    """

    MIN_ROWS, ROW_ALIGN, MIN_WIDTH = 16, 64, 64  # allocation granularity (rows, rows, columns)

    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.kv: torch.Tensor | None = None
        self.generation = 0
        self.keys: list[int] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        self._row: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def rows_capacity(self) -> int:
        return 0 if self.kv is None else self.kv.shape[2]

    @property
    def width_capacity(self) -> int:
        return 0 if self.kv is None else self.kv.shape[4]

    @property
    def width(self) -> int:
        """The longest cached row (the most columns a decode step attends to)."""
        return max((e - s for s, e in zip(self.starts, self.ends)), default=0)

    def length_of(self, key: int) -> int | None:
        row = self._row.get(key)
        return None if row is None else self.ends[row] - self.starts[row]

    def clear(self) -> None:
        """Forget every row; the buffers (and the graphs captured on them) stay."""
        self._set_rows([], [], [])

    def keep(self, keys: list[int]) -> None:
        """Keep only the rows of `keys`, in that order, in slots 0..len(keys)-1."""
        if keys == self.keys:
            return
        rows = [self._row[k] for k in keys]
        starts, ends = [self.starts[r] for r in rows], [self.ends[r] for r in rows]
        if rows != list(range(len(rows))):  # a prefix needs no copy
            index = torch.tensor(rows, device=self.device)
            self.kv[:, :, : len(rows)] = self.kv.index_select(2, index)
        self._set_rows(keys, starts, ends)

    def make_room(self) -> None:
        """Before a decode step: make column ends[i] writable for every row, first by cutting the
        leading columns no row uses any more, else by widening the buffers."""
        need = max(self.ends, default=0) + 1
        if need <= self.width_capacity:
            return
        shift = min(self.starts)
        if shift > 0 and need - shift <= self.width_capacity:
            n = len(self)
            live = self.kv[:, :, :n, :, shift:].clone()
            self.kv[:, :, :n, :, : live.shape[4]] = live
            self.kv[:, :, :n, :, live.shape[4] :] = 0
            self._set_rows(self.keys, [x - shift for x in self.starts], [x - shift for x in self.ends])
        else:
            self.reserve(len(self), need)

    def reserve(self, rows: int, width: int) -> None:
        """Make room for `rows` slots of `width` columns (reallocating: a new generation)."""
        if self.kv is not None and rows <= self.rows_capacity and width <= self.width_capacity:
            return
        rows_cap = max(self.MIN_ROWS, -(-max(rows, self.rows_capacity) // self.ROW_ALIGN) * self.ROW_ALIGN)
        width_cap = max(self.MIN_WIDTH, self.width_capacity)
        while width_cap < width:
            width_cap *= 2
        kv = torch.zeros(
            self.layers, 2, rows_cap, self.kv_heads, width_cap, self.head_dim, dtype=self.dtype, device=self.device
        )
        if self.kv is not None and self.keys:
            n, w = len(self), min(self.width_capacity, width_cap)
            kv[:, :, :n, :, :w] = self.kv[:, :, :n, :, :w]
        self.kv = kv
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
                dest = self.kv[i, j, n : n + fresh]
                dest[:, :, :width] = t.masked_fill(pad, 0)
                dest[:, :, width:] = 0
        self._set_rows(self.keys + keys, self.starts + [width - m for m in lengths], self.ends + [width] * fresh)

    def _set_rows(self, keys: list[int], starts: list[int], ends: list[int]) -> None:
        self.keys, self.starts, self.ends = keys, starts, ends
        self._row = {k: i for i, k in enumerate(keys)}
