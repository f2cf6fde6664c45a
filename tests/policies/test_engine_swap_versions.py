"""Per-token weight versions stay exact when weights are swapped in between two decode steps in the
middle of long answers (the colocated and NCCL transports' in-place swap), on the CPU and, where
there is one, on a GPU with the CUDA-graph decode step, the cache regrowing and the width buckets
changing while the answers run.

In process: a real ModelRunner and Scheduler, driven like the server drives them. The new weights
zero the final norm, so every logit becomes exactly 0: a token from them is token 0 with logprob
exactly -log(vocab), which no token of the random model before the swap has. So each token's
recorded version can be checked against the weights that actually produced it.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
import transformers

from policies.engine.decode_attention import FLEX_ENV
from policies.engine.runner import ModelRunner
from policies.engine.scheduler import Scheduler
from policies.engine.wire import GenerateItem, SamplingParams

pytestmark = pytest.mark.timeout(120)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def model_on(device: str, vocab: int, context: int) -> torch.nn.Module:
    """Tiny, but with head_dim 128 on a GPU: a size the Triton and flex decode kernels take."""
    config = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128 if device == "cuda" else 16, max_position_embeddings=context,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@pytest.mark.parametrize(
    ("device", "rows", "new", "swap_at", "attention"),
    [
        ("cpu", 6, 40, 17, "sdpa"),
        pytest.param("cuda", 64, 700, 333, "triton", marks=CUDA),  # the GPU default
        pytest.param("cuda", 64, 700, 333, "flex", marks=CUDA),  # opt-in
    ],
)
def test_versions_are_exact_across_a_swap_during_long_answers(device, rows, new, swap_at, attention, monkeypatch):
    monkeypatch.setenv(FLEX_ENV, "1" if attention == "flex" else "0")
    vocab = 50
    model = model_on(device, vocab, new + 16)
    model.model.embed_tokens.weight.mul_(5)  # spread the logits: no token's logprob near -log(vocab) by chance
    runner = ModelRunner(model, device=torch.device(device))
    zero = [(model.model.norm.weight, torch.zeros_like(model.model.norm.weight))]

    async def main() -> list:
        scheduler = Scheduler(runner, max_running=rows, weight_version="0")
        loop = asyncio.create_task(scheduler.run())
        try:
            params = SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True)
            items = [GenerateItem(f"r{i}", [1 + i % 7, 2 + i % 5, 3], params, True) for i in range(rows)]
            requests = await scheduler.submit(items)
            await scheduler._wait_for(lambda: scheduler.decode_steps >= swap_at)
            await scheduler.swap_weights(zero, version="1")
            return [await r.future for r in requests]
        finally:
            scheduler.close()
            loop.cancel()

    done = asyncio.run(main())
    floor = -math.log(vocab)
    for completion in done:
        versions, logprobs, tokens = completion.token_versions, completion.logprobs, completion.output_ids
        assert len(tokens) == len(versions) == new and completion.finish.type == "length"
        switched = versions.index("1")
        assert swap_at - 1 <= switched <= swap_at + 1  # the swap lands within a step of where it was asked
        assert set(versions[:switched]) == {"0"} and set(versions[switched:]) == {"1"}
        # each token came from the weights its version names
        assert all(abs(lp - floor) > 1e-3 for lp in logprobs[:switched])
        assert all(abs(lp - floor) < 1e-5 for lp in logprobs[switched:]) and set(tokens[switched:]) == {0}
    assert len({c.token_versions.index("1") for c in done}) == 1  # one boundary: the whole batch swapped at once
    if device == "cuda":  # graphs replayed, the kernel kept (it agreed with SDPA), the cache regrown
        decoder = runner._decoder
        assert decoder.cuda_graphs and decoder._graphs and decoder.attention.name == attention
        assert decoder.cache.generation >= 3
