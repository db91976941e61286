"""rpg.logprobs.from_hidden beyond first derivatives: double backward, higher orders, torch.func, forward mode.

Every check compares with from_logits on the materialised logits (plain autograd) in float64."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import tree_leaves

from rpg import logprobs

# torch's own forward-mode decompositions are loaded with torch.jit.script on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _problem(n=7, h=4, v=11, seed=0, minus_inf_block=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) / h**0.5
    bias = 0.3 * torch.randn(v, generator=g, dtype=F64)
    if minus_inf_block:
        bias[:4] = float("-inf")  # a whole vocabulary block of −inf logits (with vocab_chunk_size=4)
    lo = 4 if minus_inf_block else 0
    tokens = torch.randint(lo, v, (n,), generator=g)
    return hidden, weight, bias, tokens


CONFIGS = {
    "one block": dict(chunk_size=1024, vocab_chunk_size=8192),
    "blocks": dict(chunk_size=3, vocab_chunk_size=4),
    "blocks, T=0.7": dict(chunk_size=2, vocab_chunk_size=5, temperature=0.7),
    "ignore_index": dict(chunk_size=3, vocab_chunk_size=4, ignore_index=-100),
    "-inf block": dict(chunk_size=3, vocab_chunk_size=4, minus_inf_block=True),
}


def _fns(tokens, cfg):
    """(chunked, materialised) as functions (hidden, weight, bias) -> (logp, entropy)."""
    cfg = dict(cfg)
    cfg.pop("minus_inf_block", None)
    temperature, ignore = cfg.pop("temperature", 1.0), cfg.pop("ignore_index", None)

    def chunked(h, w, b):
        return logprobs.from_hidden(
            h, w, tokens, bias=b, temperature=temperature, return_entropy=True, ignore_index=ignore, **cfg
        )

    def materialised(h, w, b):
        return logprobs.from_logits(
            h @ w.T + b, tokens, temperature=temperature, return_entropy=True, ignore_index=ignore
        )

    return chunked, materialised


def _setup(name):
    cfg = CONFIGS[name]
    hidden, weight, bias, tokens = _problem(minus_inf_block=cfg.get("minus_inf_block", False))
    if "ignore_index" in cfg:
        tokens[[1, 4]] = -100
    return (hidden, weight, bias), tokens, cfg


def _loss(fn, h, w, b):
    """A scalar that is nonlinear in both log-probs and entropy (so the upstream gradients depend on θ)."""
    logp, ent = fn(h, w, b)
    return (logp.sin() * ent).sum() + (logp**2).sum() + (0.3 * ent).exp().sum()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hessian_vector_product_is_exact(name):
    params, tokens, cfg = _setup(name)
    g = torch.Generator().manual_seed(9)
    vecs = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
    results = []
    for fn in _fns(tokens, cfg):
        ps = [p.clone().requires_grad_(True) for p in params]
        grads = torch.autograd.grad(_loss(fn, *ps), ps, create_graph=True)
        hvp = torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, vecs, strict=False)), ps)
        results.append(hvp)
    for got, want in zip(*results, strict=False):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL)
        assert want.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("name", ["blocks", "blocks, T=0.7", "ignore_index"])
def test_third_derivatives_are_exact(name):
    params, tokens, cfg = _setup(name)
    results = []
    for fn in _fns(tokens, cfg):
        h, w, b = [p.clone().requires_grad_(True) for p in params]
        (g1,) = torch.autograd.grad(_loss(fn, h, w, b), (h,), create_graph=True)
        (g2,) = torch.autograd.grad(g1.sin().sum(), (w,), create_graph=True)
        results.append(torch.autograd.grad((g2**2).sum(), (h, w, b)))
    for got, want in zip(*results, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert want.abs().max() > 1e-3


def test_gradgradcheck():
    (hidden, weight, bias), tokens, _ = _setup("blocks, T=0.7")
    inputs = [x.clone().requires_grad_(True) for x in (hidden[:4, :3], weight[:4, :3], bias[:4])]
    tokens4 = tokens[:4] % 4

    def f(h, w, b):
        return logprobs.from_hidden(
            h, w, tokens4, bias=b, temperature=0.7, chunk_size=3, vocab_chunk_size=3, return_entropy=True
        )

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("name", ["blocks", "ignore_index", "-inf block"])
def test_torch_func_grad_and_jacrev(name):
    params, tokens, cfg = _setup(name)
    chunked, materialised = _fns(tokens, cfg)
    for argnums in (0, 1, 2, (0, 1, 2)):
        got = torch.func.grad(lambda *p: _loss(chunked, *p), argnums=argnums)(*params)
        want = torch.func.grad(lambda *p: _loss(materialised, *p), argnums=argnums)(*params)
        for x, y in zip(tree_leaves(got), tree_leaves(want), strict=False):
            torch.testing.assert_close(x, y, **TOL)
        got = torch.func.jacrev(lambda *p: chunked(*p), argnums=argnums)(*params)
        want = torch.func.jacrev(lambda *p: materialised(*p), argnums=argnums)(*params)
        for x, y in zip(tree_leaves(got), tree_leaves(want), strict=False):
            torch.testing.assert_close(torch.nan_to_num(x), torch.nan_to_num(y), **TOL)


@pytest.mark.parametrize("name", ["blocks", "blocks, T=0.7", "ignore_index"])
def test_forward_mode_jvp_and_jacfwd(name):
    params, tokens, cfg = _setup(name)
    chunked, materialised = _fns(tokens, cfg)
    g = torch.Generator().manual_seed(4)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=F64) for p in params)
    _, got = torch.func.jvp(chunked, params, tangents)
    _, want_jvp = torch.func.jvp(materialised, params, tangents)
    for x, y in zip(got, want_jvp, strict=False):
        torch.testing.assert_close(x, y, **TOL)
    for argnums in (0, 1, 2):
        got = torch.func.jacfwd(lambda *p: chunked(*p), argnums=argnums)(*params)
        want = torch.func.jacfwd(lambda *p: materialised(*p), argnums=argnums)(*params)
        for x, y in zip(got, want, strict=False):
            torch.testing.assert_close(x, y, **TOL)
    # torch.autograd.forward_ad (dual tensors) goes through the same rule
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(params, tangents, strict=False)]
        got = [fwAD.unpack_dual(x).tangent for x in chunked(*duals)]
    for x, y in zip(got, want_jvp, strict=False):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("name", ["blocks", "blocks, T=0.7", "ignore_index"])
def test_torch_func_hessian(name):
    """jacfwd(jacrev(f)): forward mode over from_hidden's gradient."""
    params, tokens, cfg = _setup(name)
    chunked, materialised = _fns(tokens, cfg)
    for argnums in (0, 1, 2, (0, 1)):
        got = torch.func.hessian(lambda *p: _loss(chunked, *p), argnums=argnums)(*params)
        want = torch.func.hessian(lambda *p: _loss(materialised, *p), argnums=argnums)(*params)
        for x, y in zip(tree_leaves(got), tree_leaves(want), strict=False):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    got = torch.func.jacrev(torch.func.jacrev(lambda h: _loss(chunked, h, *params[1:])))(params[0])
    want = torch.func.hessian(lambda h: _loss(materialised, h, *params[1:]))(params[0])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("batched", ["hidden", "hidden+tokens", "weight", "bias", "all"])
