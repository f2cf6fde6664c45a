"""Per-token log-probs and entropy from final hidden states, vocab-parallel and in token chunks.

The output head's logits for a chunk of ``chunk_tokens`` tokens exist only inside that chunk's
function, which ``torch.utils.checkpoint`` recomputes in backward: no (tokens x vocab) tensor for
the whole micro-batch exists in forward or backward, and under tensor parallelism each rank only
ever holds its vocabulary shard. Log-probs come from megatron's ``vocab_parallel_cross_entropy``
(its max / sum-exp all-reduces and hand-written backward); it computes in float32 whatever the
input dtype, so a float64 model's log-probs are float32-exact. The entropy needs the whole softmax,
which megatron has no function for: ``_entropy`` is the same all-reduce pattern, differentiable.

Temperature divides the logits before the softmax, as the engine samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 2048  # at Qwen3's 152k vocabulary: 1.2 GB of fp32 logits per chunk


def _entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) over the vocabulary split across TP ranks (z: [n, vocab / tp]).
    The sums go through megatron's reduce (all-reduce forward, identity backward), right because
    every TP rank computes the same loss from the reduced values."""
    m = z.detach().amax(-1, keepdim=True)
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    e = (z - m).exp()
    total = reduce_from_tensor_model_parallel_region(e.sum(-1, keepdim=True))
    expected_z = reduce_from_tensor_model_parallel_region((e * z).sum(-1, keepdim=True)) / total
    return (m + total.log() - expected_z).squeeze(-1)


def _chunk(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
           temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.matmul(h, weight.t())
    z = (z if z.dtype == torch.float64 else z.float()) / temperature
    entropy = _entropy(z)
    # megatron's cross-entropy edits a float32 input in place (it keeps the softmax for backward),
    # and the entropy's graph still needs z: it gets its own copy
    nll = vocab_parallel_cross_entropy(z.clone() if z.dtype == torch.float32 else z, target)
    return -nll, entropy


def token_logp_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       temperature: float, sequence_parallel: bool = False,
                       chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden``: the last stage's output [s, b, h] (sequence-sharded under sequence parallel);
    ``weight``: this rank's output-head shard [vocab / tp, h]; ``targets``: [b, s] token ids to
    score at each position. Returns log-probs and entropies, [b, s] each (float32, or float64 for
    a float64 model's entropy)."""
    if sequence_parallel:  # the head needs every position; backward reduce-scatters the gradient
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    s, b, _ = hidden.shape
    flat_h = hidden.transpose(0, 1).reshape(b * s, -1)
    if not sequence_parallel:
        # backward sums the vocabulary shards' partial gradients. After the reshape, not before:
        # megatron's reduce all-reduces ``grad.contiguous()`` and drops the result when the
        # gradient is not contiguous already (as a transpose's would be)
        flat_h = copy_to_tensor_model_parallel_region(flat_h)
    flat_t = targets.reshape(b * s)
    logps, entropies = [], []
    for start in range(0, b * s, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        lp, ent = checkpoint(_chunk, flat_h[sl], weight, flat_t[sl], temperature, use_reentrant=False)
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps).view(b, s), torch.cat(entropies).view(b, s)
