"""The Triton decode kernel on a cache past 2**31 elements per K (or V) view: 64-bit row offsets.

    python benchmarks/triton_large_cache_gpu.py

A [2, 1024 rows, 8 KV heads, 16,384 columns, 128] bf16 slot buffer (68 GB): rows near its end sit
past element 2**31 of the K view; the kernel's output for them must equal SDPA's over a copy of
just those rows (a 32-bit offset would read another row's keys and disagree).
"""

import torch

from policies.engine.decode_attention import SdpaDecode, agree
from policies.engine.triton_decode import decode_attention

rows, kv_heads, cols, dim, group = 1024, 8, 16384, 128, 2
buf = torch.empty(2, rows, kv_heads, cols, dim, dtype=torch.bfloat16, device="cuda")
pick = torch.tensor([0, 511, 1022, 1023], device="cuda")  # 1022 * 8 * 16384 * 128 > 2**31
for r in pick.tolist():
    buf[:, r].normal_()
q = torch.randn(rows, kv_heads * group, 1, dim, dtype=torch.bfloat16, device="cuda")
starts = torch.zeros(rows, dtype=torch.long, device="cuda")
ends = torch.full((rows,), cols - 1, dtype=torch.long, device="cuda")
got = decode_attention(q, buf[0], buf[1], starts, ends, dim**-0.5, 1)[pick]
sdpa = SdpaDecode(kv_heads=kv_heads, group=group)
sdpa.prepare(starts[pick], ends[pick], cols)
want = sdpa(q[pick], buf[0, pick], buf[1, pick], dim**-0.5)
offsets = [r * kv_heads * cols * dim for r in pick.tolist()]
print(
    f"row offsets {offsets} (2**31 = {2**31}); agree with SDPA: {agree(got, want)}; "
    f"max|diff| {(got.float() - want.float()).abs().max().item():.2e}"
)
