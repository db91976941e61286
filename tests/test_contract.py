"""Independent black-box contract tests for `rpg.RPGLoss` (docs/design.md: notation, the call; docs/objectives.md, docs/clipping.md).

Only the public call contract (docs/design.md, “The call”) is used.  Every expected value is
computed here from hand-written formulas or an exact tabular oracle.
"""

import contextlib
import math

import pytest
import torch

import rpg

from .conftest import shift_to_logprobs


@pytest.fixture(autouse=True)
def _float64_default():
    """float64 by default inside this module only (a module-level switch would leak into other test files)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


DIVS = ["fkl", "rkl", "ufkl", "urkl"]
STYLES = ["differentiable", "reinforce"]
AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
BETA = 0.5


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ---------------------------------------------------------------- hand formulas (docs/objectives.md)
def parts(logp, old, ref):
    logw = logp - old
    logrho = logp - ref
    return logw.exp(), logrho, logrho.exp(), (ref - old).exp()


def g_formula(div, logp, old, ref, A, beta):
    """g = -dl/dlogp of the §3 table."""
    w, logrho, _rho, c = parts(logp, old, ref)
    return {
        "fkl": w * A + beta * c,
        "rkl": w * (A - beta * (logrho + 1)),
        "ufkl": w * A - beta * (w - c),
        "urkl": w * (A - beta * logrho),
    }[div]


def diff_value(div, logp, old, ref, A, beta):
    """Per-token loss of the differentiable style (§3 table)."""
    w, logrho, rho, c = parts(logp, old, ref)
    return {
        "fkl": -w * A - beta * c * logp,
        "rkl": -w * A + beta * w * logrho,
        "ufkl": -w * A + beta * c * (rho - 1 - logrho),
        "urkl": -w * A + beta * w * (1 / rho - 1 + logrho),
    }[div]


def kl_adv(div, logp, old, ref, beta):
    """A' - A = g/w - A (independent of A)."""
    w = (logp - old).exp()
    return g_formula(div, logp, old, ref, torch.zeros_like(logp), beta) / w


# ---------------------------------------------------------------- tabular oracle (docs/objectives.md, docs/design.md “Testing”)
def oracle_grads(div, style, clip, normalized, ref_differs, beta=BETA, seed=0):
    gen = torch.Generator().manual_seed(seed)
    K = 5
    theta0 = torch.randn(K, generator=gen)
    theta_old = theta0 + 0.4 * torch.randn(K, generator=gen)
    theta_ref = theta_old + 0.6 * torch.randn(K, generator=gen) if ref_differs else theta_old
    R = torch.randn(K, generator=gen)
    logpi = (lambda t: torch.log_softmax(t, 0)) if normalized else (lambda t: t)
    lold, lref = logpi(theta_old), logpi(theta_ref)

    # surrogate: sum_a pi_old(a) * grad per_token(a); the batch holds every action once
    theta = theta0.clone().requires_grad_(True)
    lp = logpi(theta)
    fn = rpg.RPGLoss(div, style=style, beta=beta, clip=clip, agg="token-sum")
    with contextlib.nullcontext() if normalized else rpg.unnormalized_policies():  # log π(a) = θ_a may exceed 0
        out = fn(
            lp[:, None], lold[:, None], R.clone(), torch.ones(K, 1), ref_logp=lref[:, None] if ref_differs else None
        )
    w = (lp - lold).exp().detach()
    surrogate = (lold.exp()[:, None] * out.per_token).sum()
    (g_sur,) = torch.autograd.grad(surrogate, theta)

    # exact objective J = E_pi[R] - beta * D
    theta2 = theta0.clone().requires_grad_(True)
    l2 = logpi(theta2)
    p, q = l2.exp(), lref.exp()
    fkl = (q * (lref - l2)).sum()
    rkl = (p * (l2 - lref)).sum()
    D = {"fkl": fkl, "rkl": rkl, "ufkl": fkl + (p - q).sum(), "urkl": rkl + (q - p).sum()}[div]
    J = (p * R).sum() - beta * D
    (g_J,) = torch.autograd.grad(J, theta2)
    return g_sur, -g_J, w


WIDE = dict(low=0.99, high=100.0, dual=1000.0)


@pytest.mark.parametrize("normalized", [True, False], ids=["softmax", "unnormalized"])
@pytest.mark.parametrize("ref_differs", [True, False], ids=["ref!=old", "ref=old"])
@pytest.mark.parametrize("clipped", [False, True], ids=["noclip", "wideclip"])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("div", DIVS)
def test_tabular_oracle_exact_gradient(div, style, clipped, ref_differs, normalized):
    clip = rpg.Clip(**WIDE) if clipped else None
    g_sur, g_true, w = oracle_grads(div, style, clip, normalized, ref_differs)
    if clipped:  # the band must never bind in this setup
        assert (w > 1 - WIDE["low"] + 0.05).all() and (w < 1 + WIDE["high"] - 1).all()
    close(g_sur, g_true)


