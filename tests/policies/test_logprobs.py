"""Chunked log-probs and entropies against the full-vocabulary float64 reference: values and gradients."""

import pytest
import torch

from policies.logprobs import token_logprobs


def reference(h, w, targets, temperature):
    logp_all = torch.log_softmax(h @ w.T / temperature, dim=-1)
    return logp_all.gather(-1, targets[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


def loss(logp, entropy, a, b):
    return (logp * a).sum() + ((entropy * b).sum() if b is not None else 0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_values_and_gradients_match_the_full_softmax(temperature, chunk):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(23, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=g)
    a, b = torch.randn(23, dtype=torch.float64, generator=g), torch.randn(23, dtype=torch.float64, generator=g)
    logp, ent = token_logprobs(h, w, targets, temperature=temperature, chunk=chunk)
    ref_logp, ref_ent = reference(h, w, targets, temperature)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-12)
    for ent_weight in (b, None):  # with the entropy's gradient, and with the entropy unused
        got = torch.autograd.grad(loss(*token_logprobs(h, w, targets, temperature=temperature, chunk=chunk),
                                       a, ent_weight), (h, w))
        want = torch.autograd.grad(loss(*reference(h, w, targets, temperature), a, ent_weight), (h, w))
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 9, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: token_logprobs(h, w, targets, temperature=0.8, chunk=2), (h, w))


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long), temperature=0.0)
