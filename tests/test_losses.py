"""rpg.losses: the fused path against the plain-autograd reference, dtypes, metrics, errors."""

import itertools

import pytest
import torch

import rpg
from rpg._kernel import TokenLoss

from . import reference
from .conftest import ALL_LOSSES, F64, make_batch

CLIPS = {
    "none": None,
    "paper": rpg.Clip(0.2, 0.28, 3.0),
    "nodual": rpg.Clip(0.1, 0.1, None),
    "highonly": rpg.Clip(None, 0.2, None),
    "truncate": rpg.Truncate(0.2, 0.28),
}


def _configs():
    for (div, style), (cname, clip), fold in itertools.product(ALL_LOSSES, CLIPS.items(), (False, True)):
        if cname == "truncate" and style != "reinforce":
            continue
        if fold and (style != "differentiable" or div in ("fkl", "ufkl")):
            continue
        yield pytest.param(div, style, clip, fold, id=f"{div}-{style}-{cname}{'-fold' if fold else ''}")


@pytest.mark.parametrize("div,style,clip,fold", list(_configs()))
@pytest.mark.parametrize("ref", [False, True], ids=["ref=old", "ref!=old"])
def test_fused_matches_autograd_reference(div, style, clip, fold, ref):
    logp, old, adv, mask, ref_logp = make_batch(5, 7, seed=3, spread=0.6, ref=ref, adv_shape="tok")
    fn = rpg.RPGLoss(div, style=style, beta=0.3, clip=clip, agg="token-sum", fold_kl=fold)
    out = fn(logp, old, adv, mask, ref_logp=ref_logp)
    want = reference.per_token(
        logp, old, adv, mask, kl=div, beta=0.3, style=style, clip=clip, fold_kl=fold, ref_logp=ref_logp
    )
    torch.testing.assert_close(out.per_token, want, rtol=0, atol=1e-12)
    # Gradients through per_token with arbitrary upstream weights, not just through .loss.
    weights = torch.randn(logp.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    (got,) = torch.autograd.grad((out.per_token * weights).sum(), logp)
    (exp,) = torch.autograd.grad((want * weights).sum(), logp)
    torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)
    if clip is not None:  # the batch must exercise the clip, or this test proves little
        assert out.metrics["clip_frac"] > 0


def test_loss_is_aggregate_of_per_token(batch):
    logp, old, adv, mask, ref_logp = batch
    out = rpg.RPGLoss("rkl", beta=0.1, agg="token-mean")(logp, old, adv, mask, ref_logp=ref_logp)
    torch.testing.assert_close(out.loss, out.per_token.sum() / mask.sum(), rtol=0, atol=1e-14)


def test_saves_one_tensor_for_backward(batch):
    logp, old, adv, mask, ref_logp = batch
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn = rpg.RPGLoss("urkl", style="reinforce", beta=0.1)
        TokenLoss.apply(logp, old, ref_logp, adv[:, None], mask, None, fn.loss_config)
    assert len(saved) == 1 and saved[0].shape == logp.shape


def test_only_logp_receives_gradient(batch):
    logp, old, adv, mask, ref_logp = batch
    old, adv, ref_logp = (x.clone().requires_grad_(True) for x in (old, adv, ref_logp))
    out = rpg.RPGLoss("urkl", beta=0.1)(logp, old, adv, mask, ref_logp=ref_logp)
    out.loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert old.grad is None and adv.grad is None and ref_logp.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_dtypes_stay(dtype):
    logp, old, adv, mask, ref_logp = make_batch(dtype=dtype)
    out = rpg.RPGLoss("rkl", style="reinforce", beta=0.1)(logp, old, adv, mask, ref_logp=ref_logp)
    assert out.loss.dtype == dtype and out.per_token.dtype == dtype
    out.loss.backward()
    assert logp.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_upcast_to_float32(dtype):
    logp32, old, adv, mask, ref_logp = make_batch(dtype=torch.float32)
    logp = logp32.detach().to(dtype).requires_grad_(True)
    fn = rpg.RPGLoss("urkl", beta=0.1)
    out = fn(logp, old.to(dtype), adv.to(dtype), mask, ref_logp=ref_logp.to(dtype))
    assert out.loss.dtype == torch.float32 and out.per_token.dtype == torch.float32
    out.loss.backward()
    assert logp.grad.dtype == dtype
    # Same numbers as computing from the (exactly representable) upcast values in float32.
    up = [x.to(dtype).float() for x in (logp32.detach(), old, adv, ref_logp)]
    ref_out = fn(up[0].requires_grad_(True), up[1], up[2], mask, ref_logp=up[3])
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=0, atol=0)


