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
    for x, y in zip(got, want, strict=False):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(x.shape, generator=g, dtype=F64) for x in got]
    params = [hidden, weight] + ([b] if bias else [])
    g_got = torch.autograd.grad(sum((u * x).sum() for u, x in zip(upstream, got, strict=False)), params)
    g_want = torch.autograd.grad(sum((u * x).sum() for u, x in zip(upstream, want, strict=False)), params)
    for x, y in zip(g_got, g_want, strict=False):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


def test_entropy_only_gradient():
    hidden, weight, b, tokens = _problem()
    _, ent = logprobs.from_hidden(
        hidden, weight, tokens, bias=b, chunk_size=8, vocab_chunk_size=16, return_entropy=True
    )
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
    assert ent.item() == pytest.approx(
        -(0.5 * torch.log(torch.tensor(0.5)) + 0.5 * torch.log(torch.tensor(0.25))).item()
    )


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
    for x, y in zip(got, want, strict=False):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    g_got = torch.autograd.grad(sum(x.sum() for x in got), (hidden, weight))
    g_want = torch.autograd.grad(sum(torch.nan_to_num(y).sum() for y in want), (hidden, weight))
    for x, y in zip(g_got, g_want, strict=False):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


# ---- ignore_index, number types ----

import numpy as np  # noqa: E402

IGNORE_CHUNKS = [(1024, 8192), (3, 4), (1, 50)]


def _with_ignored(n=13, v=50, seed=3):
    hidden, weight, b, tokens = _problem(n=n, v=v, seed=seed)
    tokens = tokens.clone()
    ignored = torch.zeros(n, dtype=torch.bool)
    ignored[[0, 5, 6, n - 1]] = True
    tokens[ignored] = -100
    return hidden, weight, b, tokens, ignored


