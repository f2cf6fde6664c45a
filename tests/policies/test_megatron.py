"""The Megatron-core backend on CPU: HF <-> Megatron weights, and the Megatron model's log-probs,
entropies and gradients against the transformers model on the same weights (float64)."""

from __future__ import annotations

import pytest
import torch
import transformers

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from policies.megatron import convert, parallel  # noqa: E402
from policies.megatron.logprobs import token_logp_entropy  # noqa: E402
from policies.megatron.model import Parallelism, build, check_supported  # noqa: E402
from policies.model import qwen3_config  # noqa: E402

TEMPERATURE = 0.7


def tiny_qwen3(**kw) -> transformers.Qwen3Config:
    return qwen3_config(vocab_size=96, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=80, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, **kw)


def tiny_llama() -> transformers.LlamaConfig:  # untied head, no qk-norm
    return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    tie_word_embeddings=False)


def random_hf(config, seed: int = 0) -> torch.nn.Module:
    """A float64 HF model with every weight random (norms too, so a swapped norm shows)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.08) + (1.0 if p.dim() == 1 else 0.0))
    return model


@pytest.fixture(scope="module")
def megatron_groups():
    """Megatron's process groups for this (single, CPU) process: TP = PP = 1 over gloo."""
    created = parallel.init(Parallelism(), device="cpu")
    yield
    parallel.destroy(created)


@pytest.mark.parametrize("make_config", [tiny_qwen3, tiny_llama])
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_megatron_hf_round_trip_is_exact(make_config, tp):
    config = make_config()
    hf = random_hf(config).state_dict()
    if config.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    layouts = [convert.Layout.of(config, tp_size=tp, tp_rank=r) for r in range(tp)]
    ranks = [convert.to_megatron(hf.__getitem__, lay) for lay in layouts]
    for name, t in ranks[0].items():  # the shards really are shards
        if "norm" not in name:
            assert t.numel() * tp == sum(r[name].numel() for r in ranks[1:]) + t.numel()
    back = {k: v for name in ranks[0] for k, v in convert.to_hf(name, [r[name] for r in ranks], layouts[0])}
    assert back.keys() == hf.keys()
    for k, v in hf.items():
        assert torch.equal(back[k], v), k


def test_round_trip_across_pipeline_stages():
    """Two stages: the second's local layer 0 is HF's layer 1, and only it holds norm and head."""
    config = tiny_llama()
    hf = random_hf(config).state_dict()
    stages = [convert.Layout.of(config, num_layers=1, layer_offset=i, pre_process=i == 0, post_process=i == 1)
              for i in range(2)]
    back = {}
    for lay in stages:
        mg = convert.to_megatron(hf.__getitem__, lay)
        assert ("embedding.word_embeddings.weight" in mg) == lay.pre_process
        assert ("output_layer.weight" in mg) == lay.post_process
        back.update(kv for name, t in mg.items() for kv in convert.to_hf(name, [t], lay))
    assert back.keys() == hf.keys() and all(torch.equal(back[k], v) for k, v in hf.items())


def _megatron_from(config, hf_model) -> torch.nn.Module:
    model = build(config, Parallelism(), dtype=torch.float64, on_gpu=False)
    state = convert.to_megatron(hf_model.state_dict().__getitem__, convert.Layout.of(config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    return model


def _batch(vocab: int):
    """Three right-padded rows of lengths 17, 11, 5 (pad id 0)."""
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (3, 17))
    valid = torch.arange(17)[None, :] < torch.tensor([17, 11, 5])[:, None]
    return ids * valid, valid


def _hf_reference(hf_model, ids, valid):
    logits = hf_model(input_ids=ids, attention_mask=valid.long()).logits[:, :-1] / TEMPERATURE
    logp_all = torch.log_softmax(logits, -1)
    return logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def _megatron_logp(model, ids, chunk_tokens):
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    hidden = model(input_ids=ids, position_ids=pos, attention_mask=None)
    return token_logp_entropy(hidden[:-1], model.output_weight(), ids[:, 1:], temperature=TEMPERATURE,
                              chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("make_config", [tiny_qwen3, tiny_llama])
def test_megatron_logprobs_and_gradients_equal_hf(megatron_groups, make_config):
    """Same weights, same padded batch: per-token log-probs and entropies agree to 1e-6 (the
    models are float64, but both compute rotary frequencies in float32, and megatron's
    cross-entropy computes in float32), and so do the gradients of a masked log-prob + entropy
    objective, the head's chunks recomputed in backward (chunk of 7 tokens over 48)."""
    config = make_config()
    hf_model = random_hf(config)
    model = _megatron_from(config, hf_model)
    ids, valid = _batch(config.vocab_size)
    mask = (valid[:, 1:] & valid[:, :-1]).double()

    ref_lp, ref_ent = _hf_reference(hf_model, ids, valid)
    lp, ent = _megatron_logp(model, ids, chunk_tokens=7)
    on = mask.bool()
    assert (lp - ref_lp)[on].abs().max() < 1e-6
    assert (ent - ref_ent)[on].abs().max() < 1e-6
    assert lp[on].std() > 0.1  # a real distribution, not a degenerate one

    ((ref_lp + 0.1 * ref_ent) * mask).sum().backward()
    ((lp + 0.1 * ent) * mask).sum().backward()
    hf_grads = {k: p.grad for k, p in hf_model.named_parameters()}
    grads = convert.hf_gradients(model, config)
    assert grads.keys() == {k for k in hf_grads if not (config.tie_word_embeddings and k == "lm_head.weight")}
    for hf_name, g in grads.items():
        ref = hf_grads[hf_name]
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item()), hf_name


def test_chunking_does_not_change_values(megatron_groups):
    config = tiny_qwen3()
    model = _megatron_from(config, random_hf(config))
    ids, _ = _batch(config.vocab_size)
    with torch.no_grad():
        whole = _megatron_logp(model, ids, chunk_tokens=10_000)
        chunked = _megatron_logp(model, ids, chunk_tokens=5)
    assert torch.equal(whole[0], chunked[0]) and torch.allclose(whole[1], chunked[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("change", "message"), [
    (dict(tensor_model_parallel_size=3), "must divide the vocabulary"),
    (dict(pipeline_model_parallel_size=4), "must divide the 2 layers"),
    (dict(tensor_model_parallel_size=2, sequence_parallel=True), "need transformer-engine"),
    (dict(context_parallel_size=2), "need transformer-engine"),
    (dict(expert_model_parallel_size=2), "needs an MoE model"),
])
def test_unsupported_layouts_fail_in_one_line(change, message):
    with pytest.raises(ValueError, match=message):
        check_supported(tiny_qwen3(), Parallelism(**change))