def test_vmap(batched):
    """A shared head folds the batch into rows; a batched head takes the general rule. Both exact."""
    (hidden, weight, bias), tokens, _ = _setup("blocks")
    g = torch.Generator().manual_seed(5)
    k = 3
    hs = hidden + 0.1 * torch.randn(k, *hidden.shape, generator=g, dtype=F64)
    ws = weight + 0.1 * torch.randn(k, *weight.shape, generator=g, dtype=F64)
    bs = bias + 0.1 * torch.randn(k, *bias.shape, generator=g, dtype=F64)
    ts = torch.randint(0, weight.shape[0], (k, *tokens.shape), generator=g)
    ts[:, 2] = -100
    args = [hidden, weight, bias, tokens]
    dims = [None, None, None, None]
    for i, (name, x) in enumerate(zip(("hidden", "weight", "bias", "tokens"), (hs, ws, bs, ts), strict=False)):
        if name in batched or batched == "all":
            args[i], dims[i] = x, 0

    def chunked(h, w, b, t):
        return logprobs.from_hidden(
            h, w, t, bias=b, chunk_size=3, vocab_chunk_size=4, return_entropy=True, ignore_index=-100
        )

    def materialised(h, w, b, t):
        return logprobs.from_logits(h @ w.T + b, t, return_entropy=True, ignore_index=-100)

    got = torch.func.vmap(chunked, in_dims=tuple(dims))(*args)
    want = torch.func.vmap(materialised, in_dims=tuple(dims))(*args)
    for x, y in zip(got, want, strict=False):
        assert x.shape == (k, *tokens.shape)
        torch.testing.assert_close(x, y, **TOL)


def test_per_example_gradients():
    """vmap(grad(loss)) over examples, the head shared: one head gradient per example."""
    (hidden, weight, bias), _, _ = _setup("blocks")
    g = torch.Generator().manual_seed(6)
    hs = torch.randn(4, 5, hidden.shape[1], generator=g, dtype=F64)
    ts = torch.randint(0, weight.shape[0], (4, 5), generator=g)

    def loss(fn):
        return lambda w, b, h, t: (fn(h, w, b, t)[0] ** 2).sum()

    def chunked(h, w, b, t):
        return logprobs.from_hidden(h, w, t, bias=b, chunk_size=2, vocab_chunk_size=4, return_entropy=True)

    def materialised(h, w, b, t):
        return logprobs.from_logits(h @ w.T + b, t, return_entropy=True)

    per_example = torch.func.vmap(torch.func.grad(loss(chunked), argnums=(0, 1)), in_dims=(None, None, 0, 0))
    want_fn = torch.func.vmap(torch.func.grad(loss(materialised), argnums=(0, 1)), in_dims=(None, None, 0, 0))
    got, want = per_example(weight, bias, hs, ts), want_fn(weight, bias, hs, ts)
    for x, y in zip(got, want, strict=False):
        assert x.shape[0] == 4
        torch.testing.assert_close(x, y, **TOL)


def test_create_graph_first_order_and_unused_entropy():
    """create_graph=True for a first derivative only (e.g. a gradient penalty) works, and an entropy that is
    returned but unused gets no gradient work (its upstream gradient is None, not zeros)."""
    (hidden, weight, bias), tokens, cfg = _setup("blocks")
    chunked, materialised = _fns(tokens, cfg)
    out = []
    for fn in (chunked, materialised):
        h = hidden.clone().requires_grad_(True)
        logp, _ = fn(h, weight, bias)
        (g,) = torch.autograd.grad(logp.sum(), h, create_graph=True)
        out.append(torch.autograd.grad(g.norm(), h)[0])
    torch.testing.assert_close(out[0], out[1], **TOL)
