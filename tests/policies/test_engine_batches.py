"""The embedded engine server's batched requests end to end (a real subprocess, real HTTP, a tiny
random model): a batch answers like single requests, n samples of one prompt, aborting one member,
a refused batch, and frozen members across a weight update (keep or recompute their cache).

One engine serves the whole module; tests that change its weights restore them before returning.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch

from policies.engine import EngineClient, EngineError
from tests.policies.engine_refs import reference_logprobs

pytestmark = pytest.mark.timeout(60)

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


def test_a_batch_answers_like_single_requests(engine, kit):
    prompts = [[1, 2, 3], [5] * 9, list(range(7, 30)), [30]]
    sampled = {"temperature": 0.9, "top_k": 10, "max_new_tokens": 12, "sampling_seed": 11, "ignore_eos": True}
    params = [GREEDY, sampled, GREEDY, {**GREEDY, "max_new_tokens": 3}]

    async def body(c: EngineClient) -> None:
        singles = [await c.generate(p, sp) for p, sp in zip(prompts, params, strict=True)]
        batch = await c.generate_batch(prompts, params, rids=["b0", "b1", "b2", "b3"])
        for one, member in zip(singles, batch, strict=True):
            assert member.output_ids == one.output_ids and member.finish_reason == one.finish_reason
            torch.testing.assert_close(torch.tensor(member.logprobs), torch.tensor(one.logprobs), atol=1e-5, rtol=0)
            assert member.token_versions == [one.weight_version] * len(one.output_ids)
        # the wire shape: a JSON list, one SGLang response per prompt, each with its own meta_info
        body = {"input_ids": prompts[:2], "sampling_params": params[:2], "rid": ["w0", "w1"], "return_logprob": True}
        async with aiohttp.ClientSession() as s, s.post(f"{engine.url}/generate", json=body) as resp:
            answer = await resp.json()
        assert [a["meta_info"]["id"] for a in answer] == ["w0", "w1"]
        for a, one in zip(answer, singles[:2], strict=True):
            meta = a["meta_info"]
            assert a["output_ids"] == one.output_ids and meta["finish_reason"] == {"type": "length", "length": 12}
            assert [t for _, t, _ in meta["output_token_logprobs"]] == one.output_ids
            assert meta["weight_versions"] == [{"version": one.weight_version, "start": 0, "end": 12}]

    kit.run_with_client(engine.url, body)


def test_n_parallel_samples_of_one_prompt(engine, kit):
    params = {"temperature": 1.0, "max_new_tokens": 10, "sampling_seed": 5, "ignore_eos": True}

    async def body(c: EngineClient) -> None:
        alone = await c.generate([4, 2], params)
        outs = await c.generate_batch([[4, 2], [6]], {**params, "n": 4})
        assert len(outs) == 8 and all(o.completion_tokens == 10 for o in outs)
        assert outs[0].output_ids == alone.output_ids  # sample 0 keeps the seed; prompt-major order
        assert len({tuple(o.output_ids) for o in outs[:4]}) > 1  # the other samples get their own seeds
        body = {"input_ids": [4, 2], "sampling_params": {**params, "n": 3}, "rid": "par"}
        async with aiohttp.ClientSession() as s, s.post(f"{engine.url}/generate", json=body) as resp:
            answer = await resp.json()
        assert [a["meta_info"]["id"] for a in answer] == ["par_0", "par_1", "par_2"]  # one prompt, still a list
        assert [a["output_ids"] for a in answer] == [o.output_ids for o in outs[:3]]
        with pytest.raises(ValueError, match="generate_batch"):
            await c.generate([4, 2], {**params, "n": 2})

    kit.run_with_client(engine.url, body)


def test_abort_one_member_of_a_batch(engine, kit):
    params = {"temperature": 0, "max_new_tokens": 60, "ignore_eos": True}

    async def body(c: EngineClient) -> None:
        steps0 = (await kit.stats(c))["decode_steps"]
        batch = asyncio.create_task(c.generate_batch([[1, 2]] * 3, params, rids=["m0", "m1", "m2"]))
        await kit.wait_until(c, lambda s: s["decode_steps"] >= steps0 + 2)
        await c.abort("m1")
        outs = await batch
        assert [o.finish_reason for o in outs] == ["length", "abort", "length"]
        cut = len(outs[1].output_ids)
        assert 1 <= cut < 60 and outs[1].output_ids == outs[0].output_ids[:cut] == outs[2].output_ids[:cut]

    kit.run_with_client(engine.url, body)


def test_a_refused_batch_enqueues_none_of_its_members(engine, kit):
    async def body(c: EngineClient) -> None:
        await c.pause("in_place")
        running = asyncio.create_task(c.generate([1], {**GREEDY, "max_new_tokens": 2}, rid="busy"))
        await kit.wait_until(c, lambda s: s["num_waiting_reqs"] == 1)
        for rids in (["fresh", "busy"], ["ok0", "ok1"]):  # a rid in flight, then a bad member
            prompts = [[1], [2]] if rids[1] == "busy" else [[1], [2, 99]]
            with pytest.raises(EngineError, match="already in flight|outside") as info:
                await c.generate_batch(prompts, GREEDY, rids=rids)
            assert info.value.status == 400
            assert (await kit.stats(c))["num_waiting_reqs"] == 1
        await c.resume()
        assert (await running).completion_tokens == 2

    kit.run_with_client(engine.url, body)


# ---- the KV cache across a weight update -------------------------------------------------


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_frozen_requests_keep_or_recompute_their_cache_across_an_update(
    engine, kit, hf_models, tiny_model_dir, tiny_model_dir_b, mode
):
    """in_place: frozen requests go on with the keys/values the old weights computed (keep);
    retract: they re-prefill prompt + tokens so far under the new weights (recompute). Either
    way the tokens before the update keep the old version and logprobs."""
    prompts = [[i % 32, (7 * i) % 32, 3] for i in range(48)]  # 48 rows: slow enough steps to pause mid-way
    params = {"temperature": 0, "max_new_tokens": 58, "ignore_eos": True}
    model_a, model_b = hf_models[tiny_model_dir], hf_models[tiny_model_dir_b]

    async def body(c: EngineClient) -> None:
        old = await c.get_weight_version()
        steps0 = (await kit.stats(c))["decode_steps"]
        batch = asyncio.create_task(c.generate_batch(prompts, params))
        await kit.wait_until(c, lambda s: s["decode_steps"] > steps0)
        await c.pause(mode)
        result = await c.update_weights_from_disk(str(tiny_model_dir_b), weight_version=f"{old}-{mode}")
        assert result.num_paused_requests == len(prompts) and not batch.done()
        await c.resume()
        outs = await batch
        await c.update_weights_from_disk(str(tiny_model_dir), weight_version=old)  # restore
        for prompt, out in zip(prompts, outs, strict=True):
            k = out.token_versions.count(old)
            assert 1 <= k < 58 and out.token_versions == [old] * k + [f"{old}-{mode}"] * (58 - k)
            before, _ = reference_logprobs(model_a, prompt, out.output_ids, 0)
            torch.testing.assert_close(torch.tensor(out.logprobs[:k]), before[:k], atol=1e-4, rtol=0)
            kept = kit.kept_logprobs(model_a, model_b, prompt, out.output_ids, k)
            recomputed = reference_logprobs(model_b, prompt, out.output_ids, 0)[0][k:]
            expected, other = (kept, recomputed) if mode == "in_place" else (recomputed, kept)
            torch.testing.assert_close(torch.tensor(out.logprobs[k:]), expected, atol=1e-4, rtol=0)
            assert not torch.allclose(torch.tensor(out.logprobs[k:]), other, atol=1e-3)

    kit.run_with_client(engine.url, body)


def test_kv_cache_flag(engine, kit, monkeypatch):
    from policies.engine.server import KV_CACHE_ENV, parse_args

    assert parse_args(["--model-path", "m"]).kv_cache == "on"
    assert parse_args(["--model-path", "m", "--kv-cache", "off"]).kv_cache == "off"
    monkeypatch.setenv(KV_CACHE_ENV, "off")
    assert parse_args(["--model-path", "m"]).kv_cache == "off"
    monkeypatch.setenv(KV_CACHE_ENV, "0")
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "m"])

    async def body(c: EngineClient) -> None:
        assert (await c.get_server_info())["kv_cache"] is True

    kit.run_with_client(engine.url, body)
