"""The client turns SGLang's ``meta_info.weight_versions`` spans into per-token versions."""

import msgspec
import pytest

from policies.engine.errors import EngineError
from policies.engine.replies import GenerateResponse, to_output


def answer(spans):
    meta = {"finish_reason": {"type": "length"}, "weight_version": "3",
            "output_token_logprobs": [[-0.1, 5, None], [-0.2, 6, None], [-0.3, 7, None]]}
    if spans is not None:
        meta["weight_versions"] = spans
    return msgspec.json.decode(msgspec.json.encode({"output_ids": [5, 6, 7], "meta_info": meta}),
                               type=GenerateResponse)


def test_spans_expand_to_one_version_per_token():
    out = to_output(answer([{"version": "2", "start": 0, "end": 2}, {"version": "3", "start": 2, "end": 3}]), True,
                    url="http://127.0.0.1:1")
    assert out.token_versions == ["2", "2", "3"]
    assert to_output(answer(None), True, url="http://127.0.0.1:1").token_versions is None  # SGLang < 0.5.23


@pytest.mark.parametrize("spans", [
    [{"version": "2", "start": 0, "end": 2}],  # leaves a token undated
    [{"version": "2", "start": 0, "end": 1}, {"version": "3", "start": 2, "end": 3}],  # a gap
])
def test_spans_that_do_not_cover_the_tokens_are_an_engine_error(spans):
    with pytest.raises(EngineError, match="weight_versions"):
        to_output(answer(spans), True, url="http://127.0.0.1:1")
