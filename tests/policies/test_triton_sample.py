"""The Triton sampling kernel (policies/engine/triton_sample.py) against sampling.sample's torch path.

On CPU under Triton's interpreter in a child process (TRITON_INTERPRET=1 is read at import; the
NumPy-2 patch of tests/policies/triton_interpreter.py); skipped where triton is not installed. Cases: greedy and
sampled rows at several temperatures in one batch, a vocabulary that is not a multiple of the block,
bf16 and float32 logits, -inf logits (a masked token is never drawn), a uniform of 0 and one deep in
the tail (0.999; next to 1 the pick is decided by rounding, which differs between the two).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from policies.engine.sampling import RowParams
from tests.policies.triton_interpreter import run_interpreted

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.timeout(300),
]

CHILD = """
    import random
    import torch

    from policies.engine.sampling import RowParams, sample
    from policies.engine.triton_sample import sample_rows

    torch.manual_seed(0)
    rows, vocab = 12, 5000
    temps = [0.0, 1.0, 0.7, 1.3] * 3
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(rows, vocab) * 3).to(dtype)
        logits[5, 100:] = float("-inf")  # a row whose mass sits on its first 100 tokens
        uniforms = [0.0 if t == 0 else random.Random(i).random() for i, t in enumerate(temps)]
        uniforms[1], uniforms[2] = 0.0, 0.999  # the first token of the CDF, and deep in its tail
        tokens, logprobs = sample_rows(logits, torch.tensor(temps), torch.tensor(uniforms))

        class Fixed(random.Random):  # hands sample() the uniforms above, in row order
            def __init__(self, u):
                super().__init__(0)
                self.u = u
            def random(self):
                return self.u

        params = [RowParams(t, 1.0, -1, None if t == 0 else Fixed(u)) for t, u in zip(temps, uniforms)]
        want = sample(logits, params)  # CPU tensors: the torch path
        assert tokens.tolist() == want.tokens, (dtype, tokens.tolist(), want.tokens)
        err = (logprobs.double() - torch.tensor(want.logprobs)).abs().max().item()
        assert err < 1e-4, (dtype, err)
        assert tokens[5] < 100
        assert tokens[0] == logits[0].float().argmax() and tokens[4] == logits[4].float().argmax()  # greedy
    print("ok")
"""


def test_kernel_draws_like_the_torch_sampler_under_the_interpreter():
    run_interpreted(CHILD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_draws_like_the_torch_sampler_on_a_gpu(monkeypatch):
    """At a real vocabulary (151,936, bf16) on the GPU: sampling.sample through the kernel and through
    torch's path, with generators seeded alike, draw the same tokens (rounding may move a rare draw
    sitting on a CDF step: at most 1% of rows) with the same logprobs."""
    from policies.engine import sampling
    from policies.engine.request import make_generator

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(512, 151936, device="cuda", generator=g) * 3).to(torch.bfloat16)
    temps = [0.0, 1.0, 0.6, 1.0] * 128

    def draw(sampler: str) -> sampling.Sampled:
        monkeypatch.setenv(sampling.SAMPLER_ENV, sampler)
        sampling._kernel_available.cache_clear()
        return sampling.sample(logits, [RowParams(t, 1.0, -1, make_generator(t, i)) for i, t in enumerate(temps)])

    kernel, reference = draw("triton"), draw("torch")
    sampling._kernel_available.cache_clear()
    same = [a == b for a, b in zip(kernel.tokens, reference.tokens, strict=True)]
    assert sum(same) >= 0.99 * len(same)
    err = max(abs(a - b) for a, b, s in zip(kernel.logprobs, reference.logprobs, same, strict=True) if s)
    assert err < 1e-3
