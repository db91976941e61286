"""Nothing silently wrong: second derivatives, −inf log-probs, overflow under a clip, stale metrics,
immutable settings, counts, numpy scalars and torch.func (the numerical guarantees in docs/design.md)."""

import dataclasses

import numpy as np
import pytest
import torch

import rpg

from . import reference
from .conftest import F64, make_batch


def _families():
    for d in rpg.DIVERGENCES:
        yield f"{d}-diff", rpg.RPGLoss(d, beta=0.5, clip=None)
        yield f"{d}-diff-clip", rpg.RPGLoss(d, beta=0.5)
        yield f"{d}-rf", rpg.RPGLoss(d, style="reinforce", beta=0.5, clip=None)
        yield f"{d}-rf-clip", rpg.RPGLoss(d, style="reinforce", beta=0.5)
        yield f"{d}-rf-trunc", rpg.RPGLoss(d, style="reinforce", beta=0.5, clip=rpg.Truncate(0.2, 0.28))
        yield f"{d}-rf-tr", rpg.RPGLoss(d, style="reinforce", beta=0.5, clip=rpg.TrustRegion())
    yield "rkl-fold", rpg.RPGLoss("rkl", beta=0.5, fold_kl=True)
    yield "urkl-fold", rpg.RPGLoss("urkl", beta=0.5, fold_kl=True)
    yield "grpo-iw", rpg.GRPOLoss(importance_weighted_kl=True)
    yield "distill", rpg.OnPolicyDistillationLoss()
    yield "cispo", rpg.CISPOLoss()
    yield "gspo", rpg.GSPOLoss()
    yield "dapo", rpg.DAPOLoss()
    yield "dppo", rpg.DPPOLoss()


FAMILIES = list(_families())


# --- second derivatives ---------------------------------------------------------------------


@pytest.mark.parametrize("div", rpg.DIVERGENCES)
def test_reinforce_style_second_derivative_is_exactly_zero(div):
    """ℓ = −sg(g)·logp is linear in logp: double backward gives 0, and that is the truth, not a default."""
    logp, old, adv, mask, ref = make_batch(3, 4, seed=1, ref=True)
    out = rpg.RPGLoss(div, style="reinforce", beta=0.3, clip=None)(logp, old, adv, mask, ref_logp=ref)
    (g,) = torch.autograd.grad(out.loss, logp, create_graph=True)
    v = torch.randn_like(logp)
    # As for any function linear in its input, the gradient is a constant of logp (no graph back to it).
    assert not g.requires_grad or torch.autograd.grad((g * v).sum(), logp, allow_unused=True)[0] is None
    hv = torch.autograd.functional.hvp(
        lambda lp: rpg.RPGLoss(div, style="reinforce", beta=0.3, clip=None)(lp, old, adv, mask, ref_logp=ref).loss,
        logp.detach(),
        v,
    )[1]
    assert torch.equal(hv, torch.zeros_like(hv))
    # ... and the same through the plain-autograd reference (the claim is about the math).
    want = reference.per_token(logp, old, adv, mask, kl=div, beta=0.3, style="reinforce", clip=None, ref_logp=ref)
    (gr,) = torch.autograd.grad(want.sum() / mask.sum(), logp, create_graph=True)
    hr = torch.autograd.grad((gr * v).sum(), logp, allow_unused=True)[0] if gr.requires_grad else None
    assert hr is None or torch.allclose(hr, torch.zeros_like(hr))


