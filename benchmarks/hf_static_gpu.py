"""HF `generate` with a static cache and its auto-compiled forward, at the engine's benchmark shapes.

    python benchmarks/hf_static_gpu.py [--shapes 512x128x1024,512x20x256,128x128x4096] [--steps 48]

The third comparison issue 19 asks for beside engine_gpu_lengths.py's table (same random
Qwen3-0.6B-shaped model, same prompts, temperature 1, no EOS). With a StaticCache sized for the
whole shape (prompt + new), transformers compiles the model's forward (torch.compile, its own
compile_config) and every decode step attends to the whole cache with a mask, so its step time does
not grow with the context: tokens/s at the shape = rows x new / (prefill + new x step), the step
time taken as the median gap of a measured run of --steps tokens (after a warm-up run that
compiles). The compile time is reported, not counted.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from engine_gpu_lengths import GROUP, _Clock, parse_shapes, prompts, qwen3_06b, random_model


@torch.inference_mode()
def static_generate(model: torch.nn.Module, rows: int, prompt: int, new: int, steps: int) -> tuple[float, float]:
    """(compile + first run seconds, tokens/s at the shape)."""
    model.generation_config.eos_token_id = None
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    ids = torch.tensor([p for p in prompts(rows, prompt, 7) for _ in range(GROUP)], device="cuda")

    def run() -> tuple[float, float]:
        cache = transformers.StaticCache(config=model.config, max_cache_len=prompt + new)
        clock = _Clock()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=1 + steps, past_key_values=cache,
                             logits_processor=transformers.LogitsProcessorList([clock]), **kw)  # fmt: skip
        assert out.shape[1] == prompt + 1 + steps
        gaps = sorted(b - a for a, b in zip(clock.times, clock.times[1:]))
        return clock.times[0] - t0, gaps[len(gaps) // 2]

    t0 = time.perf_counter()
    run()  # compiles (prefill and decode shapes)
    warm = time.perf_counter() - t0
    run()
    prefill, step = run()
    return warm, rows * new / (prefill + new * step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="512x128x1024,512x20x256,128x128x4096")
    p.add_argument("--steps", type=int, default=48)
    args = p.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    shapes = parse_shapes(args.shapes)
    model = random_model(qwen3_06b(max(pr + n for _, pr, n in shapes) + 8))
    print("| requests x (prompt + new) | HF static cache + compiled forward, tokens/s | compile + first run s |")
    print("|---|---|---|")
    for rows, prompt, new in shapes:
        try:
            warm, rate = static_generate(model, rows, prompt, new, args.steps)
            print(f"| {rows} x ({prompt} + {new:,}) | {rate:,.0f} | {warm:.0f} |", flush=True)
        except Exception as exc:  # noqa: BLE001 - report the shape and go on
            print(
                f"| {rows} x ({prompt} + {new:,}) | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | |"
            )
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
