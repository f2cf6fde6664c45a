"""A Megatron-core ``GPTModel`` for an HF dense decoder (Qwen3 / Qwen2 / Llama), from its config.

Built from megatron-core's own modules (its "local" layer spec: ColumnParallelLinear,
RowParallelLinear, SelfAttention with GQA, rotary embeddings, SwiGLU MLP, qk-layernorm) with two
substitutions, both because transformer-engine is not installed here (it is not on the lent GPU
image either, and has no CPU build):

- the core attention is ``SdpaAttention`` (torch's ``scaled_dot_product_attention``, flash / memory
  efficient kernels on GPU, exact math on CPU) instead of megatron's ``DotProductAttention``, which
  materialises the (s x s) score matrix per head. The trainer feeds right-padded rows, for which
  causal attention alone is exact: a real token never sees a pad that comes after it.
- ``PolicyGPT`` returns the final (normed) hidden states instead of logits, so the output head runs
  in token chunks (``policies.megatron.logprobs``) and no (tokens x vocab) tensor exists.

Sequence and context parallelism need transformer-engine's layers (megatron's torch norm refuses
sequence parallel; its local attention refuses context parallel): ``check_supported`` says so in
one line rather than letting megatron assert deep inside a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

SUPPORTED = {"qwen3": True, "qwen2": False, "llama": False}  # model_type -> has qk-layernorm


@dataclass(frozen=True)
class Parallelism:
    """Megatron's parallel sizes and activation recompute, named as Miles's flags."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    recompute_granularity: str | None = None  # "full" | "selective"
    recompute_method: str | None = None  # "uniform" | "block" (with "full")
    recompute_num_layers: int | None = None


def rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}  # transformers 5 keeps it here
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def check_supported(hf_config, par: Parallelism, *, have_te: bool = False) -> None:
    """Raise ``ValueError`` (one line) for a model or layout this backend does not build."""
    kind = hf_config.model_type
    if kind not in SUPPORTED:
        raise ValueError(f"the megatron backend builds {sorted(SUPPORTED)} models, not {kind!r}")
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    scaling = rope.get("rope_type", rope.get("type", "default"))
    if scaling not in ("default", None):
        raise ValueError(f"the megatron backend does not implement rope scaling {scaling!r} yet")
    tp = par.tensor_model_parallel_size
    if hf_config.vocab_size % tp or hf_config.num_key_value_heads % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} must divide the vocabulary ({hf_config.vocab_size}) "
                         f"and the KV heads ({hf_config.num_key_value_heads})")
    if hf_config.num_hidden_layers % par.pipeline_model_parallel_size:
        raise ValueError(f"--pipeline-model-parallel-size {par.pipeline_model_parallel_size} must divide "
                         f"the {hf_config.num_hidden_layers} layers")
    if (par.sequence_parallel or par.context_parallel_size > 1) and not have_te:
        raise ValueError("--sequence-parallel and --context-parallel-size > 1 need transformer-engine's layers "
                         "(megatron-core's local norm and attention refuse them); it is not installed")
    if par.expert_model_parallel_size > 1:
        raise ValueError("--expert-model-parallel-size > 1 needs an MoE model; this backend builds dense ones")
    if par.sequence_parallel and tp == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")


def transformer_config(hf_config, par: Parallelism, *, dtype: torch.dtype, on_gpu: bool) -> TransformerConfig:
    """The ``TransformerConfig`` equivalent to ``hf_config``. ``dtype`` is the weights' dtype (fp32
    master weights on GPU, compute in bf16 under autocast; float64 for exact CPU tests)."""
    c = hf_config
    recompute = par.recompute_granularity
    return TransformerConfig(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, num_query_groups=c.num_key_value_heads,
        kv_channels=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        normalization="RMSNorm", layernorm_epsilon=c.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=c.model_type == "qwen2", qk_layernorm=SUPPORTED[c.model_type],
        hidden_dropout=0.0, attention_dropout=0.0,  # RL: the learner's logprobs must be deterministic
        params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu, perform_initialization=False,  # weights come from HF
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        recompute_granularity=recompute,
        recompute_method=(par.recompute_method or "uniform") if recompute == "full" else None,
        recompute_num_layers=(par.recompute_num_layers or 1) if recompute == "full" else None,
        # the fused kernels are CUDA / apex only; the unfused paths are exact everywhere
        apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        # micro-batches differ in length (token budget): pipeline stages exchange shapes first
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
    )


class SdpaAttention(MegatronModule):
    """Megatron's core-attention slot filled by torch SDPA (causal, GQA). Takes megatron's layout
    ([s, b, heads, head_dim]) and returns [s, b, heads * head_dim] as ``DotProductAttention`` does."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SdpaAttention takes right-padded rows (causal mask), not packed sequences")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [b, heads, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class PolicyGPT(GPTModel):
    """``GPTModel`` whose last stage returns the final hidden states [s, b, h]; the output head runs
    chunked outside (``output_weight``). Overrides the one private hook where logits are made."""

    def _postprocess(self, hidden_states, **_):
        return hidden_states

    def output_weight(self) -> torch.Tensor:
        """This rank's vocabulary shard of the output head, [vocab / tp, hidden]."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def _cpu_rope(rope) -> None:
    """CPU workaround: megatron's ``RotaryEmbedding.get_emb`` moves its frequencies to
    ``torch.cuda.current_device()`` on first use. On CPU the same computation runs in place."""

    def get_emb(max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = rope.get_freqs_non_repeated(max_seq_len, offset)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # not interleaved, as HF

    rope.get_emb = get_emb


def _mark_tp_shards(model: torch.nn.Module) -> None:
    """Workaround: megatron tags a weight as a TP shard (``tensor_model_parallel``, ``partition_dim``)
    only inside its random initialisation, which ``perform_initialization=False`` skips (weights
    come from HF). Untagged, every shard counts as a duplicate: the gradient norm (ours on CPU,
    megatron's optimizer on GPU) would count only TP rank 0's shards. Tagged here as megatron would."""
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for m in model.modules():
        dim = 0 if isinstance(m, ColumnParallelLinear | VocabParallelEmbedding) else \
            1 if isinstance(m, RowParallelLinear) else None
        if dim is not None and getattr(m, "weight", None) is not None:
            set_tensor_model_parallel_attributes(m.weight, is_parallel=True, dim=dim, stride=1)
        if isinstance(m, ColumnParallelLinear) and getattr(m, "bias", None) is not None:
            set_tensor_model_parallel_attributes(m.bias, is_parallel=True, dim=0, stride=1)


def layer_spec(hf_config):
    spec = get_gpt_layer_local_spec(qk_layernorm=SUPPORTED[hf_config.model_type], normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SdpaAttention
    return spec


def build(hf_config, par: Parallelism, *, dtype: torch.dtype, on_gpu: bool, pre_process: bool = True,
          post_process: bool = True) -> PolicyGPT:
    """This pipeline stage's model (``pre_process``: holds the embedding; ``post_process``: the
    final norm and output head), parameters uninitialised until ``convert.load_hf`` fills them."""
    model = PolicyGPT(
        config=transformer_config(hf_config, par, dtype=dtype, on_gpu=on_gpu),
        transformer_layer_spec=layer_spec(hf_config),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope", rotary_base=int(rope_theta(hf_config)), rotary_percent=1.0,
        parallel_output=True,
    )
    if not on_gpu:
        _cpu_rope(model.rotary_pos_emb)
    model = model.to(dtype)  # megatron's torch norms ignore params_dtype and start as float32
    _mark_tp_shards(model)
    return model  # megatron's torch norms ignore params_dtype and start as float32