def test_mask_none_means_all_tokens(batch):
    logp, old, adv, _, ref_logp = batch
    fn = rpg.RPGLoss("fkl", beta=0.1)
    a = fn(logp, old, adv, None, ref_logp=ref_logp).loss
    b = fn(logp, old, adv, torch.ones_like(logp, dtype=torch.bool), ref_logp=ref_logp).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float_mask_equals_bool_mask(batch):
    logp, old, adv, mask, ref_logp = batch
    fn = rpg.RPGLoss("fkl", beta=0.1)
    a = fn(logp, old, adv, mask.double(), ref_logp=ref_logp).loss
    b = fn(logp, old, adv, mask, ref_logp=ref_logp).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_masked_tokens_are_dropped_not_zeroed():
    """mask = drop: the loss on a masked batch equals the loss on the batch without those tokens."""
    logp, old, adv, mask, ref_logp = make_batch(3, 5, seed=4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    fn = rpg.RPGLoss("rkl", beta=0.2, agg="seq-mean-token-mean")
    full = fn(logp, old, adv, mask, ref_logp=ref_logp).loss
    parts = [
        rpg.RPGLoss("rkl", beta=0.2, agg="token-mean")(
            logp[i : i + 1, :n], old[i : i + 1, :n], adv[i : i + 1], None, ref_logp=ref_logp[i : i + 1, :n]
        ).loss
        for i, n in enumerate((5, 3, 5))
    ]
    torch.testing.assert_close(full, sum(parts) / 3, rtol=0, atol=1e-14)


def test_metrics_on_a_hand_built_batch():
    # Four tokens, w = 0.5, 1.0, 1.5, 4.0; advantages +1, -1, +1, -1; Clip(0.2, 0.28, 3).
    old = torch.full((1, 4), -2.0, dtype=F64)  # log-probabilities (<= 0) with w = 0.5, 1, 1.5, 4
    logp = (torch.log(torch.tensor([[0.5, 1.0, 1.5, 4.0]], dtype=F64)) + old).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=F64)
    m = rpg.RPGLoss("rkl", beta=0.0)(logp, old, adv).metrics
    # w=0.5 with A>0: no bound acts (low clip binds only for A<0); w=1.5, A>0: high; w=4, A<0: dual.
    assert m["clip_frac/low"] == 0 and m["clip_frac/high"] == 0.25 and m["clip_frac/dual"] == 0.25
    assert m["clip_frac"] == 0.5
    assert m["ratio/min"] == pytest.approx(0.5) and m["ratio/max"] == pytest.approx(4.0)
    assert m["ratio/mean"] == pytest.approx(7.0 / 4)
    ws = torch.tensor([0.5, 1.0, 1.5, 4.0], dtype=F64)
    assert m["kl/old_k1"] == pytest.approx((ws * ws.log()).mean().item())
    assert "kl/term" not in m  # beta = 0: the loss has no KL term
    adv_low = torch.tensor([[-1.0, -1.0, 1.0, 1.0]], dtype=F64)
    m = rpg.RPGLoss("rkl", beta=0.0)(logp, old, adv_low).metrics
    assert m["clip_frac/low"] == 0.25 and m["clip_frac/high"] == 0.5 and m["clip_frac/dual"] == 0


def test_metrics_kl_term_and_masking():
    logp, old, adv, mask, ref_logp = make_batch(seed=5)
    m = rpg.RPGLoss("urkl", beta=0.1)(logp, old, adv, mask, ref_logp=ref_logp).metrics
    w = (logp - old).exp()
    lr = logp - ref_logp
    want = (w * (torch.expm1(-lr) + lr))[mask].mean().item()
    assert m["kl/term"] == pytest.approx(want, rel=1e-12)
    assert m["kl/ref_k3"] == pytest.approx((w * (torch.expm1(-lr) + lr))[mask].mean().item(), rel=1e-12)
    assert m["kl/ref_k1"] == pytest.approx((w * lr)[mask].mean().item(), rel=1e-12)
    lw = logp - old
    assert m["kl/old_k3"] == pytest.approx((w * (torch.expm1(-lw) + lw))[mask].mean().item(), rel=1e-9)
    assert m["ratio/max"] == pytest.approx(w[mask].max().item(), rel=1e-12)


def test_metrics_all_masked_are_zero():
    logp, old, adv, mask, ref_logp = make_batch()
    m = rpg.RPGLoss("urkl", beta=0.1)(logp, old, adv, torch.zeros_like(mask), ref_logp=ref_logp).metrics
    assert all(v == 0.0 for v in m.values()), m


def test_repr_shows_configuration():
    r = repr(rpg.RPGLoss("urkl", style="reinforce", beta=1e-4, clip=rpg.Clip(0.2, 0.28, 3.0), agg="token-mean"))
    assert r == (
        "RPGLoss(divergence='urkl', style='reinforce', beta=0.0001, "
        "clip=Clip(low=0.2, high=0.28, dual=3.0), agg='token-mean')"
    )
    assert "fold_kl=True" in repr(rpg.RPGLoss("rkl", fold_kl=True))
    assert repr(rpg.PolicyLoss()).startswith("PolicyLoss(kl=None,")