def test_oracle_setup_discriminates_divergences():
    """Sanity of the oracle itself: the 4 true gradients differ (else test 1 could not fail)."""
    for normalized, pairs in [(True, [("fkl", "rkl")]), (False, [("fkl", "ufkl"), ("rkl", "urkl"), ("fkl", "rkl")])]:
        for a, b in pairs:
            ga = oracle_grads(a, "differentiable", None, normalized, True)[1]
            gb = oracle_grads(b, "differentiable", None, normalized, True)[1]
            assert (ga - gb).abs().max() > 1e-2, (normalized, a, b)


# ---------------------------------------------------------------- per-token values (§3)
def random_batch(B=4, T=6, seed=1, ref_differs=True):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen) * 3 - 0.05
    logp = old + 0.5 * torch.randn(B, T, generator=gen)
    ref = old + 0.7 * torch.randn(B, T, generator=gen) if ref_differs else old.clone()
    A = torch.randn(B, T, generator=gen)
    old, logp, ref = shift_to_logprobs(old, logp, ref)
    return logp, old, ref, A


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("div", DIVS)
def test_per_token_values_and_grads(div, style):
    logp0, old, ref, A = random_batch()
    logp = logp0.clone().requires_grad_(True)
    mask = torch.ones_like(old)
    out = rpg.RPGLoss(div, style=style, beta=BETA, clip=None, agg="token-sum")(logp, old, A, mask, ref_logp=ref)
    g = g_formula(div, logp0, old, ref, A, BETA)
    expected = diff_value(div, logp0, old, ref, A, BETA) if style == "differentiable" else -g * logp0
    close(out.per_token.detach(), expected)
    (grad,) = torch.autograd.grad(out.per_token.sum(), logp)
    close(grad, -g)
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    close(out.loss.detach(), expected.sum())
    assert isinstance(out.metrics, dict)


@pytest.mark.parametrize("div", DIVS)
def test_ref_defaults_to_old_and_adv_broadcast(div):
    logp, old, _, _ = random_batch(seed=3)
    A1 = torch.randn(logp.shape[0], generator=torch.Generator().manual_seed(5))
    fn = rpg.RPGLoss(div, style="differentiable", beta=BETA, clip=None, agg="token-mean")
    m = torch.ones_like(old)
    a = fn(logp, old, A1, m).per_token
    b = fn(logp, old, A1[:, None].expand_as(old).clone(), m, ref_logp=old.clone()).per_token
    close(a, b)
    close(a, diff_value(div, logp, old, old, A1[:, None].expand_as(old), BETA))


# ---------------------------------------------------------------- clipping (§4)
CLIP = dict(low=0.2, high=0.28, dual=3.0)
W_GRID = [0.5, 0.6, 0.9, 1.1, 1.6, 2.0, 4.0]  # none near 0.8, 1.28, 3.0


def clip_tokens(div, mismatch):
    """Tokens (1 x T) with chosen w, c, and chosen sign of A' = g/w."""
    logc = 1.0 if div == "fkl" else -1.5
    rows = [(w, s) for w in W_GRID for s in (+0.7, -0.7)]
    T = len(rows) + (2 if mismatch else 0)
    old = -1.5 - 0.1 * torch.arange(T, dtype=torch.float64)  # low enough that logp and ref are log-probs (<= 0)
    logw = torch.tensor([math.log(w) for w, _ in rows] + [math.log(0.6), math.log(1.6)][: T - len(rows)])
    logp = old + logw
    ref = old + logc
    ka = kl_adv(div, logp, old, ref, BETA)
    target = torch.tensor([s for _, s in rows] + [0.2 * float(torch.sign(ka[i])) for i in range(len(rows), T)])
    A = target - ka  # so that A' = target exactly
    if mismatch:
        for i in range(len(rows), T):  # sign(A) != sign(A'), caused by the KL part
            assert ka[i].abs() > 0.3 and torch.sign(A[i]) != torch.sign(target[i])
    return logp[None], old[None], ref[None], A[None], target[None]