@pytest.mark.parametrize("div", rpg.DIVERGENCES)
def test_differentiable_style_second_derivative_raises_instead_of_zero(div):
    logp, old, adv, mask, ref = make_batch(3, 4, seed=1, ref=True)
    out = rpg.RPGLoss(div, beta=0.3, clip=None)(logp, old, adv, mask, ref_logp=ref)
    (g,) = torch.autograd.grad(out.loss, logp, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(g.sum(), logp)


def test_first_order_gradient_with_create_graph_is_unchanged():
    logp, old, adv, mask, ref = make_batch(3, 4, seed=2, ref=True)
    fn = rpg.RPGLoss("rkl", beta=0.3)
    (a,) = torch.autograd.grad(fn(logp, old, adv, mask, ref_logp=ref).loss, logp)
    (b,) = torch.autograd.grad(fn(logp, old, adv, mask, ref_logp=ref).loss, logp, create_graph=True)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


# --- torch.func -----------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
def test_torch_func_grad_vmap_and_jacrev(style):
    logp, old, adv, mask, ref = make_batch(3, 4, seed=3, ref=True)
    fn = rpg.RPGLoss("urkl", style=style, beta=0.2)

    def loss(lp):
        return fn(lp, old, adv, mask, ref_logp=ref).loss

    (want,) = torch.autograd.grad(loss(logp), logp)
    got = torch.func.grad(loss)(logp.detach())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    jac = torch.func.jacrev(loss)(logp.detach())
    torch.testing.assert_close(jac, want, rtol=0, atol=1e-14)
    # per-example gradients: vmap over a batch of independent logp tensors
    stacked = torch.stack([logp.detach(), logp.detach() + 0.1])
    per = torch.func.vmap(torch.func.grad(loss))(stacked)
    torch.testing.assert_close(per[0], want, rtol=0, atol=1e-14)
    shifted = (logp.detach() + 0.1).requires_grad_(True)
    (want1,) = torch.autograd.grad(loss(shifted), shifted)
    torch.testing.assert_close(per[1], want1, rtol=0, atol=1e-14)


# --- −inf log-probs and overflow ------------------------------------------------------------


@pytest.mark.parametrize("name,fn", FAMILIES, ids=[n for n, _ in FAMILIES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minus_inf_logp_gives_finite_loss_and_gradient(name, fn, dtype):
    """A token the policy cannot emit (logp = −inf, w = 0): every term takes its limit, no 0·∞ = NaN."""
    logp, old, adv, mask, ref = make_batch(3, 5, seed=4, dtype=dtype, ref=True)
    logp = logp.detach().clone()
    logp[0, 1] = -float("inf")
    logp.requires_grad_(True)
    out = fn(logp, old, adv, mask, ref_logp=ref)
    out.loss.backward()
    if name.startswith(("fkl-", "ufkl-")) and "rf-clip" not in name and "tr" not in name.split("-")[-1]:
        # −c·logp and c·(ρ − 1 − log ρ) are +∞ at π_θ = 0: an honest infinite value, never NaN.
        assert not torch.isnan(out.loss)
    else:
        assert torch.isfinite(out.loss), out.loss
    assert torch.isfinite(logp.grad).all(), logp.grad
    assert all(v == v for v in out.metrics.values()), out.metrics


def test_minus_inf_logp_takes_the_limit_values():
    """rkl: w·log ρ → 0; urkl: w·(1/ρ − 1 + log ρ) → c; their derivatives → 0."""
    old, ref = torch.tensor([[-1.0]], dtype=F64), torch.tensor([[-2.0]], dtype=F64)
    logp = torch.tensor([[-float("inf")]], dtype=F64, requires_grad=True)
    c = (ref - old).exp()
    for div, value in (("rkl", 0.0), ("urkl", c.item())):
        out = rpg.RPGLoss(div, beta=1.0, clip=None)(logp, old, torch.zeros(1, dtype=F64), ref_logp=ref)
        torch.testing.assert_close(out.per_token, torch.tensor([[value]], dtype=F64), rtol=1e-12, atol=1e-300)
        (g,) = torch.autograd.grad(out.loss, logp)
        assert g.item() == 0.0


def test_grpo_k3_at_minus_inf_is_infinite_not_nan():
    """k3 = 1/ρ − 1 + log ρ is +∞ at π_θ = 0 and its derivative 1 − 1/ρ is −∞: GRPO's penalty says so."""
    logp = torch.tensor([[-float("inf"), -1.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]], dtype=F64)
    out = rpg.GRPOLoss()(logp, old, torch.zeros(1, dtype=F64), ref_logp=old)
    assert out.loss.item() == float("inf")


@pytest.mark.parametrize("div", rpg.DIVERGENCES)
@pytest.mark.parametrize("log_w", [100.0, -100.0])
def test_float32_overflow_under_rpg_style_clip_is_finite(div, log_w):
    """|log w| ≳ 88 in float32: w overflows; a clipped token's value is taken at its bound (finite), gradient 0."""
    old = torch.tensor([[-101.0, -1.0]])  # log-probabilities (<= 0) whose log-ratio is log_w
    logp = (old + torch.tensor([[log_w, 0.0]])).requires_grad_(True)
    for adv in (1.0, -1.0):
        out = rpg.RPGLoss(div, style="reinforce", beta=0.1)(logp, old, torch.tensor([adv]))
        (g,) = torch.autograd.grad(out.loss, logp)
        assert torch.isfinite(out.per_token).all(), (div, log_w, adv, out.per_token)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_float32_overflow_under_ppo_clip_without_kl_is_finite(adv):
    old = torch.tensor([[-101.0]])  # log-probabilities (<= 0) whose log-ratio is 100
    logp = (old + 100.0).requires_grad_(True)
    out = rpg.DAPOLoss(clip=rpg.Clip(0.2, 0.28, 3.0))(logp, old, torch.tensor([adv]))
    (g,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(out.loss) and g.item() == 0.0


# --- stale metrics --------------------------------------------------------------------------


def test_metrics_of_a_reused_buffer_raise_instead_of_lying():
    logp, old, adv, mask, _ = make_batch(3, 4, seed=5)
    old = old.clone()
    out = rpg.RPGLoss("rkl", beta=0.1)(logp, old, adv, mask)
    old.add_(1.0)  # the caller reuses the buffer for the next batch
    with pytest.raises(RuntimeError, match="modified in place"):
        _ = out.metrics


def test_metrics_read_before_reuse_stay_correct():
    logp, old, adv, mask, _ = make_batch(3, 4, seed=5)
    old = old.clone()
    out = rpg.RPGLoss("rkl", beta=0.1)(logp, old, adv, mask)
    first = dict(out.metrics)
    old.add_(1.0)
    assert out.metrics == first  # computed once, cached


def test_metrics_under_inference_mode_are_snapshotted():
    logp, old, adv, mask, _ = make_batch(3, 4, seed=5)
    with torch.inference_mode():
        old_i = old.clone()
        out = rpg.RPGLoss("rkl", beta=0.1)(logp.detach(), old_i, adv, mask)
        want = dict(rpg.RPGLoss("rkl", beta=0.1)(logp.detach(), old_i.clone(), adv, mask).metrics)
        old_i.add_(1.0)
    assert out.metrics == want


# --- immutable, comparable settings ---------------------------------------------------------


@pytest.mark.parametrize("attr,value", [("beta", -5), ("clip", 0.2), ("importance_weighted_kl", True), ("agg", "x")])
def test_settings_cannot_change_after_construction(attr, value):
    fn = rpg.GRPOLoss()
    with pytest.raises(AttributeError, match="immutable"):
        setattr(fn, attr, value)
    assert fn == rpg.GRPOLoss()


def test_replace_validates_and_returns_a_new_loss():
    fn = rpg.GRPOLoss()
    assert fn.replace(beta=0.1).beta == 0.1 and fn.beta == 0.04
    with pytest.raises(ValueError, match="beta"):
        fn.replace(beta=-5)
    with pytest.raises(TypeError, match="clip"):
        fn.replace(clip=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fn.loss_config.beta = 1.0


def test_equality_and_hash_follow_the_configuration():
    assert rpg.GRPOLoss() == rpg.GRPOLoss() and hash(rpg.GRPOLoss()) == hash(rpg.GRPOLoss())
    assert rpg.GRPOLoss() != rpg.GRPOLoss(beta=0.1)
    assert rpg.GRPOLoss(importance_weighted_kl=True) != rpg.GRPOLoss()
    iw = rpg.GRPOLoss(importance_weighted_kl=True)
    assert rpg.PolicyLoss(**iw.config) == iw  # the same math, whatever the name
    assert len({rpg.RPGLoss("rkl"), rpg.RPGLoss("rkl"), rpg.RPGLoss("urkl")}) == 2
    import pickle

    assert pickle.loads(pickle.dumps(iw)) == iw


# --- counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        -5,
        float("nan"),
        float("inf"),
        torch.tensor(-5.0),
        torch.tensor(float("nan")),
        torch.tensor(float("inf")),
        np.float64(-1.0),
    ],
)
@pytest.mark.parametrize("arg", ["batch_num_tokens", "global_batch_size"])
def test_bad_counts_raise(arg, bad):
    logp, old, adv, mask, _ = make_batch(3, 4, seed=6)
    with pytest.raises(ValueError, match=arg):
        rpg.RPGLoss("rkl", agg="seq-mean-token-mean")(logp, old, adv, mask, **{arg: bad})


def test_good_counts_of_every_kind_agree():
    logp, old, adv, mask, _ = make_batch(3, 4, seed=6)
    fn = rpg.RPGLoss("rkl", beta=0.1)
    vals = [fn(logp, old, adv, mask, batch_num_tokens=n).loss for n in (24, 24.0, np.int64(24), torch.tensor(24))]
    for v in vals[1:]:
        torch.testing.assert_close(v, vals[0], rtol=0, atol=0)


def test_token_sum_norm_with_zero_width_is_zero_not_nan():
    logp = torch.zeros(3, 0, dtype=F64, requires_grad=True)
    out = rpg.PolicyLoss(agg="seq-mean-token-sum-norm")(logp, logp.detach(), torch.zeros(3, dtype=F64))
    assert out.loss.item() == 0.0


def test_dr_grpo_refuses_a_missing_max_len():
    with pytest.raises(ValueError, match="max_len"):
        rpg.DrGRPOLoss(None)


# --- numbers users pass ---------------------------------------------------------------------


def test_numpy_and_tensor_scalars_are_accepted_as_settings():
    fn = rpg.RPGLoss(
        "rkl",
        beta=np.float32(0.5),
        max_len=np.int64(8),
        agg="seq-mean-token-sum-norm",
        clip=rpg.Clip(np.float64(0.2), torch.tensor(0.28), np.float32(3.0)),
    )
    assert fn.beta == 0.5 and type(fn.beta) is float and fn.max_len == 8 and type(fn.max_len) is int
    assert type(fn.clip.high) is float and abs(fn.clip.high - 0.28) < 1e-7
    assert rpg.PolicyLoss(entropy_coef=torch.tensor(0.01)).entropy_coef == pytest.approx(0.01)


@pytest.mark.parametrize("kwargs", [dict(beta="0.1"), dict(beta=True), dict(beta=torch.ones(2)), dict(max_len=2.5)])
def test_wrong_setting_types_raise_type_error(kwargs):
    with pytest.raises(TypeError):
        rpg.RPGLoss("rkl", **kwargs)
