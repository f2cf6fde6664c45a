"""sampling.sample against the implementation it replaced (kept verbatim below): the same tokens
and bit-identical logprobs for the same seeds, on CPU in float64 (and on bf16 logits, as the
engine's model returns them). The new path skips the division when every row has temperature 1
and reads tokens and logprobs back in one copy."""

from __future__ import annotations

import random

import pytest
import torch

from policies.engine.sampling import RowParams, _draw, _truncate, sample


def old_sample(logits: torch.Tensor, rows: list[RowParams]) -> tuple[list[int], list[float]]:
    logits = logits.float()
    temperatures = {r.temperature for r in rows}
    if max(temperatures) <= 0:
        tokens, scaled = logits.argmax(dim=-1), logits
    else:
        if len(temperatures) == 1:
            scaled = logits / temperatures.pop()
        else:
            temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows], device=logits.device)
            scaled = logits / temps[:, None]
        vocab = logits.shape[-1]
        truncated = _truncate(scaled, rows) if any(0 < r.top_k < vocab or r.top_p < 1.0 for r in rows) else scaled
        tokens = _draw(truncated, rows)
        if min(r.temperature for r in rows) <= 0:
            greedy = torch.tensor([r.temperature <= 0.0 for r in rows], device=logits.device)
            tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    logprobs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens.tolist(), logprobs.tolist()


def params(kind: str, n: int, seed: int) -> list[RowParams]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = {"t1": 1.0, "t07": 0.7, "mixed": rng.choice([0.0, 0.5, 1.0, 1.3]), "greedy": 0.0}[kind]
        top_p, top_k = (rng.choice([1.0, 0.9, 0.5]), rng.choice([-1, 5, 50])) if i % 2 else (1.0, -1)
        out.append(RowParams(t, top_p, top_k, random.Random(seed * 1000 + i) if t > 0 else None))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["t1", "t07", "mixed", "greedy"])
@pytest.mark.parametrize("truncate", [False, True])
def test_sample_matches_the_previous_implementation(dtype, kind, truncate):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        logits = (torch.randn(33, 1000, generator=g, dtype=torch.float64) * 3).to(dtype)
        rows = params(kind, 33, seed)
        if not truncate:
            rows = [r._replace(top_p=1.0, top_k=-1) for r in rows]
        twin = [
            r._replace(generator=None if r.generator is None else random.Random(seed * 1000 + i))
            for i, r in enumerate(rows)
        ]
        new_tokens, new_logprobs, _ = sample(logits, rows)
        old_tokens, old_logprobs = old_sample(logits, twin)
        assert new_tokens == old_tokens
        assert new_logprobs == old_logprobs  # bit-identical
        assert all(type(t) is int for t in new_tokens) and all(type(x) is float for x in new_logprobs)