@pytest.mark.parametrize("div", DIVS)
def test_rpg_style_clip_reinforce_gradient(div):
    logp0, old, ref, A, Ap = clip_tokens(div, mismatch=True)
    logp = logp0.clone().requires_grad_(True)
    out = rpg.RPGLoss(div, style="reinforce", beta=BETA, clip=rpg.Clip(**CLIP), agg="token-sum")(
        logp, old, A, torch.ones_like(old), ref_logp=ref
    )
    (grad,) = torch.autograd.grad(out.per_token.sum(), logp, retain_graph=True)
    w = (logp0 - old).exp()
    g = g_formula(div, logp0, old, ref, A, BETA)
    close(g / w, Ap)
    keep = torch.where(Ap >= 0, w < 1 + CLIP["high"], (w > 1 - CLIP["low"]) & (w < CLIP["dual"]))
    # every branch is exercised
    for branch in [
        (Ap >= 0) & keep,
        (Ap >= 0) & ~keep,
        (Ap < 0) & keep,
        (Ap < 0) & (w < 1 - CLIP["low"]),
        (Ap < 0) & (w > CLIP["dual"]),
    ]:
        assert branch.any()
    close(grad, torch.where(keep, -g, torch.zeros_like(g)))
    (grad2,) = torch.autograd.grad(out.loss, logp)
    close(grad2, grad)


@pytest.mark.parametrize("div", DIVS)
def test_rpg_style_clip_reinforce_value_kept(div):
    """'Otherwise its gradient is 0 (value kept, detached)': value stays -g*logp everywhere."""
    logp, old, ref, A, _ = clip_tokens(div, mismatch=True)
    out = rpg.RPGLoss(div, style="reinforce", beta=BETA, clip=rpg.Clip(**CLIP), agg="token-sum")(
        logp, old, A, torch.ones_like(old), ref_logp=ref
    )
    close(out.per_token.detach(), -g_formula(div, logp, old, ref, A, BETA) * logp)


@pytest.mark.parametrize("dual", [3.0, None])
@pytest.mark.parametrize("div", DIVS)
def test_ppo_dual_clip_differentiable(div, dual):
    logp0, old, ref, _, _ = clip_tokens(div, mismatch=False)
    T = logp0.shape[1]
    A = torch.tensor([0.7 if i % 2 == 0 else -0.7 for i in range(T)])[None]
    logp = logp0.clone().requires_grad_(True)
    clip = rpg.Clip(low=CLIP["low"], high=CLIP["high"], dual=dual)
    out = rpg.RPGLoss(div, style="differentiable", beta=BETA, clip=clip, agg="token-sum")(
        logp, old, A, torch.ones_like(old), ref_logp=ref
    )
    (grad,) = torch.autograd.grad(out.per_token.sum(), logp)
    w = (logp0 - old).exp()
    dmax = dual if dual is not None else math.inf
    keep = torch.where(A >= 0, w < 1 + CLIP["high"], (w > 1 - CLIP["low"]) & (w < dmax))
    g = g_formula(div, logp0, old, ref, A, BETA)
    kl_grad = -(g - w * A)  # KL surrogate stays outside the clip
    close(grad, torch.where(keep, -w * A, torch.zeros_like(w)) + kl_grad)
    pg = torch.maximum(-w * A, -w.clamp(1 - CLIP["low"], 1 + CLIP["high"]) * A)
    if dual is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -dual * A), pg)
    kl_val = diff_value(div, logp0, old, ref, A, BETA) + w * A
    close(out.per_token.detach(), pg + kl_val)


# ---------------------------------------------------------------- aggregation (§6)
def masked_batch(seed=7, B=6, T=7):
    logp, old, ref, A = random_batch(B=B, T=T, seed=seed)
    lengths = torch.tensor([7, 2, 5, 1, 6, 3])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    return logp, old, ref, A, mask


CONFIGS = [
    ("urkl", "reinforce", rpg.Clip(**CLIP)),
    ("fkl", "differentiable", None),
    ("rkl", "differentiable", rpg.Clip(**CLIP)),
]


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("agg", AGGS)
def test_microbatch_invariance(agg, cfg):
    div, style, clip = CONFIGS[cfg]
    logp0, old, ref, A, mask = masked_batch()
    fn = rpg.RPGLoss(div, style=style, beta=BETA, clip=clip, agg=agg)
    ntok, nseq = int(mask.sum()), mask.shape[0]
    logp = logp0.clone().requires_grad_(True)
    full = fn(logp, old, A, mask, ref_logp=ref).loss
    (g_full,) = torch.autograd.grad(full, logp)
    full2 = fn(logp, old, A, mask, ref_logp=ref, batch_num_tokens=ntok, global_batch_size=nseq).loss
    close(full2, full, 1e-12)
    logp = logp0.clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 2), slice(2, 6)):
        total = (
            total
            + fn(
                logp[sl], old[sl], A[sl], mask[sl], ref_logp=ref[sl], batch_num_tokens=ntok, global_batch_size=nseq
            ).loss
        )
    (g_shard,) = torch.autograd.grad(total, logp)
    close(total, full, 1e-12)
    close(g_shard, g_full, 1e-12)


