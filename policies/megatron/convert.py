"""HF <-> Megatron weight layout for dense decoders (megatron-core's local spec), per TP rank.

Megatron fuses what HF keeps apart and shards along one dimension per tensor:

    HF                                    Megatron (this TP rank's shard)
    q_proj, k_proj, v_proj (+ biases)  -> self_attention.linear_qkv: per KV group g, rows
                                          [q heads of g | k of g | v of g]; TP splits the groups
    gate_proj, up_proj                 -> mlp.linear_fc1: [gate shard ; up shard] (each split by TP)
    o_proj, down_proj                  -> linear_proj, linear_fc2: split along the input dim
    embed_tokens, lm_head              -> word_embeddings, output_layer: split along the vocabulary
    norms (layer, q/k, final)          -> replicated

``to_megatron`` and ``to_hf`` are exact inverses (pure reshapes and concatenations, no arithmetic),
which the round-trip test checks for TP 1 and 2. Layer indices: HF's are global, Megatron's are
local to the pipeline stage (global = ``layer_offset`` + local).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Layout:
    """What one rank holds: its TP shard of layers [layer_offset, layer_offset + num_layers)."""

    heads: int
    groups: int  # KV heads
    head_dim: int
    num_layers: int  # on this stage
    layer_offset: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    pre_process: bool = True  # holds the embedding
    post_process: bool = True  # holds the final norm and output head
    tied: bool = False  # HF has no lm_head.weight: the output head is the embedding
    qkv_bias: bool = False
    qk_norm: bool = True

    @staticmethod
    def of(hf_config, **kw) -> Layout:
        c = hf_config
        return Layout(heads=c.num_attention_heads, groups=c.num_key_value_heads,
                      head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                      tied=bool(getattr(c, "tie_word_embeddings", False)), qkv_bias=c.model_type == "qwen2",
                      qk_norm=c.model_type == "qwen3", **{"num_layers": c.num_hidden_layers, **kw})


# Per-layer tensors that map one to one: (HF suffix, Megatron suffix, TP split dim or None).
_DIRECT = [
    ("input_layernorm.weight", "input_layernorm.weight", None),
    ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight", None),
    ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight", None),
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight", 1),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", None),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight", 1),
]


def _shard(t: Tensor, dim: int | None, lay: Layout) -> Tensor:
    return t if dim is None else t.chunk(lay.tp_size, dim)[lay.tp_rank]


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, lay: Layout) -> Tensor:
    """Full HF q/k/v (weights [out, h] or biases [out]) -> this rank's ``linear_qkv`` shard."""
    per = lay.heads // lay.groups * lay.head_dim
    tail = q.shape[1:]
    fused = torch.cat([q.reshape(lay.groups, per, *tail), k.reshape(lay.groups, lay.head_dim, *tail),
                       v.reshape(lay.groups, lay.head_dim, *tail)], dim=1)
    return fused.chunk(lay.tp_size, 0)[lay.tp_rank].reshape(-1, *tail)


def split_qkv(shards: list[Tensor], lay: Layout) -> tuple[Tensor, Tensor, Tensor]:
    """Every TP rank's ``linear_qkv`` (in rank order) -> full HF q, k, v."""
    per = lay.heads // lay.groups * lay.head_dim
    tail = shards[0].shape[1:]
    fused = torch.cat(shards, 0).reshape(lay.groups, per + 2 * lay.head_dim, *tail)
    q, k, v = fused.split([per, lay.head_dim, lay.head_dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def to_megatron(hf: Callable[[str], Tensor], lay: Layout) -> dict[str, Tensor]:
    """This rank's Megatron state dict from HF tensors (``hf(name)`` reads one full tensor, so a
    caller may read lazily from safetensors)."""
    out: dict[str, Tensor] = {}
    if lay.pre_process:
        out["embedding.word_embeddings.weight"] = _shard(hf("model.embed_tokens.weight"), 0, lay)
    for local in range(lay.num_layers):
        h, m = f"model.layers.{lay.layer_offset + local}.", f"decoder.layers.{local}."
        for hf_name, mg_name, dim in _DIRECT:
            if lay.qk_norm or "_norm." not in hf_name:
                out[m + mg_name] = _shard(hf(h + hf_name), dim, lay)
        a = h + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf(a + "q_proj.weight"), hf(a + "k_proj.weight"), hf(a + "v_proj.weight"), lay)
        if lay.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = fuse_qkv(
                hf(a + "q_proj.bias"), hf(a + "k_proj.bias"), hf(a + "v_proj.bias"), lay)
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [_shard(hf(h + "mlp.gate_proj.weight"), 0, lay), _shard(hf(h + "mlp.up_proj.weight"), 0, lay)])
    if lay.post_process:
        out["decoder.final_layernorm.weight"] = hf("model.norm.weight")
        # a tied model's last stage still has an output_layer when it is not also the first stage
        if not (lay.tied and lay.pre_process):
            head = "model.embed_tokens.weight" if lay.tied else "lm_head.weight"
            out["output_layer.weight"] = _shard(hf(head), 0, lay)
    return out


def to_hf(name: str, shards: list[Tensor], lay: Layout) -> Iterator[tuple[str, Tensor]]:
    """One Megatron tensor, given every TP rank's shard in rank order -> its HF tensor(s).

    A tied model's ``output_layer.weight`` yields nothing: HF checkpoints save the embedding once."""
    if name == "embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", torch.cat(shards, 0)
        return
    if name == "decoder.final_layernorm.weight":
        yield "model.norm.weight", shards[0]
        return
    if name == "output_layer.weight":
        if not lay.tied:
            yield "lm_head.weight", torch.cat(shards, 0)
        return
    _, _, local, rest = name.split(".", 3)  # decoder.layers.<i>.<rest>
    h = f"model.layers.{lay.layer_offset + int(local)}."
    for hf_name, mg_name, dim in _DIRECT:
        if rest == mg_name:
            yield h + hf_name, shards[0] if dim is None else torch.cat(shards, dim)
            return
    if rest.startswith("self_attention.linear_qkv."):
        kind = rest.rsplit(".", 1)[1]  # weight | bias
        for proj, t in zip(("q_proj", "k_proj", "v_proj"), split_qkv(shards, lay)):
            yield f"{h}self_attn.{proj}.{kind}", t
        return
    if rest == "mlp.linear_fc1.weight":
        gates, ups = zip(*(s.chunk(2, 0) for s in shards))
        yield h + "mlp.gate_proj.weight", torch.cat(gates, 0)
        yield h + "mlp.up_proj.weight", torch.cat(ups, 0)
        return
    raise KeyError(f"no HF name for Megatron tensor {name!r}")


def hf_gradients(model: torch.nn.Module, hf_config) -> dict[str, Tensor]:
    """This (TP=1) model's gradients under HF names, in float64: megatron DDP's fp32 ``main_grad``
    where it keeps one (GPU), else ``.grad``. For comparing a step with the HF learner's."""
    lay, out = Layout.of(hf_config), {}
    for name, p in model.named_parameters():
        grad = getattr(p, "main_grad", None)
        grad = p.grad if grad is None else grad
        out.update(to_hf(name, [grad.detach().double()], lay))
    return out
