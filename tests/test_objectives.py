"""rpg.objectives: the 8 RPG losses have exactly the gradient of their objective (exact oracle).

Off-policy (θ ≠ θ_old), with π_ref = π_old and π_ref ≠ π_old, float64, 1e-10. The
unnormalized-measure problems are the ones where fkl ≠ ufkl and rkl ≠ urkl.
"""

import pytest
import torch

import rpg
from rpg import objectives
from rpg import testing as T

from . import reference
from .conftest import ALL_LOSSES, F64, make_batch

BETA = 0.7  # large, so that a wrong KL gradient is far above 1e-10
WIDE = rpg.Clip(low=0.99, high=1e3, dual=1e4)  # a band no ratio below reaches


def _problem(seed, normalized):
    p = T.random_problem(k=7, seed=seed, scale=0.6)
    if not normalized:  # unnormalized measures: shift the masses apart
        p = T.Problem(p.logits - 0.3, p.old_logits + 0.2, p.ref_logits - 0.5, p.rewards)
    return p


@pytest.mark.parametrize("div,style", ALL_LOSSES)
@pytest.mark.parametrize("clip", [None, WIDE], ids=["noclip", "wideclip"])
@pytest.mark.parametrize("separate_ref", [False, True], ids=["ref=old", "ref!=old"])
@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "unnormalized"])
@pytest.mark.parametrize("seed", [0, 1])
def test_expected_gradient_is_exact(div, style, clip, separate_ref, normalized, seed):
    p = _problem(seed, normalized)
    ref = p.ref_logits if separate_ref else p.old_logits
    loss_fn = rpg.RPGLoss(div, style=style, beta=BETA, clip=clip)
    got = T.expected_gradient(
        loss_fn, p.logits, p.old_logits, p.rewards, ref_logits=ref if separate_ref else None, normalized=normalized
    )
    want = -T.objective_gradient(div, p.logits, ref, p.rewards, BETA, normalized=normalized)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    if clip is not None:
        w = (T.log_policy(p.logits, normalized) - T.log_policy(p.old_logits, normalized)).exp()
        assert (w > 0.01).all() and (w < 1e3).all()  # the band really never binds


@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "unnormalized"])
def test_the_oracle_separates_the_divergences(normalized):
    """Each loss is *not* exact for the other directions: the test above can fail."""
    p = _problem(3, normalized)
    grads = {
        d: -T.objective_gradient(d, p.logits, p.ref_logits, p.rewards, BETA, normalized=normalized)
        for d in rpg.DIVERGENCES
    }
    assert (grads["fkl"] - grads["rkl"]).abs().max() > 1e-2
    if normalized:  # mass terms vanish: the normalized and unnormalized objectives coincide
        torch.testing.assert_close(grads["fkl"], grads["ufkl"], rtol=0, atol=1e-12)
    else:
        assert (grads["fkl"] - grads["ufkl"]).abs().max() > 1e-2
        assert (grads["rkl"] - grads["urkl"]).abs().max() > 1e-2
    for div in rpg.DIVERGENCES:
        got = T.expected_gradient(
            rpg.RPGLoss(div, beta=BETA, clip=None),
            p.logits,
            p.old_logits,
            p.rewards,
            ref_logits=p.ref_logits,
            normalized=normalized,
        )
        for other in rpg.DIVERGENCES:
            if (got - grads[other]).abs().max() < 1e-10:
                assert (normalized and other[-3:] == div[-3:]) or other == div


