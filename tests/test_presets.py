"""rpg.presets: each preset's value against its paper's formula, and the gradient it follows (exact oracle)."""

import pytest
import torch

import rpg
from rpg import testing as T

from .conftest import F64, make_batch

PRESETS = [
    rpg.GRPOLoss(),
    rpg.GRPOLoss(importance_weighted_kl=True),
    rpg.DrGRPOLoss(max_len=8),
    rpg.DAPOLoss(),
    rpg.REINFORCEPlusPlusLoss(),
    rpg.GSPOLoss(),
    rpg.CISPOLoss(),
    rpg.OnPolicyDistillationLoss(),
    rpg.RPGLoss("urkl"),
]


@pytest.mark.parametrize("loss_fn", PRESETS, ids=lambda f: type(f).__name__)
def test_presets_are_policy_loss_configurations(loss_fn):
    assert isinstance(loss_fn, rpg.PolicyLoss)
    same = rpg.PolicyLoss(**loss_fn.config)  # the configuration *is* the loss
    logp, old, adv, mask, ref = make_batch(seed=1)
    a = loss_fn(logp, old, adv, mask, ref_logp=ref)
    b = same(logp, old, adv, mask, ref_logp=ref)
    torch.testing.assert_close(a.per_token, b.per_token, rtol=0, atol=0)
    assert repr(loss_fn).startswith(type(loss_fn).__name__ + "(")


def test_reprs_show_paper_defaults():
    assert repr(rpg.GRPOLoss()) == (
        "GRPOLoss(beta=0.04, clip=Clip(low=0.2, high=0.2, dual=None), importance_weighted_kl=False, "
        "agg='seq-mean-token-mean')"
    )
    assert repr(rpg.DAPOLoss()) == "DAPOLoss(clip=Clip(low=0.2, high=0.28, dual=None), agg='token-mean')"
    assert repr(rpg.DrGRPOLoss(512)) == "DrGRPOLoss(max_len=512, clip=Clip(low=0.2, high=0.2, dual=None))"
    assert repr(rpg.GSPOLoss()) == "GSPOLoss(clip=Clip(low=0.0003, high=0.0004, dual=None))"
    assert repr(rpg.CISPOLoss()) == "CISPOLoss(clip=Truncate(low=None, high=4.0), agg='token-mean')"
    assert rpg.GRPOLoss().config["kl"] == "k3" and rpg.GRPOLoss(importance_weighted_kl=True).config["kl"] == "urkl"


# --- values against the formulas as published ---------------------------------------------


def _ppo(w, A, lo, hi):
    return -torch.minimum(w * A, w.clamp(1 - lo, 1 + hi) * A)


def test_grpo_value_as_published():
    logp, old, adv, mask, ref = make_batch(seed=2, spread=0.4)
    w = (logp - old).exp()
    A = adv[:, None]
    k3 = (ref - logp).exp() - (ref - logp) - 1
    per_token = _ppo(w, A, 0.2, 0.2) + 0.04 * k3
    seq = (per_token * mask).sum(-1) / mask.sum(-1)
    out = rpg.GRPOLoss()(logp, old, adv, mask, ref_logp=ref)
    torch.testing.assert_close(out.per_token, per_token * mask, rtol=0, atol=1e-14)
    torch.testing.assert_close(out.loss, seq.mean(), rtol=0, atol=1e-14)
    weighted = rpg.GRPOLoss(importance_weighted_kl=True)(logp, old, adv, mask, ref_logp=ref)
    torch.testing.assert_close(weighted.per_token, (_ppo(w, A, 0.2, 0.2) + 0.04 * w * k3) * mask, rtol=0, atol=1e-14)


def test_dr_grpo_and_dapo_values():
    logp, old, adv, mask, _ = make_batch(seed=3, spread=0.4)
    w, A = (logp - old).exp(), adv[:, None]
    dr = rpg.DrGRPOLoss(max_len=10)(logp, old, adv, mask)
    torch.testing.assert_close(dr.loss, (_ppo(w, A, 0.2, 0.2) * mask).sum() / (logp.shape[0] * 10), rtol=0, atol=1e-14)
    dapo = rpg.DAPOLoss()(logp, old, adv, mask)
    torch.testing.assert_close(dapo.loss, (_ppo(w, A, 0.2, 0.28) * mask).sum() / mask.sum(), rtol=0, atol=1e-14)


