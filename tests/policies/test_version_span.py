"""A request that spans a real weight update records the right version for each token.

Real engine subprocess, real HTTP: the broadcaster's pause -> update -> continue lands in the
middle of a greedy generation; the runtime's SampleRunner resumes the request if it was aborted.
Ground truth is computed with transformers directly: the first k tokens are model A's greedy
continuation; the rest are model B's greedy continuation of prompt + those k tokens, recomputed
(abort, retract) or, for in_place, on top of the KV cache model A computed for prompt + the first
k - 1 tokens (SGLang keeps a frozen request's cache across the update).
"""

import asyncio

import pytest
import torch
import transformers

from actors.rollout import SampleRunner
from buffers.types import Sample, Status


def greedy(model, ids, n):
    out, lps = [], []
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            tok = int(logp.argmax())
            out.append(tok)
            lps.append(float(logp[tok]))
            ids.append(tok)
    return out, lps


def greedy_on_kept_cache(model_a, model_b, prompt, first, n):
    """B's greedy continuation when prompt + first[:-1] are cached by A (the last token is not yet)."""
    cache = transformers.DynamicCache(config=model_a.config)
    out, lps, nxt = [], [], first[-1]
    with torch.no_grad():
        model_a(torch.tensor([prompt + first[:-1]]), past_key_values=cache, use_cache=True)
        for _ in range(n):
            logits = model_b(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True).logits[0, -1]
            logp = torch.log_softmax(logits.float(), -1)
            nxt = int(logp.argmax())
            out.append(nxt)
            lps.append(float(logp[nxt]))
    return out, lps


@pytest.mark.parametrize("pause", ["abort", "in_place", "retract"])
def test_tokens_before_and_after_an_update_carry_their_versions(pause, engine, tiny_model_dir, tiny_model_dir_b,
                                                                kit, tmp_path):
    prompt, n = [1, 5, 9, 3], 40
    sample = Sample(group_id=0, index=0, prompt_ids=prompt)

    async def body(client):
        runner = SampleRunner(engines=client, decode=str, exact_answer_versions=pause == "abort", sampling_params={
            "temperature": 0.0, "max_new_tokens": n, "stop_token_ids": [], "ignore_eos": True})
        task = asyncio.create_task(runner.run(sample))
        start = (await kit.stats(client))["decode_steps"]
        await kit.wait_until(client, lambda s: s["decode_steps"] >= start + 8)
        await client.pause(pause)
        await client.update_weights_from_disk(str(tiny_model_dir_b), weight_version="1")
        await client.resume()
        await task
        assert runner.counters["resumed_after_abort"] == (pause == "abort")
        # leave the module's engine as the other tests expect it: model A at version 0
        await client.pause("abort")
        await client.update_weights_from_disk(str(tiny_model_dir), weight_version="0")
        await client.resume()

    kit.run_with_client(engine.url, body)
    k = sample.token_versions.count(0)
    assert 0 < k < n and sample.token_versions == [0] * k + [1] * (n - k)
    assert sample.n_segments == (2 if pause == "abort" else 1)
    assert sample.status == Status.TRUNCATED and len(sample.response_ids) == n
    model_a = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model_b = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir_b)
    first, first_lp = greedy(model_a, prompt, k)
    if pause == "in_place":
        rest, rest_lp = greedy_on_kept_cache(model_a, model_b, prompt, first, n - k)
    else:
        rest, rest_lp = greedy(model_b, prompt + first, n - k)
    assert sample.response_ids == first + rest
    assert torch.allclose(torch.tensor(sample.behavior_logprobs), torch.tensor(first_lp + rest_lp), atol=1e-4)