@pytest.mark.parametrize("agg", AGGS[:4])
def test_aggregation_values(agg):
    logp, old, ref, A, mask = masked_batch(seed=11)
    out = rpg.RPGLoss("rkl", style="differentiable", beta=BETA, clip=None, agg=agg)(logp, old, A, mask, ref_logp=ref)
    pt = out.per_token.detach()
    assert (pt[mask == 0] == 0).all()
    close(pt[mask == 1], diff_value("rkl", logp, old, ref, A, BETA)[mask == 1])
    expected = {
        "token-mean": pt.sum() / mask.sum(),
        "token-sum": pt.sum(),
        "seq-mean-token-mean": (pt.sum(1) / mask.sum(1)).mean(),
        "seq-mean-token-sum": pt.sum(1).mean(),
    }[agg]
    close(out.loss.detach(), expected)


# ---------------------------------------------------------------- masking (§6)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("div", DIVS)
def test_nan_inf_at_masked_positions(div, style, agg):
    logp0, old, ref, A, mask = masked_batch(seed=13)
    mask[3] = 0  # one fully masked sequence as well
    bad = mask == 0
    poison = torch.tensor([math.nan, math.inf, -math.inf]).repeat(100)[: int(bad.sum())]
    logp0, old, ref, A = (x.clone() for x in (logp0, old, ref, A))
    for i, x in enumerate((logp0, old, ref, A)):
        x[bad] = poison.roll(i)
    logp = logp0.requires_grad_(True)
    fn = rpg.RPGLoss(div, style=style, beta=BETA, clip=rpg.Clip(**CLIP), agg=agg)
    out = fn(logp, old, A, mask.bool(), ref_logp=ref)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.per_token).all() and (out.per_token.detach()[bad] == 0).all()
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(grad).all()
    assert (grad[bad] == 0).all()
    assert (grad[~bad] != 0).any()
    # per-sequence advantages [B], NaN for the fully masked row
    A1 = torch.randn(6, generator=torch.Generator().manual_seed(2))
    A1[3] = math.nan
    out = fn(logp, old, A1, mask, ref_logp=ref)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and (grad[bad] == 0).all()


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("style", STYLES)
def test_all_masked_batch(style, agg):
    logp0, old, ref, A = random_batch(seed=17)
    logp = logp0.clone().requires_grad_(True)
    mask = torch.zeros_like(old)
    out = rpg.RPGLoss("urkl", style=style, beta=BETA, clip=rpg.Clip(**CLIP), agg=agg)(logp, old, A, mask, ref_logp=ref)
    assert out.loss.item() == 0.0
    (grad,) = torch.autograd.grad(out.loss, logp, allow_unused=True)
    assert grad is None or (grad == 0).all()


# ---------------------------------------------------------------- validation (§4, §6)
ERR = (ValueError, TypeError)


@pytest.mark.parametrize("kwargs", [dict(divergence="kl"), dict(style="ppo"), dict(agg="mean"), dict(beta=-0.1)])
def test_bad_constructor_args(kwargs):
    args = dict(divergence="rkl", style="reinforce", beta=0.1, clip=None, agg="token-mean")
    args.update(kwargs)
    div = args.pop("divergence")
    with pytest.raises(ERR):
        rpg.RPGLoss(div, **args)


@pytest.mark.parametrize(
    "clip_kwargs",
    [
        dict(low=1.0, high=0.28, dual=3.0),
        dict(low=-0.1, high=0.28, dual=3.0),
        dict(low=0.2, high=-0.1, dual=3.0),
        dict(low=0.2, high=0.28, dual=1.0),
    ],
)
def test_bad_clip(clip_kwargs):
    with pytest.raises(ERR):
        clip = rpg.Clip(**clip_kwargs)
        rpg.RPGLoss("rkl", style="reinforce", beta=0.1, clip=clip, agg="token-mean")


def test_good_clip_accepted():
    for kw in [dict(low=0.0, high=0.0, dual=1.5), dict(low=0.2, high=0.28, dual=None)]:
        rpg.RPGLoss("rkl", style="reinforce", beta=0.0, clip=rpg.Clip(**kw), agg="token-mean")


@pytest.mark.parametrize("case", ["old_shape", "adv_BT1", "adv_Bplus1", "int_logp"])
def test_bad_call_inputs(case):
    B, T = 3, 4
    logp, old, A, mask = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B), torch.ones(B, T)
    if case == "old_shape":
        old = torch.zeros(B, T + 1)
    elif case == "adv_BT1":
        A = torch.zeros(B, T, 1)
    elif case == "adv_Bplus1":
        A = torch.zeros(B + 1)
    else:
        logp = torch.zeros(B, T, dtype=torch.long)
    fn = rpg.RPGLoss("rkl", style="differentiable", beta=0.1, clip=None, agg="token-mean")
    fn(torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B), mask)  # the valid call works
    with pytest.raises(ERR):
        fn(logp, old, A, mask)