def test_gspo_value_and_gradient_are_the_sequence_formula():
    """GSPO: s = exp(mean log w) per sequence; loss = mean_b −min(s A, clip(s) A); autograd through s."""
    logp, old, adv, mask, _ = make_batch(6, 5, seed=4, spread=0.01)
    clip = rpg.Clip(3e-4, 4e-4, None)
    out = rpg.GSPOLoss(clip=clip)(logp, old, adv, mask)
    log_s = ((logp - old) * mask).sum(-1) / mask.sum(-1)
    s = log_s.exp()
    seq_loss = -torch.minimum(s * adv, s.clamp(1 - 3e-4, 1 + 4e-4) * adv)
    torch.testing.assert_close(out.loss, seq_loss.mean(), rtol=0, atol=1e-14)
    (g_ours,) = torch.autograd.grad(out.loss, logp)
    (g_want,) = torch.autograd.grad(seq_loss.mean(), logp)
    torch.testing.assert_close(g_ours, g_want, rtol=0, atol=1e-14)
    clipped = (s > 1 + 4e-4) & (adv > 0) | (s < 1 - 3e-4) & (adv < 0)
    assert clipped.any() and (~clipped).any()  # both branches exercised
    assert out.metrics["clip_frac"] > 0


def test_gspo_refuses_other_aggregations():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        rpg.GSPOLoss(agg="token-mean")


def test_cispo_value_and_gradient():
    logp, old, adv, mask, _ = make_batch(seed=5, spread=1.5)
    out = rpg.CISPOLoss()(logp, old, adv, mask)
    wbar = (logp - old).exp().clamp(max=5.0).detach()
    want = -(wbar * adv[:, None] * logp) * mask
    torch.testing.assert_close(out.per_token, want, rtol=0, atol=1e-13)
    (g,) = torch.autograd.grad(out.per_token.sum(), logp)
    torch.testing.assert_close(g, -(wbar * adv[:, None]) * mask, rtol=0, atol=1e-13)
    assert ((logp - old).exp() > 5)[mask].any()  # the cap binds somewhere
    # A Clip gives the same two bounds (its dual bound plays no part in truncation).
    assert rpg.CISPOLoss(clip=rpg.Clip(0.2, 0.28, None)).clip == rpg.Truncate(0.2, 0.28)
    assert rpg.CISPOLoss(clip=rpg.Clip(0.2, 0.28)).clip == rpg.Truncate(0.2, 0.28)


# --- which KL each preset's gradient follows (exact enumeration, off-policy) ---------------

BETA = 0.5


