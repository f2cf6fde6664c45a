"""The embedded engine server end to end: a real subprocess, real HTTP, a tiny random model.

One engine serves the whole module; tests that change its weights restore them before returning.
Concurrency is driven by the engine's own counters (get_server_info internal_states) and by
pause/continue, never by sleeping for a guessed duration.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.engine import EngineClient, EngineError
from tests.policies.engine_refs import reference_logprobs

pytestmark = pytest.mark.timeout(60)

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


def test_greedy_is_deterministic_and_padding_invariant(engine, kit):
    prompts = [[1, 2, 3], [5] * 9, list(range(7, 30)), [30]]
    sampled = {"temperature": 0.9, "top_k": 10, "max_new_tokens": 12, "sampling_seed": 11, "ignore_eos": True}
    params = [GREEDY, GREEDY, GREEDY, sampled]

    async def body(c: EngineClient) -> None:
        alone = [await c.generate(p, sp) for p, sp in zip(prompts, params, strict=True)]
        assert (await c.generate(prompts[0], GREEDY)).output_ids == alone[0].output_ids
        # queue all four while paused so that they are admitted into the same batch
        await c.pause("in_place")
        before = await kit.stats(c)
        tasks = [asyncio.create_task(c.generate(p, sp)) for p, sp in zip(prompts, params, strict=True)]
        await kit.wait_until(c, lambda s: s["num_waiting_reqs"] == 4)
        await c.resume()
        batched = await asyncio.gather(*tasks)
        assert (await kit.stats(c))["decode_steps"] - before["decode_steps"] == 12  # one batch, 12 steps
        for one, many in zip(alone, batched, strict=True):
            assert many.output_ids == one.output_ids
            torch.testing.assert_close(torch.tensor(many.logprobs), torch.tensor(one.logprobs), atol=1e-4, rtol=0)
            assert many.finish_reason == "length" and many.completion_tokens == 12

    kit.run_with_client(engine.url, body)


@pytest.mark.parametrize(
    "params",
    [GREEDY, {"temperature": 0.7, "top_k": 8, "top_p": 0.9, "max_new_tokens": 20, "sampling_seed": 5}],
)
def test_logprobs_match_a_direct_forward(engine, kit, hf_models, tiny_model_dir, params):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]

    async def body(c: EngineClient) -> None:
        out = await c.generate(prompt, params)
        expected, logits = reference_logprobs(hf_models[tiny_model_dir], prompt, out.output_ids, params["temperature"])
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=0)
        if params["temperature"] == 0:
            assert out.output_ids == logits.argmax(-1).tolist()
        else:  # every sampled token is inside its step's top-k
            top_k = logits.topk(params["top_k"], dim=-1).indices
            assert all(t in row for t, row in zip(out.output_ids, top_k.tolist(), strict=True))
        again = await c.generate(prompt, params)
        assert again.output_ids == out.output_ids  # seeded sampling is reproducible

    kit.run_with_client(engine.url, body)


def test_stop_token_and_length(engine, kit):
    async def body(c: EngineClient) -> None:
        for seed in range(20):  # find a sampled sequence with a token not seen before it
            params = {"temperature": 1.0, "max_new_tokens": 20, "sampling_seed": seed, "ignore_eos": True}
            full = await c.generate([2, 7], params)
            firsts = [k for k, t in enumerate(full.output_ids) if k > 0 and t not in full.output_ids[:k]]
            if firsts:
                break
        assert full.finish_reason == "length" and len(full.output_ids) == 20
        k = firsts[0]
        stopped = await c.generate([2, 7], {**params, "stop_token_ids": [full.output_ids[k]]})
        assert stopped.output_ids == full.output_ids[: k + 1]  # the stop token is included
        assert stopped.finish_reason == "stop"
        assert stopped.completion_tokens == k + 1 == len(stopped.logprobs)

    kit.run_with_client(engine.url, body)


def test_abort_one_rid_returns_partial_output(engine, kit):
    async def body(c: EngineClient) -> None:
        steps0 = (await kit.stats(c))["decode_steps"]
        params = {"temperature": 0, "max_new_tokens": 60, "ignore_eos": True}
        target = asyncio.create_task(c.generate([1, 2], params, rid="victim"))
        other = asyncio.create_task(c.generate([1, 2], {**params, "max_new_tokens": 61}, rid="bystander"))
        # any step after steps0 decodes the target: once two have run it holds >= 1 token
        await kit.wait_until(c, lambda s: s["decode_steps"] >= steps0 + 2)
        await c.abort("victim")
        out = await target
        assert out.finish_reason == "abort"
        assert 1 <= len(out.output_ids) < 60 and len(out.logprobs) == len(out.output_ids)
        assert not other.done()
        rest = await other
        assert rest.finish_reason == "length" and rest.output_ids[: len(out.output_ids)] == out.output_ids

    kit.run_with_client(engine.url, body)


def test_pause_abort_ends_in_flight_and_queues_new_until_resume(engine, kit):
    async def body(c: EngineClient) -> None:
        steps0 = (await kit.stats(c))["decode_steps"]
        params = {"temperature": 1.0, "max_new_tokens": 55, "ignore_eos": True}
        in_flight = [asyncio.create_task(c.generate([4, 4, i], params)) for i in range(3)]
        await kit.wait_until(c, lambda s: s["num_running_reqs"] == 3 and s["decode_steps"] > steps0 + 1)
        await c.pause("abort")
        outs = await asyncio.gather(*in_flight)
        assert all(o.finish_reason == "abort" and len(o.output_ids) < 55 for o in outs)
        paused = await kit.stats(c)
        assert paused["paused"] and paused["num_running_reqs"] == 0
        assert await c.health_generate(timeout_s=2)  # a paused engine is healthy (documented choice)
        queued = asyncio.create_task(c.generate([1, 2], {**GREEDY, "max_new_tokens": 5}))
        await kit.wait_until(c, lambda s: s["num_waiting_reqs"] == 1)
        assert (await kit.stats(c))["decode_steps"] == paused["decode_steps"] and not queued.done()
        await c.resume()
        out = await queued
        assert out.finish_reason == "length" and len(out.output_ids) == 5

    kit.run_with_client(engine.url, body)


def test_pause_in_place_freezes_and_resumes_identically(engine, kit):
    prompt, params = [6, 5, 4], {"temperature": 0, "max_new_tokens": 45, "ignore_eos": True}

    async def body(c: EngineClient) -> None:
        reference = await c.generate(prompt, params)
        steps0 = (await kit.stats(c))["decode_steps"]
        task = asyncio.create_task(c.generate(prompt, params))
        await kit.wait_until(c, lambda s: s["decode_steps"] > steps0)
        await c.pause("in_place")
        frozen = await kit.stats(c)
        assert frozen["num_running_reqs"] == 1 and frozen["decode_steps"] - steps0 < 45
        assert (await kit.stats(c))["decode_steps"] == frozen["decode_steps"]  # quiescent
        assert not task.done()
        await c.resume()
        out = await task
        assert out.output_ids == reference.output_ids and out.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(reference.logprobs), atol=1e-4, rtol=0)

    kit.run_with_client(engine.url, body)


def test_http_loop_answers_while_decoding(engine, kit):
    async def body(c: EngineClient) -> None:
        params = {"temperature": 1.0, "max_new_tokens": 50, "ignore_eos": True}
        tasks = [asyncio.create_task(c.generate([i % 32, 1], params)) for i in range(64)]
        await kit.wait_until(c, lambda s: s["num_running_reqs"] == 64)
        assert await c.health(timeout_s=2)
        assert await c.get_weight_version()
        assert not any(t.done() for t in tasks)  # answered while the batch was still decoding
        assert all(o.completion_tokens == 50 for o in await asyncio.gather(*tasks))

    kit.run_with_client(engine.url, body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"input_ids": [1] * 10, "sampling_params": {"max_new_tokens": 60}}, "max_position_embeddings=64"),
        ({"input_ids": [], "sampling_params": {"max_new_tokens": 5}}, "input_ids is empty"),
        ({"input_ids": [1, 99]}, "outside [0, 32)"),
        ({"input_ids": "12"}, "malformed"),
        ({"input_ids": [1], "stream": True}, "stream not supported"),
        ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "temperature"),
        ({"input_ids": [1], "sampling_params": {"n": 0}}, "n must be >= 1"),
        ({"input_ids": [[1], 2]}, "not a mix"),
        ({"input_ids": [[1], []]}, "empty for a member"),
        ({"input_ids": [[1], [99]], "sampling_params": {"max_new_tokens": 2}}, "outside [0, 32)"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "1 entries for 2 prompts"),
        ({"input_ids": [[1], [2]], "sampling_params": [{"n": 2}, {}]}, "n must be the same"),
        ({"input_ids": [[1], [2]], "rid": ["a", "a"]}, "unique"),
        ({"input_ids": [[1], [2]], "rid": ["a"]}, "1 entries for 2 prompts"),
    ],
)
def test_bad_generate_requests_get_400_with_a_reason(engine, body, reason):
    async def main() -> None:
        async with aiohttp.ClientSession() as s, s.post(f"{engine.url}/generate", json=body) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert reason in error and "\n" not in error and "Traceback" not in error

    asyncio.run(main())


def test_malformed_json_and_client_error_message(engine, kit):
    async def body(c: EngineClient) -> None:
        async with aiohttp.ClientSession() as s, s.post(f"{engine.url}/generate", data=b"{not json") as resp:
            assert resp.status == 400 and "malformed" in (await resp.json())["error"]
        with pytest.raises(EngineError, match="max_position_embeddings") as info:
            await c.generate([1] * 30, {"max_new_tokens": 40})
        assert info.value.status == 400 and info.value.route == "/generate"

    kit.run_with_client(engine.url, body)


def test_update_weights_from_disk(engine, kit, hf_models, tiny_model_dir, tiny_model_dir_b, tmp_path):
    prompt, params = [9, 8, 7], {**GREEDY, "max_new_tokens": 40}

    async def body(c: EngineClient) -> None:
        version0 = await c.get_weight_version()
        before = await c.generate(prompt, params)
        # an unpaused update waits for the running batch to drain: the request keeps one version
        steps0 = (await kit.stats(c))["decode_steps"]
        running = asyncio.create_task(c.generate(prompt, params))
        await kit.wait_until(c, lambda s: s["decode_steps"] > steps0)
        result = await c.update_weights_from_disk(str(tiny_model_dir_b), weight_version="7")
        assert result.success
        spanned = await running
        assert spanned.weight_version == version0 and spanned.output_ids == before.output_ids
        after = await c.generate(prompt, params)
        assert after.weight_version == "7" and await c.get_weight_version() == "7"
        expected, _ = reference_logprobs(hf_models[tiny_model_dir_b], prompt, after.output_ids, 0)
        torch.testing.assert_close(torch.tensor(after.logprobs), expected, atol=1e-4, rtol=0)
        assert not torch.allclose(torch.tensor(after.logprobs), torch.tensor(before.logprobs))
        await _bad_checkpoints_are_refused(c, tiny_model_dir, tmp_path, after)
        await c.update_weights_from_disk(str(tiny_model_dir), weight_version="8")  # restore
        assert (await c.generate(prompt, params)).output_ids == before.output_ids

    kit.run_with_client(engine.url, body)


async def _bad_checkpoints_are_refused(c: EngineClient, good_dir, tmp_path, current) -> None:
    tensors = load_file(str(good_dir / "model.safetensors"))
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    reshaped = {**tensors, "model.norm.weight": torch.ones(65)}
    extra = {**tensors, "model.bogus.weight": torch.ones(3)}
    for name, bad in {"missing": missing, "reshaped": reshaped, "extra": extra}.items():
        (tmp_path / name).mkdir()
        save_file(bad, str(tmp_path / name / "model.safetensors"))
    for name, reason in {"missing": "missing", "reshaped": "shape mismatch", "extra": "unexpected"}.items():
        with pytest.raises(EngineError, match=reason) as info:
            await c.update_weights_from_disk(str(tmp_path / name), weight_version="bad")
        assert info.value.status == 400
    with pytest.raises(EngineError, match="not a directory"):
        await c.update_weights_from_disk(str(tmp_path / "nowhere"), weight_version="bad")
    assert await c.get_weight_version() == current.weight_version
    assert (await c.generate([9, 8, 7], {**GREEDY, "max_new_tokens": 40})).output_ids == current.output_ids


def test_frozen_request_spans_an_update_and_reports_the_new_version(engine, kit, tiny_model_dir):
    async def body(c: EngineClient) -> None:
        steps0 = (await kit.stats(c))["decode_steps"]
        task = asyncio.create_task(c.generate([3, 3], {**GREEDY, "max_new_tokens": 50}))
        await kit.wait_until(c, lambda s: s["decode_steps"] > steps0)
        await c.pause("in_place")
        result = await c.update_weights_from_disk(str(tiny_model_dir), weight_version="9")
        assert result.num_paused_requests == 1 and not task.done()
        await c.resume()
        assert (await task).weight_version == "9"

    kit.run_with_client(engine.url, body)


def test_abort_all_and_info_routes(engine, kit, tiny_model_dir):
    async def body(c: EngineClient) -> None:
        steps0 = (await kit.stats(c))["decode_steps"]
        tasks = [asyncio.create_task(c.generate([i, 1], {**GREEDY, "max_new_tokens": 50})) for i in range(4)]
        await kit.wait_until(c, lambda s: s["num_running_reqs"] == 4 and s["decode_steps"] > steps0)
        await c.abort_all()
        assert {o.finish_reason for o in await asyncio.gather(*tasks)} == {"abort"}
        await c.update_weight_version("10")
        assert await c.get_weight_version() == "10"
        await c.flush_cache()
        info = await c.get_server_info()
        assert info["model_path"] == str(tiny_model_dir) and info["context_length"] == 64
        assert await c.health_generate(timeout_s=5)

    kit.run_with_client(engine.url, body)


# ---- batched requests (SGLang's list form and n) ------------------------------------------
