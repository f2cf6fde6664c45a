"""Per-token log-probabilities and entropies from final hidden states and the output head, in chunks.

``token_logprobs(hidden, weight, targets, ...)`` returns, for each row ``i`` of ``hidden`` (K, H),
``log softmax(hidden[i] @ weight.T / T)[targets[i]]`` and the entropy of that distribution, both
float32 (float64 when the inputs are). No (K x vocab) tensor ever exists: the forward computes the
logits of ``chunk`` rows at a time and keeps only each row's logsumexp and entropy; the backward
recomputes each chunk's logits from the saved hidden states and the head. Peak extra memory is
one chunk's logits and their softmax, about ``3 * chunk * vocab * 4`` bytes (``CHUNK_ELEMENTS``
bounds ``chunk * vocab``), plus the head's gradient.

Why chunks of rows and a whole vocabulary per chunk, not prime-rl's vocabulary split with an
online logsumexp: a row's logsumexp over a whole vocabulary row is already the stable one
(``torch.logsumexp``), and chunking rows bounds memory just as well while keeping each matmul
(chunk x hidden) @ (hidden x vocab) large enough to run at full speed.

Why not liger-kernel or cut-cross-entropy: neither is installed here or on the GPU image, and their
fused losses return a reduced cross-entropy (liger: mean or sum with ignore_index; cut: per-token
CE without entropy) rather than per-token log-probs with temperature *and* the entropy with its
gradient, which the PPO ratio, the KL and the entropy bonus each need per token.

Temperature: the logits are divided by ``temperature`` before the softmax, as the engine samples
(``policies.engine.sampling``: ``log_softmax(logits.float() / T)``; greedy T <= 0 reports
``log_softmax(logits)``, so a caller passes 1.0 there). ``compute_dtype`` is the dtype of the
matmul (bfloat16 under autocast on a GPU, as the model's own head would run); the softmax and
everything after it run in float32 (or float64 for float64 inputs).
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 128 Mi floats = 512 MiB in float32


def default_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   compute_dtype: torch.dtype | None = None, chunk: int | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of ``targets``, entropy), each of shape (K,); differentiable in ``hidden`` and ``weight``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (pass 1.0 for greedy sampling), got {temperature}")
    dtype = compute_dtype or hidden.dtype
    return _ChunkedLogProbs.apply(hidden, weight, targets, float(temperature), dtype,
                                  chunk or default_chunk(weight.shape[0]))


def _scaled_logits(h: torch.Tensor, w: torch.Tensor, temperature: float, out_dtype: torch.dtype) -> torch.Tensor:
    z = (h @ w.T).to(out_dtype)
    return z if temperature == 1.0 else z.div_(temperature)  # x / 1.0 == x: skip a pass, as the engine does


def _chunk_logp(hidden: torch.Tensor, w: torch.Tensor, temperature: float, out_dtype: torch.dtype,
                dtype: torch.dtype) -> torch.Tensor:
    """log softmax of one chunk's scaled logits: the one (chunk x vocab) buffer, rewritten in place."""
    z = _scaled_logits(hidden.to(dtype), w, temperature, out_dtype)
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, dtype, chunk):  # noqa: ANN001, ANN205
        ctx.set_materialize_grads(False)  # an unused output (entropy without a bonus) costs no backward pass
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        w = weight.to(dtype)
        logp = torch.empty(hidden.shape[0], dtype=out_dtype, device=hidden.device)
        entropy = torch.empty_like(logp)
        for s in range(0, hidden.shape[0], chunk):
            lp = _chunk_logp(hidden[s : s + chunk], w, temperature, out_dtype, dtype)
            logp[s : s + chunk] = lp.gather(-1, targets[s : s + chunk, None])[:, 0]
            entropy[s : s + chunk] = -lp.exp().mul_(lp).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, entropy)
        ctx.temperature, ctx.dtype, ctx.chunk = temperature, dtype, chunk
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):  # noqa: ANN001, ANN205
        hidden, weight, targets, entropy = ctx.saved_tensors
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None, None
        dtype, temperature, chunk = ctx.dtype, ctx.temperature, ctx.chunk
        w = weight.to(dtype)
        g_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(dtype)
            logp = _chunk_logp(h, w, temperature, entropy.dtype, dtype)
            p = logp.exp()
            # with z = logits / T:  d logp_t / dz_j = 1[j = t] - p_j ;  d H / dz_j = -p_j (log p_j + H)
            if g_entropy is not None:
                grad = logp.add_(entropy[s : s + chunk, None]).mul_(p).mul_(-g_entropy[s : s + chunk, None])
                if g_logp is not None:
                    grad.addcmul_(p, g_logp[s : s + chunk, None], value=-1)
            else:
                del logp
                grad = p.mul_(-g_logp[s : s + chunk, None])
            del p
            if g_logp is not None:
                grad.scatter_add_(-1, targets[s : s + chunk, None], g_logp[s : s + chunk, None].to(grad.dtype))
            if temperature != 1.0:
                grad.div_(temperature)
            grad = grad.to(dtype)
            if g_hidden is not None:
                g_hidden[s : s + chunk] = (grad @ w).to(hidden.dtype)
            if g_weight is not None:
                g_weight.add_(grad.T @ h)
        if g_weight is not None:
            g_weight = g_weight.to(weight.dtype)
        return g_hidden, g_weight, None, None, None, None
