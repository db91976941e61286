"""rpg.logprobs: chunked log-probs and entropy equal the materialised path, values and gradients."""

import pytest
import torch

from rpg import logprobs

F64 = torch.float64


def _problem(n=37, h=8, v=50, seed=0, dtype=F64, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g, dtype=F64) / h**0.5).to(dtype).requires_grad_(True)
    b = (0.3 * torch.randn(v, generator=g, dtype=F64)).to(dtype).requires_grad_(True) if bias else None
    tokens = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, tokens


def _naive(hidden, weight, bias, tokens, temperature, entropy):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return logprobs.from_logits(logits, tokens, temperature=temperature, return_entropy=entropy)


@pytest.mark.parametrize("chunks", [(1024, 8192), (7, 9), (5, 50), (37, 1), (1, 13)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_materialised_float64(chunks, temperature, entropy, bias):
    hidden, weight, b, tokens = _problem(bias=bias)
    kw = dict(temperature=temperature, chunk_size=chunks[0], vocab_chunk_size=chunks[1], return_entropy=entropy)
    got = logprobs.from_hidden(hidden, weight, tokens, bias=b, **kw)
    want = _naive(hidden, weight, b, tokens, temperature, entropy)
    got, want = (got, want) if entropy else ((got,), (want,))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(x.shape, generator=g, dtype=F64) for x in got]
    params = [hidden, weight] + ([b] if bias else [])
    g_got = torch.autograd.grad(sum((u * x).sum() for u, x in zip(upstream, got)), params)
    g_want = torch.autograd.grad(sum((u * x).sum() for u, x in zip(upstream, want)), params)
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


def test_entropy_only_gradient():
    hidden, weight, b, tokens = _problem()
    _, ent = logprobs.from_hidden(hidden, weight, tokens, bias=b, chunk_size=8, vocab_chunk_size=16, return_entropy=True)
    _, ent_ref = _naive(hidden, weight, b, tokens, 1.0, True)
    (g1,) = torch.autograd.grad(ent.sum(), hidden)
    (g2,) = torch.autograd.grad(ent_ref.sum(), hidden)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10)


def test_leading_dims_and_bf16():
    hidden, weight, _, tokens = _problem(n=24, dtype=torch.bfloat16, bias=False)
    logp = logprobs.from_hidden(hidden.view(4, 6, -1), weight, tokens.view(4, 6), chunk_size=5, vocab_chunk_size=7)
    assert logp.shape == (4, 6) and logp.dtype == torch.float32
    want = _naive(hidden.float(), weight.float(), None, tokens, 1.0, False).view(4, 6)
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
    logp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_from_logits_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=F64))
    logp, ent = logprobs.from_logits(logits, torch.tensor([1]), return_entropy=True)
    assert logp.item() == pytest.approx(torch.log(torch.tensor(0.25)).item())
    assert ent.item() == pytest.approx(-(0.5 * torch.log(torch.tensor(0.5)) + 0.5 * torch.log(torch.tensor(0.25))).item())


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda h, w, t: logprobs.from_hidden(h, w[:, :3], t), ValueError, r"weight must be \[V, H\]"),
        (lambda h, w, t: logprobs.from_hidden(h, w, t[:5]), ValueError, "tokens has shape"),
        (lambda h, w, t: logprobs.from_hidden(h, w, t.float()), TypeError, "integer"),
        (lambda h, w, t: logprobs.from_hidden(h, w, t + 100), ValueError, r"\[0, 50\)"),
        (lambda h, w, t: logprobs.from_hidden(h, w, t, temperature=0.0), ValueError, "temperature"),
        (lambda h, w, t: logprobs.from_hidden(h, w, t, chunk_size=0), ValueError, "chunk_size"),
        (lambda h, w, t: logprobs.from_hidden(h, w, t, bias=torch.zeros(3, dtype=F64)), ValueError, "bias"),
        (lambda h, w, t: logprobs.from_logits(h @ w.T, t[:3]), ValueError, "tokens has shape"),
        (lambda h, w, t: logprobs.from_hidden(h.long(), w, t), TypeError, "hidden"),
    ],
)
def test_errors(call, exc, match):
    hidden, weight, _, tokens = _problem(bias=False)
    with pytest.raises(exc, match=match):
        call(hidden.detach(), weight.detach(), tokens)


@pytest.mark.parametrize("entropy", [False, True])
def test_minus_inf_logits_in_a_whole_block(entropy):
    """A vocabulary block that is −inf for every row (a masked-out range of the vocabulary) stays finite."""
    hidden, weight, b, _ = _problem(n=6, v=12, bias=True)
    b = b.detach().clone()
    b[:5] = float("-inf")
    b.requires_grad_(True)
    tokens = torch.tensor([6, 7, 8, 9, 10, 11])
    kw = dict(chunk_size=4, vocab_chunk_size=5, return_entropy=entropy)
    got = logprobs.from_hidden(hidden, weight, tokens, bias=b, **kw)
    want = _naive(hidden, weight, b, tokens, 1.0, entropy)
    got, want = (got, want) if entropy else ((got,), (want,))
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    g_got = torch.autograd.grad(sum(x.sum() for x in got), (hidden, weight))
    g_want = torch.autograd.grad(sum(torch.nan_to_num(y).sum() for y in want), (hidden, weight))
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10)
