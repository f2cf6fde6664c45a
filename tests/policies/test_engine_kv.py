"""The runner's KV cache against full recomputation, in process (no server): continuous batching
with rows that join at different steps with different prompt lengths and leave at different
steps, cache drops, and what a weight change does to cached rows (keep vs recompute)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from policies.engine.request import make_generator
from policies.engine.runner import ModelRunner
from policies.engine.sampling import Row, RowParams

pytestmark = pytest.mark.timeout(60)

KEYS = itertools.count()  # runners are shared by tests: a key is never reused, as in the scheduler


@dataclass
class Seq:
    """A scripted request: joins the batch at step `join` and generates `n` tokens."""

    prompt: list[int]
    join: int
    n: int
    temperature: float = 0.0
    seed: int = 0
    key: int = field(default_factory=lambda: next(KEYS))
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    params: RowParams | None = None

    def row(self) -> Row:
        if self.params is None:  # a private generator per run, so both runs draw the same uniforms
            self.params = RowParams(self.temperature, 1.0, -1, make_generator(self.temperature, self.seed))
        return Row(self.key, self.prompt + self.out, self.params)


def script() -> list[Seq]:
    return [
        Seq([1, 2, 3], join=0, n=9),
        Seq(list(range(3, 20)), join=0, n=4),  # long prompt, leaves early
        Seq([7], join=2, n=8, temperature=0.8, seed=3),
        Seq([7], join=2, n=6, temperature=0.8, seed=4),  # same prompt, same step: prefilled once
        Seq([7], join=2, n=7),
        Seq([5, 9, 11, 2, 30], join=2, n=3),  # leaves while rows 0 and 2 run on
        Seq(list(range(20, 31)), join=6, n=7),  # joins after row 1 left: the cache is trimmed
        Seq([4, 4], join=6, n=5, temperature=1.0, seed=9),
    ]


def run(runner: ModelRunner, seqs: list[Seq], *, on_step=None) -> int:  # noqa: ANN001
    """Drive `runner` through the script like the scheduler does; returns the number of steps."""
    step = 0
    while True:
        active = [s for s in seqs if s.join <= step and len(s.out) < s.n]
        if not active and all(s.join <= step for s in seqs):
            return step
        if active:
            tokens, logprobs, _ = runner.step([s.row() for s in active])
            for s, t, lp in zip(active, tokens, logprobs, strict=True):
                s.out.append(t)
                s.logprobs.append(lp)
            if runner.use_kv_cache:  # rows that left are gone, and so are columns only they used
                assert runner.cached_rows == len(active)
                assert runner.cache_width == max(len(s.prompt) + len(s.out) - 1 for s in active)
        step += 1
        if on_step is not None:
            on_step(step, runner)


@pytest.fixture(scope="module")
def runners(tiny_model_dir):
    return {cache: ModelRunner.load(str(tiny_model_dir), use_kv_cache=cache) for cache in (True, False)}


def assert_same(cached: list[Seq], full: list[Seq]) -> None:
    for a, b in zip(cached, full, strict=True):
        assert a.out == b.out, f"row with prompt {a.prompt}: tokens differ"
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_cache_matches_full_recompute_with_rows_joining_and_leaving(runners):
    assert runners[True].use_kv_cache and not runners[False].use_kv_cache
    cached, full = script(), script()
    run(runners[True], cached)
    run(runners[False], full)
    assert_same(cached, full)
    assert {s.key: len(s.out) for s in cached} == {s.key: s.n for s in cached}


def test_dropping_the_cache_mid_run_changes_nothing_under_the_same_weights(runners):
    dropped, full = script(), script()
    run(runners[True], dropped, on_step=lambda step, r: r.drop_cache() if step in (1, 4, 7) else None)
    run(runners[False], full)
    assert_same(dropped, full)


def test_a_failed_step_clears_the_cache_and_the_next_step_reprefills(runners):
    runner = runners[True]
    seq, reference = Seq([1, 2, 3], join=0, n=4), Seq([1, 2, 3], join=0, n=4)
    ((token,), (logprob,), _) = runner.step([seq.row()])
    seq.out, seq.logprobs = [token], [logprob]
    # seq is decoded (its cache grows) before the prefill of an out-of-range token fails the step
    with pytest.raises(IndexError):
        runner.step([seq.row(), Row(next(KEYS), [10_000], RowParams(0.0, 1.0, -1, None))])
    assert runner.cached_rows == 0
    run(runner, [seq])  # the failed step gave seq nothing: it re-prefills prompt + its one token
    run(runners[False], [reference])
    assert_same([seq], [reference])


def full_reference(model, prompt: list[int], out: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(out)[:, None])[:, 0]


@pytest.mark.parametrize("mode", ["keep", "recompute"])
def test_weight_change_keeps_or_recomputes_the_cached_prefix(tiny_model_dir, tiny_model_dir_b, kit, mode):
    """keep (in_place pause): cached keys/values from the old weights stay; recompute (retract):
    the cache is dropped and the whole context is re-prefilled under the new weights."""
    runner = ModelRunner.load(str(tiny_model_dir))
    model_a, model_b = (AutoModelForCausalLM.from_pretrained(str(d)).eval() for d in (tiny_model_dir, tiny_model_dir_b))
    seq, k = Seq([3, 1, 4, 1, 5], join=0, n=10), 4
    for _ in range(k):
        tokens, logprobs, _ = runner.step([seq.row()])
        seq.out += tokens
        seq.logprobs += logprobs
    runner.apply_weights(runner.read_checkpoint(str(tiny_model_dir_b)))
    if mode == "recompute":
        runner.drop_cache()
    run(runner, [seq])
    got = torch.tensor(seq.logprobs)
    torch.testing.assert_close(got[:k], full_reference(model_a, seq.prompt, seq.out)[:k], atol=1e-5, rtol=0)
    recomputed = full_reference(model_b, seq.prompt, seq.out)[k:]
    kept = kit.kept_logprobs(model_a, model_b, seq.prompt, seq.out, k)
    assert not torch.allclose(recomputed, kept, atol=1e-3), "the two references must differ for the test to bite"
    torch.testing.assert_close(got[k:], kept if mode == "keep" else recomputed, atol=1e-5, rtol=0)


def test_both_decode_paths_are_exercised(runners, tiny_model_dir):
    """The default cached runner decodes over a SlotCache (the fixed-shape, graph-ready step);
    slot_decode=False keeps the BatchCache path, which must agree with it too."""
    assert runners[True]._decoder is not None
    plain = ModelRunner.load(str(tiny_model_dir))
    plain.__init__(plain.model, device=plain.device, slot_decode=False)
    assert plain._decoder is None
    slots, batch, full = script(), script(), script()
    run(runners[True], slots)
    run(plain, batch)
    run(runners[False], full)
    assert_same(slots, full)
    assert_same(batch, full)


def test_slot_cache_cuts_dead_columns_and_regrows(tiny_model_dir, monkeypatch):
    """Tiny capacities force every SlotCache event: regrowth of rows and width with the live rows
    copied over, reordered rows, and a left shift of the columns once the longest row has left."""
    from policies.engine.slot_cache import SlotCache

    for name, value in (("MIN_ROWS", 1), ("ROW_ALIGN", 1), ("MIN_WIDTH", 2), ("WIDTH_ALIGN", 1)):
        monkeypatch.setattr(SlotCache, name, value)
    runner = ModelRunner.load(str(tiny_model_dir))
    full_runner = ModelRunner.load(str(tiny_model_dir), use_kv_cache=False)

    def seqs() -> list[Seq]:
        return script() + [
            Seq(list(range(1, 24)), join=7, n=2),  # long, leaves at once: the next row starts at column 21
            Seq([2, 9], join=7, n=45, temperature=0.9, seed=11),  # runs on alone: shifted left, then regrown
        ]

    events = []  # (width capacity, the lowest start column) after each step
    cached, full = seqs(), seqs()
    record = lambda step, r: events.append((r._cache.width_capacity, min(r._cache.starts, default=0)))  # noqa: E731
    run(runner, cached, on_step=record)
    run(full_runner, full)
    assert_same(cached, full)
    assert runner._cache.generation >= 3 and len({w for w, _ in events}) >= 2, events
    shifted = [i for i, (a, b) in enumerate(zip(events, events[1:]), 1) if a[0] == b[0] and 0 == b[1] < a[1]]
    assert shifted, events


def test_releasing_memory_frees_the_slot_buffers_and_decoding_goes_on_unchanged(runners):
    """release_memory (a colocated engine handing its KV memory to the learner) frees the slot
    buffers, not only the rows; the next steps reallocate and still match a full recompute."""
    runner = runners[True]
    released, full = script(), script()

    def release(step, r):  # noqa: ANN001, ANN202
        if step in (2, 5):
            r.release_memory()
            assert r._cache.kv is None and r.cached_rows == 0

    run(runner, released, on_step=release)
    run(runners[False], full)
    assert_same(released, full)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("kind", "device"),
    [("llama", "cpu"), ("qwen2", "cpu")] + [pytest.param(k, "cuda", marks=CUDA) for k in ("qwen3", "llama", "qwen2")],
)
def test_each_model_family_decodes_on_the_slot_path_like_a_full_recompute(kind, device):
    """Models without Qwen3's q/k norm (Llama: SmolLM2's shape scaled down, 3 query heads per KV
    head; Qwen2: q/k/v biases) take the fixed-shape decode step too, and agree with recomputation
    (the reference path); on a GPU the step is a CUDA graph replay (float32, so tokens match)."""
    shape = dict(vocab_size=40, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind](**shape), attn_implementation="sdpa")
    model = model.to(device).eval()
    slot = ModelRunner(model, device=torch.device(device))
    full = ModelRunner(model, device=torch.device(device), use_kv_cache=False)
    assert slot._decoder is not None and slot._decoder.qk_norm == (kind == "qwen3")
    cached, reference = script(), script()
    run(slot, cached)
    run(full, reference)
    assert_same(cached, reference)
    assert slot._decoder.cuda_graphs == (device == "cuda") and (device == "cpu" or slot._decoder._graphs)
    assert slot._decoder.compiled == (device == "cuda")  # compiled layers on a GPU, and no fallback taken


@CUDA
@pytest.mark.parametrize("kind", ["triton", "flex"])
def test_decode_attention_kernels_match_sdpa_on_a_gpu(kind):
    """The GPU's decode kernels (Triton split-KV, flex block-sparse) against SDPA with a mask, on the
    slot buffer's strided views: rows with different live ranges (one starting mid-block, one a
    single column)."""
    from policies.engine.decode_attention import FlexDecode, SdpaDecode, TritonDecode, agree

    rows, kv_heads, group, dim, cap, width = 6, 2, 3, 128, 640, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(2, rows, kv_heads, cap, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(rows, kv_heads * group, 1, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    starts = torch.tensor([0, 130, 0, 300, 17, 511], device="cuda")
    ends = torch.tensor([40, 400, 511, 300, 255, 511], device="cuda")
    keys, values = buf[0, :, :, :width], buf[1, :, :, :width]
    kernel = FlexDecode() if kind == "flex" else TritonDecode(torch.device("cuda"), kv_heads=kv_heads)
    sdpa = SdpaDecode(kv_heads=kv_heads, group=group)
    for attention in (kernel, sdpa):
        attention.prepare(starts, ends, width)
    got, want = kernel(q, keys, values, dim**-0.5), sdpa(q, keys, values, dim**-0.5)
    assert got.shape == want.shape == (rows, kv_heads * group, 1, dim) and agree(got, want)
    assert not agree(got[1:], want[:-1])  # the check can fail


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_decoder_layers_decode_like_a_full_recompute(monkeypatch):
    """ASYNCRL_ENGINE_COMPILE=1 compiles the layers' non-attention work on CPU too (on CUDA it is the
    default): the slot path still agrees with recomputation, and every layer reuses the one compiled
    graph of each function (no recompile per layer: a graph or two per function, not one per layer)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("ASYNCRL_ENGINE_COMPILE", "1")
    shape = dict(vocab_size=40, hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**shape), attn_implementation="sdpa")
    counters.clear()
    slot, full = (
        ModelRunner(model.eval(), device=torch.device("cpu")),
        ModelRunner(model, device=torch.device("cpu"), use_kv_cache=False),
    )
    cached, reference = script(), script()
    run(slot, cached)
    run(full, reference)
    assert_same(cached, reference)
    assert slot._decoder.compiled
    assert 2 <= counters["stats"]["unique_graphs"] <= 4  # 2 functions; b = 1 specialises once more


def test_a_compile_that_fails_falls_back_to_eager_layers(monkeypatch, caplog):
    """A torch.compile that cannot run here (a fake: its compiled function raises, as a missing C
    compiler or an inductor bug would) costs one logged fallback, not a failed step: decoding goes
    on with eager layers and still agrees with recomputation."""
    from policies.engine import slot_decoder

    def broken_compile(fn, **_):  # noqa: ANN001, ANN202
        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise RuntimeError("inductor: no working C compiler")

        return run

    monkeypatch.setenv(slot_decoder.COMPILE_ENV, "1")
    monkeypatch.setattr(slot_decoder.torch, "compile", broken_compile)
    shape = dict(vocab_size=40, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**shape), attn_implementation="sdpa")
    slot = ModelRunner(model.eval(), device=torch.device("cpu"))
    assert slot._decoder.compiled
    cached, reference = script(), script()
    run(slot, cached)
    run(ModelRunner(model, device=torch.device("cpu"), use_kv_cache=False), reference)
    assert_same(cached, reference)
    assert not slot._decoder.compiled
    assert sum("compiled decoder layers failed" in r.message for r in caplog.records) == 1
