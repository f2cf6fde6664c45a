"""The fixed-shape decode step of a Qwen3-shaped model over a SlotCache (CUDA graphs on a GPU).

Used by ModelRunner (runner.py) for the models it supports; see SlotDecoder's docstring for why.
"""

from __future__ import annotations

import logging
import sys

import torch

from policies.engine import batch_cache
from policies.engine.batch_cache import SlotCache
from policies.engine.sampling import Row

log = logging.getLogger("engine.runner")


class SlotDecoder:
    """The decode step of a Qwen3-shaped model over a SlotCache, replayed as CUDA graphs on CUDA.

    Why: HF's eager forward is ~1,400 small kernels per decode step for 28 layers, each launched
    from Python; at a few hundred rows the GPU finishes them far faster than the CPU issues them
    (~30 ms per step of launch overhead against ~5 ms of kernels on an H100). A CUDA graph
    replays the whole step with one launch. That needs fixed shapes and addresses: the rows of a
    step are padded to a bucket size (one graph per bucket, captured the first time it is met),
    the cache is a preallocated SlotCache, and the per-step inputs (token, position, the row's
    first and next column) are copied into one fixed device tensor before the replay.

    The step is HF's own computation, module by module (its embedding, RMSNorms, projections,
    rotary embedding and MLPs are called as they are), except the cache write and the attention:
    each row's new key/value is written at its column, and attention runs over the buffer's
    columns with a mask that keeps [start, end] of each row, so each row still gets the logits
    of its sequence run alone (padding columns and padded rows change nothing but rounding).
    Grouped-query attention folds the query heads sharing a KV head into the query length
    (q [rows, kv_heads, group, head_dim]), the same dot products without copying K/V per group.

    Graphs are captured with capture_error_mode="thread_local": the weight-receiving thread may
    use the GPU meanwhile. Weight loads copy into the parameters in place, so graphs stay valid;
    a reallocated cache (new generation) drops them. If capture fails, decoding goes on eagerly.
    """

    def __init__(self, model: torch.nn.Module, *, device: torch.device, cuda_graphs: bool) -> None:
        config = model.config
        self.model = model
        self.inner = model.model
        attn = self.inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.group = config.num_attention_heads // config.num_key_value_heads
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        dtype = self.inner.embed_tokens.weight.dtype
        self.cache = SlotCache(
            layers=len(self.inner.layers), kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=dtype, device=device
        )
        self.device = device
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._generation = -1
        self._inputs: torch.Tensor | None = None  # [4, rows capacity]: ids, positions, starts, ends
        self._pool = None

    def release(self) -> None:
        """Free the slot buffers and every captured graph (and its memory pool)."""
        self._graphs.clear()
        self._pool = None
        self._inputs = None
        self.cache.release()

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Qwen3 with SDPA attention and plain rotary embeddings (what policies/model.py builds)."""
        config = model.config
        inner = getattr(model, "model", None)
        return (
            config.model_type == "qwen3"
            and config._attn_implementation == "sdpa"
            and inner is not None
            and getattr(inner.rotary_emb, "rope_type", None) == "default"
            and not getattr(inner, "has_sliding_layers", False)
            and batch_cache.supports(config)
        )

    @staticmethod
    def bucket(n: int) -> int:
        """Rows a step is padded to: few graphs, little padding (at most 1/8 past 64 rows)."""
        if n <= 8:
            return 8
        step = 8 if n <= 64 else max(16, 1 << (n.bit_length() - 4))
        return -(-n // step) * step

    def decode(self, rows: list[Row]) -> torch.Tensor:
        """Feed rows 0..n-1 of the cache (in this order) their last token; returns [n, V] logits."""
        n, cache = len(rows), self.cache
        cache.make_room()
        b = self.bucket(n) if self.cuda_graphs else n
        cache.reserve(b, cache.width_capacity)
        if cache.generation != self._generation:
            self._graphs.clear()
            self._pool = None
            self._inputs = torch.zeros(4, cache.rows_capacity, dtype=torch.long, device=self.device)
            self._generation = cache.generation
        pad = [0] * (b - n)  # padded rows: token 0 at column 0 of a free slot, attending to it alone
        host = torch.tensor(
            [
                [r.tokens[-1] for r in rows] + pad,
                [len(r.tokens) - 1 for r in rows] + pad,
                cache.starts + pad,
                cache.ends + pad,
            ]
        )
        inputs = self._inputs[:, :b]
        inputs.copy_(host, non_blocking=self.device.type == "cuda")
        if not self.cuda_graphs:
            logits = self.forward(inputs)
        elif b in self._graphs:
            graph, out = self._graphs[b]
            graph.replay()
            logits = out
        else:
            logits = self._capture(inputs, b)
        cache.commit_decode()
        return logits[:n]

    def _capture(self, inputs: torch.Tensor, b: int) -> torch.Tensor:
        """Run this step eagerly on a side stream (the warm-up capture needs), then capture it for later steps."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            logits = self.forward(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # capturing runs nothing: the step's real work (cache writes included) was the eager run above
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self.forward(inputs)
            self._graphs[b] = (graph, out)
        except Exception:
            log.exception("CUDA graph capture failed: decoding without graphs")
            self.cuda_graphs = False
            self._graphs.clear()
        return logits

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The decode step for inputs [4, b] (fixed shapes: b rows over the cache's columns)."""
        ids, positions, starts, ends = inputs
        b, kv, m = inputs.shape[1], self.cache.kv, self.inner
        columns = torch.arange(kv.shape[4], device=kv.device)
        mask = ((columns >= starts[:, None]) & (columns <= ends[:, None]))[:, None, None, :]  # [b, 1, 1, W]
        slots = torch.arange(b, device=kv.device)
        hidden = m.embed_tokens(ids[:, None])  # [b, 1, hidden]
        cos, sin = m.rotary_emb(hidden, positions[:, None])
        shape = (b, 1, -1, self.head_dim)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            keys, values = kv[i, 0, :b], kv[i, 1, :b]  # [b, kv_heads, W, head_dim]
            keys[slots, :, ends] = k[:, :, 0]
            values[slots, :, ends] = v[:, :, 0]
            q = q.reshape(b, self.kv_heads, self.group, self.head_dim)  # head h = kv_head * group + g
            out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
            hidden = residual + attn.o_proj(out.reshape(b, 1, -1))
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(m.norm(hidden))[:, 0]
