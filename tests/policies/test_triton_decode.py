"""The Triton split-KV decode kernel (policies/engine/triton_decode.py) against SDPA with a mask.

On CPU it runs under Triton's interpreter (TRITON_INTERPRET=1, read when the kernel module is first
imported, hence a child process); skipped where triton is not installed (the CPU torch wheel does
not bring it; CUDA torch does, and tests/policies/test_engine_kv.py checks the compiled kernel on a
GPU). Cases: grouped heads (1, 2 and 3 query heads per KV head), rows whose live range starts
mid-block, a single-column row, splits past a row's end, head_dim 64 and 128, strided cache views.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.policies.triton_interpreter import run_interpreted

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.timeout(300),
]

CHILD = """
    import torch

    from policies.engine.decode_attention import SdpaDecode, agree
    from policies.engine.triton_decode import decode_attention, splits_for

    torch.manual_seed(0)
    for group, dim in ((1, 64), (2, 128), (3, 64)):
        rows, kv_heads, cap, width = 5, 2, 320, 300
        buf = torch.randn(2, 8, kv_heads, cap, dim)  # a slot buffer: 8 slots, 320 columns
        keys, values = buf[0, :rows, :, :width], buf[1, :rows, :, :width]
        q = torch.randn(rows, kv_heads * group, 1, dim)
        starts = torch.tensor([0, 10, 50, 0, 299])
        ends = torch.tensor([0, 200, 299, 130, 299])
        sdpa = SdpaDecode(kv_heads=kv_heads, group=group)
        sdpa.prepare(starts, ends, width)
        want = sdpa(q, keys, values, dim**-0.5)
        for splits in (1, 3, 7):
            got = decode_attention(q, keys, values, starts, ends, dim**-0.5, splits)
            err = (got - want).abs().max().item()
            assert got.shape == want.shape and err < 1e-5, (group, dim, splits, err)
        assert not agree(got[1:], want[:-1])
    assert splits_for(512, 8, 768, 1056) == 1 and splits_for(8, 8, 4096, 1056) == 16
    print("ok")
"""


def test_kernel_matches_sdpa_under_the_interpreter():
    run_interpreted(CHILD)