@pytest.mark.parametrize("div", rpg.DIVERGENCES)
def test_fold_kl_exact_only_where_allowed(div):
    """Algorithm 1's folded Â = g/w: exact in expectation for rkl/urkl; fkl/ufkl are refused (biased).

    Exactness needs E_old[w·∇logp] = ∇Σπ_θ = 0, i.e. a normalized policy (every LM token
    distribution is): on unnormalized measures folded urkl follows rkl instead.
    """
    p = _problem(4, normalized=True)
    want = -T.objective_gradient(div, p.logits, p.ref_logits, p.rewards, BETA)
    if div in ("fkl", "ufkl"):
        with pytest.raises(ValueError, match="biased"):
            rpg.RPGLoss(div, beta=BETA, clip=WIDE, fold_kl=True)
        # Folding would give −w·Â with Â = g/w differentiable: for fkl −w·A − β·c, for ufkl
        # −w·A + β(w − c); on a normalized policy both have the β = 0 expected gradient —
        # the KL gradient β·E_old[c·∇logp] is lost.
        folded = T.expected_gradient(rpg.RPGLoss(div, beta=0.0, clip=None), p.logits, p.old_logits, p.rewards)
        assert (folded - want).abs().max() > 1e-2
        return
    loss_fn = rpg.RPGLoss(div, beta=BETA, clip=WIDE, fold_kl=True)
    got = T.expected_gradient(loss_fn, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_surrogate_values_by_hand():
    """docs/objectives.md table at one token: log w = 0.3, log c = -0.2 (log ρ = 0.5), logp = -1, A = 2, β = 0.5."""
    logp = torch.tensor([-1.0], dtype=F64)
    old, ref = logp - 0.3, logp - 0.5
    A, beta = torch.tensor([2.0], dtype=F64), 0.5
    w, c, lr = torch.tensor(0.3, dtype=F64).exp(), torch.tensor(-0.2, dtype=F64).exp(), 0.5
    rho = torch.tensor(lr, dtype=F64).exp()
    want = {
        "fkl": (-w * 2 - beta * c * -1.0, -w * 2 - beta * c),
        "rkl": (-w * 2 + beta * w * lr, -w * 2 + beta * w * (lr + 1)),
        "ufkl": (-w * 2 + beta * c * (rho - 1 - lr), -w * 2 + beta * (w - c)),
        "urkl": (-w * 2 + beta * w * (1 / rho - 1 + lr), -w * 2 + beta * w * lr),
    }
    for div, (v, g) in want.items():
        got_v, got_g = objectives.surrogate(div, logp, old, A, beta=beta, ref_logp=ref)
        torch.testing.assert_close(got_v, v.reshape(1), rtol=0, atol=1e-14)
        torch.testing.assert_close(got_g, g.reshape(1), rtol=0, atol=1e-14)
        g_rf = objectives.reinforce_weight(div, logp, old, A, beta=beta, ref_logp=ref)
        torch.testing.assert_close(g_rf, -g.reshape(1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("div", objectives.KL_TERMS)
def test_kl_term_value_and_derivative_match_the_formula_under_autograd(div):
    logp, old, _, _, ref = make_batch(3, 5, seed=9, spread=1.5)
    with torch.no_grad():
        value, grad = objectives.kl_term(div, logp, old, ref)
    if div in rpg.DIVERGENCES:
        want = reference.kl_surrogate(div, logp, old, ref)
    else:
        want = {"k1": rpg.k1, "k2": rpg.k2, "k3": rpg.k3}[div](logp, ref)
    (auto,) = torch.autograd.grad(want.sum(), logp)
    torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, auto, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("div", ["ufkl", "urkl"])
@pytest.mark.parametrize(
    "log_rho,log_c", [(1e-7, 0.0), (-1e-7, 0.0), (0.5, 0.0), (5.0, -2.0), (-5.0, 2.0), (90.0, -45.0), (-90.0, 45.0)]
)
def test_unnormalized_kl_values_are_accurate_and_finite(div, log_rho, log_c):
    """float32: absolute error a few ulps of the scale·|log ρ|; no overflow of ρ when w and c are finite."""
    log_c = torch.tensor([log_c])
    log_w = log_c + log_rho
    logp = torch.tensor([-1.0])
    value, _ = objectives.kl_term(div, logp, logp - log_w, logp - log_w + log_c)
    lr = torch.tensor(log_rho, dtype=F64)
    scale = (log_c if div == "ufkl" else log_w).double().exp()
    exact = scale * ((torch.expm1(lr) - lr) if div == "ufkl" else (torch.expm1(-lr) + lr))
    assert torch.isfinite(value).all()
    tol = 1e-6 * (scale * lr.abs()).item()
    torch.testing.assert_close(value.double(), exact.reshape(1), rtol=1e-5, atol=tol)


def test_unknown_divergence():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="valid options"):
        objectives.kl_term("kl", x, x)


@pytest.mark.parametrize("div", objectives.KL_TERMS)
def test_kl_grad_split_recombines_to_the_derivative(div):
    logp, old, _, _, ref = make_batch(3, 5, seed=10, spread=1.0)
    logp = logp.detach()
    log_w = logp - old
    per_w, const = objectives.REGISTRY[div].split(objectives.Ratios(logp, old, ref))
    _, grad = objectives.kl_term(div, logp, old, ref)
    torch.testing.assert_close(log_w.exp() * per_w + const, grad, rtol=1e-14, atol=1e-14)
