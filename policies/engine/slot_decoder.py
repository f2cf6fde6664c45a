"""The fixed-shape decode step of a Qwen3- or Llama-shaped model over a SlotCache (CUDA graphs on a GPU).

Used by ModelRunner (runner.py) for the models it supports; see SlotDecoder's docstring for why.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

import torch

from policies.engine import batch_cache
from policies.engine.decode_attention import FlexDecode, SdpaDecode, TritonDecode, agree
from policies.engine.slot_cache import SlotCache

if TYPE_CHECKING:
    from policies.engine.sampling import Row

log = logging.getLogger("engine.runner")

# HF model types whose decoder layers are pre-norm attention (q/k/v/o projections, optional per-head
# q/k RMSNorm as in Qwen3) + MLP, with rotary embeddings from the model's own rotary_emb
MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")
# rotary embeddings whose cos/sin depend on the position alone (dynamic types rescale with the length)
STATIC_ROPE = ("default", "linear", "llama3")
COMPILE_ENV = "ASYNCRL_ENGINE_COMPILE"  # "0": decoder layers stay eager on CUDA; "1": compiled on any device


def compile_wanted(device: torch.device) -> bool:
    """Compile the decoder layers' non-attention work: on CUDA by default (ASYNCRL_ENGINE_COMPILE=0
    turns it off), elsewhere only when ASYNCRL_ENGINE_COMPILE=1."""
    default = "1" if device.type == "cuda" else "0"
    return os.environ.get(COMPILE_ENV, default) == "1"


def attention_inputs(layer, hidden, cos, sin, rope, qk_norm: bool, head_dim: int):  # noqa: ANN001, ANN201
    """One decoder layer up to its attention: q [b, heads, 1, d], k and v [b, kv_heads, 1, d] (HF's
    modules as they are: the input RMSNorm, q/k/v projections, Qwen3's q/k norms, rotary)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (hidden.shape[0], 1, -1, head_dim)
    q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, attn.v_proj(x).view(shape).transpose(1, 2)


def attention_output(layer, hidden, o):  # noqa: ANN001, ANN201
    """The rest of the layer after attention's output o [b, heads, 1, d]: o_proj, residuals, the MLP."""
    hidden = hidden + layer.self_attn.o_proj(o.reshape(hidden.shape[0], 1, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class SlotDecoder:
    """The decode step of a Qwen3/Llama-shaped model over a SlotCache, replayed as CUDA graphs on CUDA.

    Why: HF's eager forward is ~1,400 small kernels per decode step for 28 layers, each launched
    from Python; at a few hundred rows the GPU finishes them far faster than the CPU issues them
    (~30 ms per step of launch overhead against ~5 ms of kernels on an H100). A CUDA graph
    replays the whole step with one launch. That needs fixed shapes and addresses: the rows of a
    step are padded to a bucket size, the columns attended to are cut to a width bucket (a multiple
    of WIDTH_STEP past the longest live row, never the whole buffer: at long contexts reading K/V is
    most of a step, and reading a buffer grown for later tokens wasted up to half of it), one graph
    per (rows, width) pair, captured the first time it is met; the cache is a preallocated
    SlotCache, and the per-step inputs (token, position, the row's first and next column) are
    copied into one fixed device tensor before the replay. Every graph writes its logits into one
    shared buffer (a [rows, vocab] output per graph would cost ~150 MB each at 512 rows).

    The step is HF's own computation, module by module (its embedding, RMSNorms, projections,
    rotary embedding and MLPs are called as they are), except the cache write and the attention:
    each row's new key/value is written at its column, and attention runs over the width bucket
    keeping [start, end] of each row (decode_attention.py: on a GPU a Triton split-KV kernel that
    reads only those columns; SDPA with a mask elsewhere), so each row still gets the logits of its
    sequence run alone (padding columns and padded rows change nothing but rounding). On CUDA the
    layer's work before and after attention is two torch.compile'd functions (`attention_inputs`,
    `attention_output`: the same HF modules, fused into a few kernels; ASYNCRL_ENGINE_COMPILE).

    Graphs are captured with capture_error_mode="thread_local": the weight-receiving thread may
    use the GPU meanwhile. Weight loads copy into the parameters in place, so graphs stay valid;
    a reallocated cache (new generation) drops them. If capture fails, decoding goes on eagerly.
    """

    WIDTH_STEP = 256  # width buckets: few graphs, at most WIDTH_STEP - 1 columns read past the longest row

    def __init__(self, model: torch.nn.Module, *, device: torch.device, cuda_graphs: bool) -> None:
        config = model.config
        self.model = model
        self.inner = model.model
        attn = self.inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.group = config.num_attention_heads // config.num_key_value_heads
        self.qk_norm = hasattr(attn, "q_norm")
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        dtype = self.inner.embed_tokens.weight.dtype
        self.cache = SlotCache(
            layers=len(self.inner.layers), kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=dtype, device=device
        )
        self.device = device
        self.cuda_graphs = cuda_graphs
        self._sdpa = SdpaDecode(kv_heads=self.kv_heads, group=self.group)
        self.attention: TritonDecode | FlexDecode | SdpaDecode = self._sdpa
        if TritonDecode.usable(device, dtype, self.head_dim):
            self.attention = TritonDecode(device, kv_heads=self.kv_heads)
        elif FlexDecode.usable(device, dtype, self.head_dim):
            self.attention = FlexDecode()
        self._check_kernel = self.attention is not self._sdpa  # its first eager step is compared with SDPA
        self._before, self._after = attention_inputs, attention_output
        self.compiled = compile_wanted(device)
        if self.compiled:
            # ~20 small kernels per layer (RMSNorms, rotary, residuals, SiLU) fuse into a few: at
            # 512 rows x 600 tokens on an H200 they took 2.4 of a step's 15 ms of GPU time, fused
            # 0.4. The two functions are the same code for every layer (the layer's weights are
            # inputs to the graph), and dynamic=True covers every row bucket, so a process compiles
            # each once. Failure falls back to eager.
            self._before = torch.compile(attention_inputs, dynamic=True)
            self._after = torch.compile(attention_output, dynamic=True)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._generation = -1
        self._inputs: torch.Tensor | None = None  # [4, rows capacity]: ids, positions, starts, ends
        self._logits: torch.Tensor | None = None  # [rows capacity, vocab]: every graph's output
        self._pool = None

    def release(self) -> None:
        """Free the slot buffers and every captured graph (and its memory pool)."""
        self._graphs.clear()
        self._pool = None
        self._inputs = self._logits = None
        self.cache.release()

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Qwen3/Qwen2/Llama/Mistral with SDPA attention, static rotary embeddings, no sliding window."""
        config = model.config
        inner = getattr(model, "model", None)
        return (
            config.model_type in MODEL_TYPES
            and config._attn_implementation == "sdpa"
            and inner is not None
            and getattr(inner.rotary_emb, "rope_type", None) in STATIC_ROPE
            and not getattr(inner, "has_sliding_layers", False)
            and getattr(config, "sliding_window", None) is None
            and batch_cache.supports(config)
        )

    @staticmethod
    def bucket(n: int) -> int:
        """Rows a step is padded to: few graphs, little padding (at most 1/8 past 64 rows)."""
        if n <= 8:
            return 8
        step = 8 if n <= 64 else max(16, 1 << (n.bit_length() - 4))
        return -(-n // step) * step

    def width_bucket(self) -> int:
        """Columns a step attends to: past every row's next column, rounded up, within the buffer."""
        need = max(self.cache.ends, default=0) + 1
        return min(-(-need // self.WIDTH_STEP) * self.WIDTH_STEP, self.cache.width_capacity)

    def decode(self, rows: list[Row]) -> torch.Tensor:
        """Feed each row (all cached, `cache.keep` done) its last token; returns [n, V] logits, row-aligned."""
        n, cache = len(rows), self.cache
        cache.make_room()
        b = self.bucket(n) if self.cuda_graphs else n
        cache.reserve(b, cache.width_capacity)
        if cache.generation != self._generation:
            self._graphs.clear()
            self._pool = None
            self._inputs = torch.zeros(4, cache.rows_capacity, dtype=torch.long, device=self.device)
            self._logits = None
            self._generation = cache.generation
        w = self.width_bucket()
        slots = [cache.slot_of(r.key) for r in rows]
        ids, positions = [0] * b, [0] * b  # padded slots: token 0 at column 0, attending to it alone
        for slot, r in zip(slots, rows, strict=True):
            ids[slot], positions[slot] = r.tokens[-1], len(r.tokens) - 1
        pad = [0] * (b - n)
        host = torch.tensor([ids, positions, cache.starts + pad, cache.ends + pad])
        inputs = self._inputs[:, :b]
        inputs.copy_(host, non_blocking=self.device.type == "cuda")
        if not self.cuda_graphs:
            logits = self._eager(inputs, w)
        elif (b, w) in self._graphs:
            self._graphs[b, w].replay()
            logits = self._logits[:b]
        else:
            logits = self._capture(inputs, b, w)
        cache.commit_decode()
        if slots == list(range(n)):
            return logits[:n]
        return logits.index_select(0, torch.tensor(slots, device=logits.device))

    def _capture(self, inputs: torch.Tensor, b: int, w: int) -> torch.Tensor:
        """Run this step eagerly on a side stream (the warm-up capture needs), then capture it for later steps."""
        if self._logits is None:
            self._logits = torch.empty(
                self.cache.rows_capacity, self.model.config.vocab_size, dtype=self.cache.dtype, device=self.device
            )
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            logits = self._eager(inputs, w, out=self._logits[:b])
        torch.cuda.current_stream(self.device).wait_stream(side)
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # capturing runs nothing: the step's real work (cache writes included) was the eager run above
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self.forward(inputs, w, out=self._logits[:b])
            self._graphs[b, w] = graph
        except Exception:
            if not self._give_up_fastest("CUDA graph capture"):
                log.exception("CUDA graph capture failed: decoding without graphs")
                self.cuda_graphs = False
                self._graphs.clear()
        return logits

    def _eager(self, inputs: torch.Tensor, w: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """`forward`, giving up for good the compiled layers, then the Triton or flex attention, at
        each failure (the cache writes a failed run made are the same the rerun makes)."""
        while True:
            try:
                return self.forward(inputs, w, out=out)
            except Exception:
                if not self._give_up_fastest("a decode step"):
                    raise

    def _give_up_fastest(self, what: str) -> bool:
        """After a failure of `what` (logged here): leave the compiled layers for eager ones or, when
        they are already eager, the Triton/flex attention for SDPA. False when nothing is left."""
        if self.compiled:
            log.exception("%s with compiled decoder layers failed: eager layers from now", what)
            self.compiled = False
            self._before, self._after = attention_inputs, attention_output
        elif self.attention is not self._sdpa:
            log.exception("%s with %s attention failed: SDPA from now", what, self.attention.name)
            self.attention = self._sdpa
        else:
            return False
        self._graphs.clear()
        return True

    def forward(self, inputs: torch.Tensor, w: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The decode step for inputs [4, b] over the first w columns (fixed shapes); logits [b, V]
        (written into `out` when given)."""
        ids, positions, starts, ends = inputs
        b, m, attention = inputs.shape[1], self.inner, self.attention
        capturing = inputs.is_cuda and torch.cuda.is_current_stream_capturing()
        check = self._check_kernel and attention is not self._sdpa and not capturing
        attention.prepare(starts, ends, w)
        slots = torch.arange(b, device=inputs.device)
        hidden = m.embed_tokens(ids[:, None])  # [b, 1, hidden]
        cos, sin = m.rotary_emb(hidden, positions[:, None])
        for i, (layer, kv) in enumerate(zip(m.layers, self.cache.kv, strict=True)):
            q, k, v = self._before(layer, hidden, cos, sin, self.rope, self.qk_norm, self.head_dim)
            keys, values = kv[0, :b, :, :w], kv[1, :b, :, :w]  # [b, kv_heads, w, head_dim]
            keys[slots, :, ends] = k[:, :, 0]
            values[slots, :, ends] = v[:, :, 0]
            scale = layer.self_attn.scaling
            o = attention(q, keys, values, scale)  # [b, heads, 1, head_dim]
            if check and i == 0:
                self._sdpa.prepare(starts, ends, w)
                if not agree(o, self._sdpa(q, keys, values, scale)):
                    raise RuntimeError(f"{attention.name} attention disagrees with SDPA")
                self._check_kernel = False
            hidden = self._after(layer, hidden, o)
        normed = m.norm(hidden)[:, 0]
        head = self.model.lm_head
        if out is None:
            return head(normed)
        torch.mm(normed, head.weight.t(), out=out)
        if head.bias is not None:
            out += head.bias
        return out
