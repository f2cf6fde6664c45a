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

