"""SGLang's /generate and /get_server_info fields where the embedded engine claims them (real
engine subprocess, real HTTP, raw JSON bodies as an SGLang client sends them): prompt logprobs
(logprob_start_len -> input_token_logprobs), top logprobs (top_logprobs_num), logit_bias, the
server-info facts, weight_versions spans of empty answers, and a 400 naming every SGLang field
the engine does not implement. Field names and defaults are checked against SGLang's own source
in test_sglang_parity.py."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch
import transformers

from policies.engine.wire import REFUSED_GENERATE, REFUSED_SAMPLING

pytestmark = pytest.mark.timeout(60)

PROMPT = [5, 9, 2, 17, 3, 11]
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def post(url: str, route: str, body: dict) -> tuple[int, dict]:
    async def main() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s, s.post(f"{url}{route}", json=body) as resp:
            return resp.status, await resp.json()

    return asyncio.run(main())


def full_log_probs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) at every position of one unpadded forward: row j predicts ids[j + 1]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, -1)


@pytest.mark.parametrize("max_new_tokens", [0, 4])
@pytest.mark.parametrize("start", [0, 2])
def test_prompt_logprobs_from_logprob_start_len(engine, model, start, max_new_tokens):
    body = {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": start,
            "sampling_params": {**GREEDY, "max_new_tokens": max_new_tokens}}  # fmt: skip
    status, answer = post(engine.url, "/generate", body)
    assert status == 200, answer
    meta = answer["meta_info"]
    entries = meta["input_token_logprobs"]
    assert [e[1] for e in entries] == PROMPT[start:]  # aligned with the prompt from `start`
    assert entries[0][0] is None and all(e[2] is None for e in entries)  # as SGLang: first has none
    expected = full_log_probs(model, PROMPT)
    for j, (lp, tok, _) in enumerate(entries[1:], start=start + 1):
        assert lp == pytest.approx(float(expected[j - 1, tok]), abs=1e-4)
    assert len(meta["output_token_logprobs"]) == len(answer["output_ids"]) == max_new_tokens


def test_default_logprob_start_is_the_last_prompt_token_and_costs_nothing(engine):
    status, answer = post(engine.url, "/generate", {"input_ids": PROMPT, "return_logprob": True,
                                                    "sampling_params": GREEDY})  # fmt: skip
    assert status == 200
    assert answer["meta_info"]["input_token_logprobs"] == [[None, PROMPT[-1], None]]
    status, answer = post(engine.url, "/generate", {"input_ids": PROMPT, "logprob_start_len": 0,
                                                    "sampling_params": GREEDY})  # fmt: skip
    assert status == 200 and "input_token_logprobs" not in answer["meta_info"]  # no return_logprob


def test_top_logprobs_of_prompt_and_output(engine, model):
    k, temperature = 3, 0.7
    body = {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 1, "top_logprobs_num": k,
            "sampling_params": {"temperature": temperature, "max_new_tokens": 5, "ignore_eos": True,
                                "sampling_seed": 4}}  # fmt: skip
    status, answer = post(engine.url, "/generate", body)
    assert status == 200, answer
    meta, output = answer["meta_info"], answer["output_ids"]
    expected = full_log_probs(model, PROMPT + output, temperature)
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(PROMPT) - 1
    positions = [(meta["input_top_logprobs"][i], 1 + i - 1) for i in range(1, len(PROMPT) - 1)]
    positions += [(meta["output_top_logprobs"][i], len(PROMPT) - 1 + i) for i in range(len(output))]
    assert len(meta["output_top_logprobs"]) == len(output)
    for top, row in positions:
        values, ids = expected[row].topk(k)
        assert [t[1] for t in top] == ids.tolist() and all(t[2] is None for t in top)
        assert [t[0] for t in top] == pytest.approx(values.tolist(), abs=1e-4)
    # the sampled token's logprob is from the same distribution as its top logprobs
    for i, (lp, tok, _) in enumerate(meta["output_token_logprobs"]):
        assert lp == pytest.approx(float(expected[len(PROMPT) - 1 + i, tok]), abs=1e-4)


def test_logit_bias_shifts_greedy_choices_and_logprobs(engine, model):
    status, plain = post(engine.url, "/generate", {"input_ids": PROMPT, "sampling_params": GREEDY})
    assert status == 200
    favoured, avoided = 7, plain["output_ids"][0]
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {**GREEDY, "logit_bias": {str(favoured): 100.0}}}  # fmt: skip
    status, biased = post(engine.url, "/generate", body)
    assert status == 200 and biased["output_ids"] == [favoured] * GREEDY["max_new_tokens"]
    assert all(lp > -1e-3 for lp, _, _ in biased["meta_info"]["output_token_logprobs"])  # ~log 1
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {**GREEDY, "max_new_tokens": 1, "logit_bias": {str(avoided): -100.0}}}  # fmt: skip
    status, answer = post(engine.url, "/generate", body)
    logits = full_log_probs(model, PROMPT)[-1]
    logits[avoided] -= 100.0
    assert status == 200 and answer["output_ids"] == [int(logits.argmax())] != [avoided]
    assert answer["meta_info"]["output_token_logprobs"][0][0] == pytest.approx(
        float(torch.log_softmax(logits, -1).max()), abs=1e-4
    )


@pytest.mark.parametrize(("bias", "reason"), [({"99": 1.0}, "outside [0, 32)"), ({"x": 1.0}, "not a token id")])
def test_a_bad_logit_bias_is_refused(engine, bias, reason):
    body = {"input_ids": PROMPT, "sampling_params": {**GREEDY, "logit_bias": bias}}
    status, answer = post(engine.url, "/generate", body)
    assert status == 400 and reason in answer["error"] and "logit_bias" in answer["error"]


def _non_default(default: object) -> object:
    return True if default is False else "x" if default is None else default + 1


@pytest.mark.parametrize("name", sorted(REFUSED_SAMPLING))
def test_each_unimplemented_sampling_param_is_refused_by_name(engine, name):
    body = {"input_ids": PROMPT, "sampling_params": {**GREEDY, name: _non_default(REFUSED_SAMPLING[name])}}
    status, answer = post(engine.url, "/generate", body)
    assert status == 400 and f"sampling_params.{name} is not supported" in answer["error"]


@pytest.mark.parametrize("name", sorted(REFUSED_GENERATE))
def test_each_unimplemented_generate_field_is_refused_by_name(engine, name):
    status, answer = post(engine.url, "/generate", {"input_ids": PROMPT, name: _non_default(REFUSED_GENERATE[name])})
    assert status == 400 and f"{name} is not supported" in answer["error"]


def test_unimplemented_fields_at_sglangs_defaults_are_accepted(engine):
    sampling = {k: v for k, v in REFUSED_SAMPLING.items() if v is not None}
    body = {"input_ids": PROMPT, "sampling_params": {**GREEDY, **sampling, "no_stop_trim": True},
            **{k: v for k, v in REFUSED_GENERATE.items() if v is not None}, "priority": 3}  # fmt: skip
    status, answer = post(engine.url, "/generate", body)
    assert status == 200 and len(answer["output_ids"]) == GREEDY["max_new_tokens"]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [({"logprob_start_len": 6}, "logprob_start_len must be -1 or in [0, 6)"),
     ({"logprob_start_len": -2}, "logprob_start_len"), ({"top_logprobs_num": -1}, "top_logprobs_num must be >= 0")],
)  # fmt: skip
def test_bad_logprob_options_are_refused(engine, extra, reason):
    status, answer = post(engine.url, "/generate", {"input_ids": PROMPT, "return_logprob": True, **extra})
    assert status == 400 and reason in answer["error"]


def test_server_info_reports_sglangs_capacity_and_version_fields(engine):
    async def main() -> dict:
        async with aiohttp.ClientSession() as s, s.get(f"{engine.url}/get_server_info") as resp:
            return await resp.json()

    info = asyncio.run(main())
    assert info["version"] == "0.5.23" and info["max_req_input_len"] == info["context_length"] - 1
    assert info["max_total_num_tokens"] == info["max_running_requests"] * info["context_length"]


def test_an_empty_answer_has_one_empty_span_of_the_current_version(engine, kit):
    held = {"input_ids": PROMPT, "rid": "never-started", "sampling_params": GREEDY}

    async def body(c) -> None:  # noqa: ANN001
        version = await c.get_weight_version()
        async with aiohttp.ClientSession() as s:
            zero = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 0}}
            async with s.post(f"{engine.url}/generate", json=zero) as resp:
                meta = (await resp.json())["meta_info"]
            assert meta["weight_versions"] == [{"version": version, "start": 0, "end": 0}]
            # aborted before its first token: queued behind a pause, then aborted
            await c.pause("in_place")
            try:
                task = asyncio.create_task(_send(s, f"{engine.url}/generate", held))
                await kit.wait_until(c, lambda st: st["num_waiting_reqs"] == 1)
                await c.update_weight_version("span-test")
                await c.abort("never-started")
                answer = await task
            finally:
                await c.resume()
            await c.update_weight_version(version)
        meta = answer["meta_info"]
        assert answer["output_ids"] == [] and meta["finish_reason"]["type"] == "abort"
        assert meta["weight_versions"] == [{"version": "span-test", "start": 0, "end": 0}]

    kit.run_with_client(engine.url, body)



async def _send(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url, json=body) as resp:
        return await resp.json()
