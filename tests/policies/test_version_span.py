"""A request that spans a real weight update records the right version for each token.

Real engine subprocess, real HTTP: the broadcaster's pause(abort) -> update -> continue lands in
the middle of a greedy generation; the runtime's SampleRunner resumes the request. Ground truth
is computed with transformers directly: the first k tokens are model A's greedy continuation,
the rest model B's greedy continuation of prompt + those k tokens.
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


@pytest.mark.parametrize("pause", ["abort", "in_place"])
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
    rest, rest_lp = greedy(model_b, prompt + first, n - k)
    assert sample.response_ids == first + rest
    assert torch.allclose(torch.tensor(sample.behavior_logprobs), torch.tensor(first_lp + rest_lp), atol=1e-4)