def _grads(p):
    return {d: -T.objective_gradient(d, p.logits, p.ref_logits, p.rewards, BETA) for d in ("fkl", "rkl")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_unweighted_k3_follows_forward_kl_on_policy_and_neither_off_policy(seed):
    p = T.random_problem(k=6, seed=seed, scale=0.6)
    want = _grads(p)
    fn = rpg.GRPOLoss(beta=BETA, clip=None)
    on = T.expected_gradient(fn, p.logits, p.logits, p.rewards, ref_logits=p.ref_logits)
    torch.testing.assert_close(on, want["fkl"], rtol=0, atol=1e-10)
    off = T.expected_gradient(fn, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits)
    assert (off - want["fkl"]).abs().max() > 1e-3 and (off - want["rkl"]).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_weighted_k3_follows_reverse_kl_off_policy(seed):
    p = T.random_problem(k=6, seed=seed, scale=0.6)
    fn = rpg.GRPOLoss(beta=BETA, clip=None, importance_weighted_kl=True)
    off = T.expected_gradient(fn, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits)
    torch.testing.assert_close(off, _grads(p)["rkl"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("with_reward", [False, True])
def test_on_policy_distillation_follows_reverse_kl_to_the_teacher_off_policy(with_reward):
    p = T.random_problem(k=7, seed=8, scale=0.8)
    teacher = p.ref_logits
    rewards = p.rewards if with_reward else torch.zeros_like(p.rewards)
    fn = rpg.OnPolicyDistillationLoss(beta=BETA)
    got = T.expected_gradient(fn, p.logits, p.old_logits, rewards, ref_logits=teacher)
    want = -T.objective_gradient("rkl", p.logits, teacher, rewards, BETA)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    fwd = -T.objective_gradient("fkl", p.logits, teacher, rewards, BETA)
    assert (got - fwd).abs().max() > 1e-3


def test_distillation_accepts_no_advantages():
    logp, old, _, mask, teacher = make_batch(seed=6)
    out = rpg.OnPolicyDistillationLoss()(logp, old, None, mask, ref_logp=teacher)
    zero = rpg.OnPolicyDistillationLoss()(logp, old, torch.zeros(logp.shape[0], dtype=F64), mask, ref_logp=teacher)
    torch.testing.assert_close(out.loss, zero.loss, rtol=0, atol=0)


@pytest.mark.parametrize(
    "fn",
    [
        rpg.DAPOLoss(clip=None),
        rpg.REINFORCEPlusPlusLoss(clip=None),
        rpg.CISPOLoss(clip=None),
        rpg.DrGRPOLoss(max_len=4, clip=None),
    ],
    ids=lambda f: type(f).__name__,
)
def test_kl_free_presets_follow_the_reward_gradient_off_policy(fn):
    p = T.random_problem(k=6, seed=9, scale=0.6)
    got = T.expected_gradient(fn, p.logits, p.old_logits, p.rewards)
    want = -T.objective_gradient("rkl", p.logits, p.ref_logits, p.rewards, 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# --- metrics ----------------------------------------------------------------------------


def test_ess_and_global_means():
    old = torch.full((1, 4), -2.0, dtype=F64)  # log-probabilities (<= 0) with w = 1, 1, 2, 4
    logp = (torch.log(torch.tensor([[1.0, 1.0, 2.0, 4.0]], dtype=F64)) + old).requires_grad_(True)
    adv = torch.ones(1, dtype=F64)
    m = rpg.DAPOLoss()(logp, old, adv).metrics
    assert m["ratio/ess"] == pytest.approx(8.0**2 / (4 * 22.0))
    assert m["ratio/mean"] == pytest.approx(2.0)
    assert m["clip_frac/high"] == pytest.approx(0.5)
    out = rpg.DAPOLoss()(logp, old, adv, batch_num_tokens=16)
    assert out.metrics == m  # per-call means, whatever batch_num_tokens
    g = out.summable_metrics
    assert g["ratio/mean"] == pytest.approx(8.0 / 16) and g["clip_frac/high"] == pytest.approx(2 / 16)
    assert "ratio/max" not in g and "ratio/ess" not in g  # they do not add up over micro-batches


def test_metric_global_means_sum_over_micro_batches():
    logp, old, adv, mask, ref = make_batch(6, 5, seed=7)
    fn = rpg.GRPOLoss(beta=0.1)
    n = mask.sum()
    full = fn(logp, old, adv, mask, ref_logp=ref).metrics
    parts = [
        fn(
            *(x[i : i + 3] for x in (logp, old, adv, mask)), ref_logp=ref[i : i + 3], batch_num_tokens=n
        ).summable_metrics
        for i in (0, 3)
    ]
    for key in ("ratio/mean", "clip_frac", "kl/ref_k3", "kl/term"):
        assert parts[0][key] + parts[1][key] == pytest.approx(full[key], rel=1e-12)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: rpg.PolicyLoss(kl="k4"), ValueError, "valid options"),
        (lambda: rpg.PolicyLoss(ratio="seq"), ValueError, "'token', 'sequence'"),
        (
            lambda: rpg.PolicyLoss(ratio="sequence", style="reinforce", kl="k3", beta=0.1),
            ValueError,
            "separate_kl=True",
        ),
        (lambda: rpg.PolicyLoss(kl="k3", beta=0.1, fold_kl=True), ValueError, "fold_kl"),
        (lambda: rpg.GRPOLoss(beta=-1.0), ValueError, "beta"),
        (lambda: rpg.DrGRPOLoss(max_len=0), ValueError, "max_len"),
        (lambda: rpg.DAPOLoss(clip=rpg.Truncate()), ValueError, "reinforce"),
    ],
)
def test_preset_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_metrics_ignore_global_counts_and_summable_metrics_use_them():
    logp, old, adv, mask, _ref = make_batch(seed=12)
    fn = rpg.DAPOLoss()
    local = fn(logp, old, adv, mask).metrics
    out = fn(logp, old, adv, mask, batch_num_tokens=1000)
    assert out.metrics == local and out.local_metrics == local
    assert out.summable_metrics["ratio/mean"] == pytest.approx(local["ratio/mean"] * int(mask.sum()) / 1000, rel=1e-12)


def test_kl_metrics_are_unbiased_off_policy():
    """Each KL metric is the batch mean of a per-token term whose expectation under π_old (computed exactly on a
    tabular problem) is the KL it names: kl/old_* → KL(π_θ‖π_old), kl/ref_* → KL(π_θ‖π_ref)."""
    from rpg.kl import kl

    p = T.random_problem(k=7, seed=13, scale=0.7)
    logp, old, ref = (torch.log_softmax(x, -1)[:, None] for x in (p.logits, p.old_logits, p.ref_logits))
    out = rpg.DAPOLoss()(logp, old, torch.zeros(7, dtype=F64), ref_logp=ref)
    lw, lr = logp - old, logp - ref
    w = lw.exp()
    terms = {
        "kl/old_k1": w * lw,
        "kl/old_k3": w * (torch.expm1(-lw) + lw),
        "kl/ref_k1": w * lr,
        "kl/ref_k3": w * (torch.expm1(-lr) + lr),
    }
    drift, to_ref = kl(logp[:, 0], old[:, 0]), kl(logp[:, 0], ref[:, 0])
    truth = {"kl/old_k1": drift, "kl/old_k3": drift, "kl/ref_k1": to_ref, "kl/ref_k3": to_ref}
    for key, term in terms.items():
        assert out.metrics[key] == pytest.approx(term.mean().item(), rel=1e-12)  # what the metric computes
        assert (old.exp() * term).sum().item() == pytest.approx(truth[key].item(), rel=1e-10)  # its expectation


# --- replace: a preset stays itself where it can express the result -------------------------------

EVERY_PRESET = [
    *PRESETS,
    rpg.DPPOLoss(),
    rpg.SAPOLoss(),
    rpg.TOPRLoss(),
    rpg.GPPOLoss(),
    rpg.DROLoss(0.1),
    rpg.PrimeRLLoss(),
    rpg.GMPOLoss(),
    rpg.VESPOLoss(),
    rpg.ClipCovLoss(),
    rpg.KLCovLoss(),
]


@pytest.mark.parametrize("loss_fn", EVERY_PRESET, ids=lambda f: type(f).__name__)
def test_replace_keeps_the_preset_class_for_its_own_arguments(loss_fn):
    """``entropy_coef`` and ``correction`` are arguments of every preset: replacing one gives the preset
    built with it (same class, repr and configuration), not a plain PolicyLoss."""
    corr = rpg.RolloutCorrection(upper=3.0)
    new = loss_fn.replace(entropy_coef=0.01, correction=corr)
    assert type(new) is type(loss_fn)
    assert new.loss_config == loss_fn.loss_config.replace(entropy_coef=0.01, correction=corr)
    assert repr(new) == repr(loss_fn)[:-1] + (", " if repr(loss_fn)[-2] != "(" else "") + (
        f"correction={corr!r}, entropy_coef=0.01)"
    )


def test_replace_on_grpo_keeps_its_arguments_and_its_missing_reference_warning(monkeypatch):
    import warnings

    from rpg import losses as rpg_losses

    new = rpg.GRPOLoss().replace(beta=0.1)
    assert type(new) is rpg.GRPOLoss and new == rpg.GRPOLoss(beta=0.1) and new.importance_weighted_kl is False
    assert repr(new) == repr(rpg.GRPOLoss(beta=0.1))
    monkeypatch.setattr(rpg_losses, "_WARNED_NO_REF", set())
    logp, old, adv, mask, _ = make_batch(seed=3)
    with pytest.warns(UserWarning, match=r"GRPOLoss\(beta=0.1\) was called without ref_logp"):
        new(logp, old, adv, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rpg.GRPOLoss().replace(beta=0.0)(logp, old, adv, mask)  # no KL term: silent


def test_replace_takes_a_presets_own_argument_names():
    assert type(rpg.PrimeRLLoss().replace(kl_tau=0.01)) is rpg.PrimeRLLoss
    assert rpg.PrimeRLLoss().replace(kl_tau=0.01) == rpg.PrimeRLLoss(kl_tau=0.01)
    iw = rpg.GRPOLoss(beta=0.1).replace(importance_weighted_kl=True)
    assert type(iw) is rpg.GRPOLoss and iw == rpg.GRPOLoss(beta=0.1, importance_weighted_kl=True)
    assert rpg.ClipCovLoss().replace(fraction=0.01).select == rpg.ClipCovLoss(fraction=0.01).select
    with pytest.raises(ValueError, match="kl_tau"):
        rpg.PrimeRLLoss().replace(kl_tau=-1.0)  # the preset validates its own argument
    with pytest.raises(TypeError, match=r"unknown settings \['epsilon'\]"):
        rpg.GRPOLoss().replace(epsilon=0.2)


def test_replace_gives_a_policy_loss_where_the_preset_cannot_express_the_result():
    """A framework setting the preset fixes (GRPO's KL term, GMPO's aggregation, CISPO's Clip read as RPG-Style
    Clip rather than truncation bounds) gives the PolicyLoss of exactly the replaced configuration."""
    for loss_fn, change in [
        (rpg.GRPOLoss(), dict(kl="rkl")),
        (rpg.GMPOLoss(), dict(agg="token-mean")),
        (rpg.CISPOLoss(), dict(clip=rpg.Clip(0.2, 0.2, None))),
        (rpg.TOPRLoss(), dict(kl="urkl", beta=0.5)),
        (rpg.PrimeRLLoss(), dict(beta=0.5)),  # τ = β/2 is the preset's own argument: replace(kl_tau=...)
    ]:
        new = loss_fn.replace(**change)
        assert type(new) is rpg.PolicyLoss, (loss_fn, change)
        assert new.loss_config == loss_fn.loss_config.replace(**change)