def test_paper_defaults():
    fn = rpg.RPGLoss("urkl")
    assert fn.beta == 1e-4 and fn.clip == rpg.Clip(0.2, 0.28, 3.0) and fn.style == "differentiable"
    assert fn.divergence == "urkl" and isinstance(fn, rpg.PolicyLoss)


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(divergence="kl"), ValueError, "valid options: 'fkl', 'rkl', 'ufkl', 'urkl'"),
        (dict(divergence="rkl", style="ppo"), ValueError, "valid options: 'differentiable', 'reinforce'"),
        (dict(divergence="rkl", agg="mean"), ValueError, "token-mean"),
        (dict(divergence="rkl", beta=-0.1), ValueError, "beta must be >= 0"),
        (dict(divergence="rkl", beta=float("nan")), ValueError, "beta"),
        (dict(divergence="rkl", beta="0.1"), TypeError, "beta"),
        (dict(divergence="rkl", clip=(0.2, 0.2)), TypeError, "clip"),
        (dict(divergence="rkl", clip=rpg.Truncate()), ValueError, "reinforce"),
        (dict(divergence="rkl", style="reinforce", fold_kl=True), ValueError, "fold_kl"),
        (dict(divergence="fkl", fold_kl=True), ValueError, "biased"),
        (dict(divergence="ufkl", fold_kl=True), ValueError, "biased"),
        (dict(divergence="rkl", max_len=0), ValueError, "max_len"),
        (dict(divergence="rkl", max_len=2.5), TypeError, "max_len"),
        (dict(divergence="rkl", beta=float("inf")), ValueError, "finite"),
    ],
)
def test_bad_settings(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rpg.RPGLoss(**kwargs)


def test_policy_loss_beta_needs_a_kl_term():
    with pytest.raises(ValueError, match="needs a KL term"):
        rpg.PolicyLoss(beta=0.1)
    assert rpg.PolicyLoss(beta=0.0).kl is None


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    fn = rpg.RPGLoss("rkl", beta=np.float32(0.5), max_len=np.int64(8), agg="seq-mean-token-sum-norm")
    assert fn.beta == 0.5 and fn.max_len == 8 and type(fn.max_len) is int


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (dict(logp=torch.zeros(4, 6, dtype=torch.long)), TypeError, "logp must be a floating-point"),
        (dict(logp=[[0.0]]), TypeError, "logp must be a torch.Tensor"),
        (dict(logp=torch.zeros(4, 6, 1, dtype=F64)), ValueError, r"logp must have shape \[B, T\]"),
        (
            dict(old_logp=torch.zeros(4, 5, dtype=F64)),
            ValueError,
            r"old_logp has shape \(4, 5\) but logp has shape \(4, 6\)",
        ),
        (dict(ref_logp=torch.zeros(3, 6, dtype=F64)), ValueError, r"ref_logp has shape \(3, 6\)"),
        (dict(mask=torch.ones(4, 7, dtype=torch.bool)), ValueError, r"mask has shape \(4, 7\)"),
        (dict(advantages=torch.zeros(4, 6, 1, dtype=F64)), ValueError, r"advantages must have shape \[B\] = \(4,\)"),
        (dict(advantages=torch.zeros(5, dtype=F64)), ValueError, r"got \(5,\)"),
        (dict(advantages=0.5), TypeError, "advantages must be a real torch.Tensor"),
        (dict(old_logp=torch.zeros(4, 6, dtype=torch.int32)), TypeError, "old_logp must be a floating-point"),
        (dict(batch_num_tokens=-1), ValueError, "batch_num_tokens must be finite and >= 0"),
        (dict(global_batch_size="8"), TypeError, "global_batch_size"),
        (dict(global_batch_size=torch.ones(2)), ValueError, "global_batch_size must be a scalar"),
    ],
)
def test_bad_inputs(bad, exc, match):
    logp, old, adv, mask, ref_logp = make_batch(4, 6)
    args = dict(logp=logp, old_logp=old, advantages=adv, mask=mask, ref_logp=ref_logp)
    args.update(bad)
    with pytest.raises(exc, match=match):
        rpg.RPGLoss("urkl", beta=0.1)(**args)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_empty_batch(shape):
    logp = torch.zeros(shape, dtype=F64, requires_grad=True)
    out = rpg.RPGLoss("urkl", beta=0.1)(logp, torch.zeros(shape, dtype=F64), torch.zeros(shape[0], dtype=F64))
    out.loss.backward()
    assert out.loss.item() == 0.0 and all(v == 0.0 for v in out.metrics.values())


def test_complex_advantages_are_refused():
    logp, old, _, mask, _ = make_batch(4, 6)
    with pytest.raises(TypeError, match="advantages must be a real"):
        rpg.RPGLoss("urkl")(logp, old, torch.zeros(4, dtype=torch.complex64), mask)