@pytest.mark.parametrize("chunks", IGNORE_CHUNKS)
def test_ignore_index_positions_give_zero_and_no_gradient(chunks):
    hidden, weight, b, tokens, ignored = _with_ignored()
    hidden = hidden.detach().clone()
    hidden[ignored] = float("nan")  # e.g. fully masked attention rows: must not reach any gradient
    hidden.requires_grad_(True)
    logp, ent = logprobs.from_hidden(
        hidden,
        weight,
        tokens,
        bias=b,
        temperature=0.8,
        chunk_size=chunks[0],
        vocab_chunk_size=chunks[1],
        return_entropy=True,
        ignore_index=-100,
    )
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    # the other positions: exactly what the kept rows alone give
    keep = ~ignored
    want_lp, want_ent = _naive(hidden[keep], weight, b, tokens[keep], 0.8, True)
    torch.testing.assert_close(logp[keep], want_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent[keep], want_ent, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(2)
    u1, u2 = torch.randn(logp.shape, generator=g, dtype=F64), torch.randn(logp.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((u1 * logp + u2 * ent).sum(), (hidden, weight, b))
    want = torch.autograd.grad((u1[keep] * want_lp + u2[keep] * want_ent).sum(), (hidden, weight, b))
    assert (got[0][ignored] == 0).all()
    for x, y in zip(got, want, strict=False):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, torch.where(torch.isnan(y), 0, y), rtol=0, atol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_from_logits_ignore_index_positions_give_zero_and_no_gradient(dtype, temperature):
    hidden, weight, b, tokens, ignored = _with_ignored()
    logits = (hidden @ weight.T + b).detach().to(dtype)
    logits[ignored] = float("nan")
    logits[ignored.nonzero()[0]] = float("-inf")  # an all −inf row: logsumexp −inf, still no NaN
    logits.requires_grad_(True)
    logp, ent = logprobs.from_logits(logits, tokens, temperature=temperature, return_entropy=True, ignore_index=-100)
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    keep = ~ignored
    want_lp, want_ent = logprobs.from_logits(logits[keep], tokens[keep], temperature=temperature, return_entropy=True)
    torch.testing.assert_close(logp[keep], want_lp, rtol=0, atol=0)
    torch.testing.assert_close(ent[keep], want_ent, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), logits)
    (want,) = torch.autograd.grad(want_lp.sum() + want_ent.sum(), logits)
    assert torch.isfinite(grad).all() and (grad[ignored] == 0).all()
    torch.testing.assert_close(grad, torch.where(torch.isnan(want), 0, want), rtol=0, atol=0)
    assert torch.isnan(logits[ignored][1:]).all()  # the caller's logits are not modified (masking works on a copy)


@pytest.mark.parametrize("ignore_index", [0, 7, np.int64(7), torch.tensor(7)])
def test_ignore_index_may_be_a_valid_id(ignore_index):
    """A padding id inside the vocabulary is ignored too (the positions where tokens equals it)."""
    hidden, weight, b, tokens = _problem(n=9, v=20, seed=4)
    tokens = tokens.clone()
    tokens[[1, 3]] = int(ignore_index)
    for fn in (
        lambda **kw: logprobs.from_hidden(hidden, weight, tokens, bias=b, chunk_size=4, vocab_chunk_size=6, **kw),
        lambda **kw: logprobs.from_logits(hidden @ weight.T + b, tokens, **kw),
    ):
        got = fn(ignore_index=ignore_index)
        full = fn()
        ignored = tokens == int(ignore_index)
        assert (got[ignored] == 0).all() and (full[ignored] != 0).all()
        torch.testing.assert_close(got[~ignored], full[~ignored], rtol=0, atol=0)


def test_minus_100_without_ignore_index_is_refused_with_a_hint():
    hidden, weight, _, tokens, _ = _with_ignored()
    for call in (
        lambda: logprobs.from_hidden(hidden, weight, tokens),
        lambda: logprobs.from_logits(hidden @ weight.T, tokens),
    ):
        with pytest.raises(ValueError, match=r"\[0, 50\).*ignore_index="):
            call()
    bad = tokens.clone()
    bad[2] = 50  # out of range and not the ignore index: still refused
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        logprobs.from_hidden(hidden, weight, bad, ignore_index=-100)


def test_ignore_index_under_no_grad_and_bf16():
    hidden, weight, _b, tokens, ignored = _with_ignored()
    with torch.no_grad():
        logp = logprobs.from_hidden(
            hidden.bfloat16(), weight.bfloat16(), tokens, chunk_size=4, vocab_chunk_size=7, ignore_index=-100
        )
    assert logp.dtype == torch.float32 and (logp[ignored] == 0).all() and torch.isfinite(logp).all()
    want = _naive(hidden.bfloat16().float(), weight.bfloat16().float(), None, tokens.clamp(min=0), 1.0, False)
    torch.testing.assert_close(logp[~ignored], want[~ignored], rtol=1e-5, atol=1e-5)


def test_numpy_and_tensor_scalars_are_numbers():
    hidden, weight, b, tokens = _problem(seed=5)
    want = logprobs.from_hidden(hidden, weight, tokens, bias=b, temperature=0.5, chunk_size=5, vocab_chunk_size=9)
    for t, c, vc in [
        (np.float32(0.5), np.int64(5), np.int32(9)),
        (torch.tensor(0.5), torch.tensor(5), torch.tensor([9])),
        (np.float64(0.5), 5, np.int16(9)),
    ]:
        got = logprobs.from_hidden(hidden, weight, tokens, bias=b, temperature=t, chunk_size=c, vocab_chunk_size=vc)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(
            logprobs.from_logits(hidden @ weight.T + b, tokens, temperature=t),
            _naive(hidden, weight, b, tokens, 0.5, False),
            rtol=0,
            atol=1e-12,
        )


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(temperature=True), TypeError, "temperature must be a real number"),
        (dict(temperature="1"), TypeError, "temperature must be a real number"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a positive finite"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a positive finite"),
        (dict(temperature=-1.0), ValueError, "temperature must be a positive finite"),
        (dict(chunk_size=True), TypeError, "chunk_size must be an integer"),
        (dict(chunk_size=4.0), TypeError, "chunk_size must be an integer"),
        (dict(vocab_chunk_size=np.float64(4)), TypeError, "vocab_chunk_size must be an integer"),
        (dict(vocab_chunk_size=-2), ValueError, "vocab_chunk_size must be a positive integer"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an integer"),
        (dict(ignore_index=True), TypeError, "ignore_index must be an integer"),
    ],
)
def test_number_arguments_type_and_value_errors(kw, exc, match):
    hidden, weight, _, tokens = _problem(bias=False)
    with pytest.raises(exc, match=match):
        logprobs.from_hidden(hidden.detach(), weight.detach(), tokens, **kw)
    if "chunk" not in next(iter(kw)):
        with pytest.raises(exc, match=match):
            logprobs.from_logits(hidden.detach() @ weight.detach().T, tokens, **kw)


def test_no_grad_keeps_nothing_for_backward():
    """Under torch.no_grad the result carries no graph (so the saved blocks and statistics are freed)."""
    hidden, weight, b, tokens = _problem()
    with torch.no_grad():
        logp, ent = logprobs.from_hidden(hidden, weight, tokens, bias=b, return_entropy=True)
    assert logp.grad_fn is None and ent.grad_fn is None and not logp.requires_grad
