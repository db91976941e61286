"""rpg.clipping: each branch of PPO / dual clip, RPG-Style Clip and truncation, and bound validation."""

import math

import pytest
import torch

import rpg
from rpg import clipping
from rpg.clipping import DUAL, HIGH, LOW, NONE

F64 = torch.float64
CLIP = rpg.Clip(low=0.2, high=0.28, dual=3.0)


OLD = -3.0  # log π_old of the crafted tokens: low enough that every logp = log w + OLD is a log-prob (<= 0)


def _grad(loss_fn, log_w, adv, ref_shift=None):
    """Per-token value and d(value)/d(logp) for tokens with logp = log_w + OLD, old = OLD."""
    logp = (torch.tensor(log_w, dtype=F64) + OLD)[None].requires_grad_(True)
    old = torch.full_like(logp, OLD)
    ref = None if ref_shift is None else old + torch.tensor(ref_shift, dtype=F64)[None]
    out = loss_fn(logp, old, torch.tensor(adv, dtype=F64)[None], ref_logp=ref)
    (g,) = torch.autograd.grad(out.per_token.sum(), logp)
    return out.per_token.detach()[0], g[0]


W = [0.5, 0.9, 1.1, 1.5, 4.0]  # below 1-low, inside, inside, above 1+high, above dual


def test_ppo_branches_positive_advantage():
    w, adv = torch.tensor(W, dtype=F64), torch.ones(5, dtype=F64)
    m, clipped = clipping.ppo(w, adv, CLIP)
    torch.testing.assert_close(m, torch.tensor([0.5, 0.9, 1.1, 1.28, 1.28], dtype=F64))
    assert clipped.tolist() == [False, False, False, True, True]
    assert clipping.in_band(w, adv >= 0, CLIP).tolist() == [True, True, True, False, False]
    assert clipping.codes(w, adv, CLIP).tolist() == [NONE, NONE, NONE, HIGH, HIGH]


def test_ppo_branches_negative_advantage():
    w, adv = torch.tensor(W, dtype=F64), -torch.ones(5, dtype=F64)
    m, clipped = clipping.ppo(w, adv, CLIP)
    torch.testing.assert_close(m, torch.tensor([0.8, 0.9, 1.1, 1.5, 3.0], dtype=F64))
    assert clipped.tolist() == [True, False, False, False, True]
    assert clipping.codes(w, adv, CLIP).tolist() == [LOW, NONE, NONE, NONE, DUAL]


def test_ppo_broadcasts_a_per_sequence_advantage():
    w = torch.tensor([W, W], dtype=F64)
    m, clipped = clipping.ppo(w, torch.tensor([[1.0], [-1.0]], dtype=F64), CLIP)
    assert clipped.tolist() == [[False, False, False, True, True], [True, False, False, False, True]]
    torch.testing.assert_close(m[1], torch.tensor([0.8, 0.9, 1.1, 1.5, 3.0], dtype=F64))


def test_ppo_without_dual_or_bounds():
    m, clipped = clipping.ppo(torch.tensor(W, dtype=F64), -torch.ones(5, dtype=F64), rpg.Clip(0.2, 0.28, None))
    assert clipped.tolist() == [True, False, False, False, False] and m[-1] == 4.0
    w, adv, none = torch.tensor(W, dtype=F64), torch.ones(5, dtype=F64), rpg.Clip(None, None, None)
    m, clipped = clipping.ppo(w, adv, none)
    assert not clipped.any() and (clipping.codes(w, adv, none) == NONE).all() and torch.equal(m, w)


def test_exact_bound():
    """RPG-Style Clip: Algorithm 2's strict inequalities — at w = 1+ε_high (A′>0), w = 1−ε_low or w = c_dual
    (A′<0) no gradient. PPO: on the kink the gradient of the unclipped term is kept (m == w there)."""
    w = torch.tensor([1.28, 0.8, 3.0], dtype=F64)
    adv = torch.tensor([1.0, -1.0, -1.0], dtype=F64)
    assert clipping.rpg_clip(w, adv, CLIP).all() and not clipping.in_band(w, adv >= 0, CLIP).any()
    m, clipped = clipping.ppo(w, adv, CLIP)
    assert not clipped.any() and torch.equal(m, w)
    assert clipping.codes(w, adv, CLIP).tolist() == [HIGH, LOW, DUAL]


def test_zero_advantage_is_never_counted_as_clipped():
    assert (clipping.codes(torch.tensor(W, dtype=F64), torch.zeros(5, dtype=F64), CLIP) == NONE).all()


def test_differentiable_ppo_value_and_gradient_per_branch():
    """ℓ = max(−wA, −clip(w)A), dual for A<0; gradient −wA where unclipped, else 0 (β = 0)."""
    fn = rpg.RPGLoss("rkl", beta=0.0, clip=CLIP, agg="token-sum")
    hand = {
        1.0: ([0.5, 0.9, 1.1, 1.28, 1.28], [True, True, True, False, False]),
        -1.0: ([0.8, 0.9, 1.1, 1.5, 3.0], [False, True, True, True, False]),
    }
    for sign, (m, unclipped) in hand.items():
        value, grad = _grad(fn, [math.log(w) for w in W], [sign] * 5)
        m, unclipped = torch.tensor(m, dtype=F64), torch.tensor(unclipped)
        torch.testing.assert_close(value, -m * sign, rtol=0, atol=1e-14)
        want = torch.where(unclipped, -torch.tensor(W, dtype=F64) * sign, torch.zeros(5, dtype=F64))
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-14)


def test_differentiable_kl_stays_outside_the_clip():
    """A clipped token still carries the KL surrogate's gradient β·w(log ρ + 1) (rkl)."""
    beta = 0.3
    fn = rpg.RPGLoss("rkl", beta=beta, clip=CLIP, agg="token-sum")
    log_w = math.log(1.5)  # A > 0, above 1 + high: the PG term is clipped
    _, grad = _grad(fn, [log_w], [1.0])
    assert grad.item() == pytest.approx(beta * 1.5 * (log_w + 1), rel=1e-13)


def test_rpg_clip_branches_on_effective_advantage():
    """A > 0 but A' = g/w < 0 because of the KL: the negative-advantage bounds apply."""
    beta, A = 1.0, 0.1
    fn = rpg.RPGLoss("urkl", style="reinforce", beta=beta, clip=CLIP, agg="token-sum")
    # urkl: g = w (A − β log w); at w = 1.5: A' = 0.1 − log 1.5 < 0, and 1−low < w < dual: gradient kept.
    # Branching on A alone would clip it (w ≥ 1 + high).
    log_w = math.log(1.5)
    value, grad = _grad(fn, [log_w], [A])
    g = 1.5 * (A - beta * log_w)
    assert g < 0
    assert grad.item() == pytest.approx(-g, rel=1e-13)
    assert value.item() == pytest.approx(-g * (log_w + OLD), rel=1e-13)
    # At w = 0.5: A' = 0.1 + log 2 > 0, w < 1 + high: kept (A' ≥ 0 has no lower bound).
    _, grad = _grad(fn, [math.log(0.5)], [A])
    assert grad.item() == pytest.approx(-0.5 * (A + beta * math.log(2)), rel=1e-13)


@pytest.mark.parametrize(
    "w,adv,kept,code",
    [
        (0.5, 1.0, True, NONE),
        (1.2, 1.0, True, NONE),
        (1.2801, 1.0, False, HIGH),
        (2.0, 1.0, False, HIGH),
        (0.8, -1.0, False, LOW),
        (0.5, -1.0, False, LOW),
        (1.5, -1.0, True, NONE),
        (2.99, -1.0, True, NONE),
        (3.0, -1.0, False, DUAL),
        (10.0, -1.0, False, DUAL),
    ],
)
def test_rpg_clip_gradient_mask_and_detached_value(w, adv, kept, code):
    fn = rpg.RPGLoss("fkl", style="reinforce", beta=0.0, clip=CLIP, agg="token-sum")
    value, grad = _grad(fn, [math.log(w)], [adv])
    assert value.item() == pytest.approx(-w * adv * (math.log(w) + OLD), rel=1e-13)  # value kept
    assert grad.item() == (pytest.approx(-w * adv, rel=1e-13) if kept else 0.0)
    assert clipping.rpg_clip(torch.tensor([w], dtype=F64), torch.tensor([w * adv], dtype=F64), CLIP).item() != kept
    assert clipping.codes(torch.tensor([w], dtype=F64), torch.tensor([w * adv], dtype=F64), CLIP).item() == code


@pytest.mark.parametrize("div", ["fkl", "rkl", "ufkl", "urkl"])
def test_truncation_replaces_only_the_weight(div):
    """g with w̄ = sg(clip(w)) in place of w; log ρ and c stay exact (paper eq. 4.1: C(w, sg(Â_reg)));
    every token keeps a gradient. Hand formulas from docs/objectives.md with w → w̄."""
    trunc = rpg.Truncate(low=0.2, high=0.28)
    beta, A, log_c = 0.5, 1.0, -0.3
    c = math.exp(log_c)
    fn = rpg.RPGLoss(div, style="reinforce", beta=beta, clip=trunc, agg="token-sum")
    for w, wbar in [(0.5, 0.8), (1.0, 1.0), (2.0, 1.28)]:
        lr = math.log(w) - log_c
        g = {
            "fkl": wbar * A + beta * c,
            "rkl": wbar * (A - beta * (lr + 1)),
            "ufkl": wbar * A - beta * (wbar - c),
            "urkl": wbar * (A - beta * lr),
        }[div]
        _, grad = _grad(fn, [math.log(w)], [A], ref_shift=[log_c])
        assert grad.item() == pytest.approx(-g, rel=1e-12)


def test_truncation_by_hand_at_one_token():
    """log w = 1, A = 0, β = 1, Truncate(high=0.28): urkl g = 1.28·(0 − 1) = −1.28 (the KL's log ρ = 1
    is not clipped to log 1.28 — that would give −0.316)."""
    fn = rpg.RPGLoss("urkl", style="reinforce", beta=1.0, clip=rpg.Truncate(None, 0.28), agg="token-sum")
    _, grad = _grad(fn, [1.0], [0.0])
    assert grad.item() == pytest.approx(1.28, rel=1e-12)


def test_truncation_codes():
    trunc = rpg.Truncate(low=0.2, high=0.28)
    w = torch.tensor([0.5, 1.0, 2.0])
    log_w_bar = clipping.truncate(w.log(), trunc)
    assert clipping.codes(w, None, trunc).tolist() == [LOW, NONE, HIGH]
    torch.testing.assert_close(log_w_bar.exp(), torch.tensor([0.8, 1.0, 1.28]))


def test_truncation_one_sided():
    w, trunc = torch.tensor([0.01, 5.0]), rpg.Truncate(low=None, high=1.0)
    torch.testing.assert_close(clipping.truncate(w.log(), trunc).exp(), torch.tensor([0.01, 2.0]))
    assert clipping.codes(w, None, trunc).tolist() == [NONE, HIGH]


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        (dict(low=1.0), ValueError),
        (dict(low=-0.1), ValueError),
        (dict(high=-0.1), ValueError),
        (dict(dual=1.0), ValueError),
        (dict(dual=0.5), ValueError),
        (dict(low=float("nan")), ValueError),
        (dict(low="0.2"), TypeError),
        (dict(high=True), TypeError),
    ],
)
def test_clip_validation(kwargs, exc):
    with pytest.raises(exc, match=next(iter(kwargs))):
        rpg.Clip(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(low=1.0), dict(low=-0.5), dict(high=-1.0)])
def test_truncate_validation(kwargs):
    with pytest.raises(ValueError, match="Truncate"):
        rpg.Truncate(**kwargs)


def test_valid_bounds_are_accepted():
    assert rpg.Clip(0.0, 0.0, 1.0001).dual == 1.0001
    assert rpg.Clip(None, None, None).low is None
    assert rpg.Clip() == rpg.Clip(0.2, 0.28, 3.0)


# --- trust-region masking (DPPO) --------------------------------------------------------------


def _tr_grad(rule, p_old, p_new, adv, style="reinforce"):
    old = torch.tensor([p_old], dtype=F64).log()
    logp = torch.tensor([p_new], dtype=F64).log().requires_grad_(True)
    out = rpg.PolicyLoss(style=style, clip=rule)(logp, old, torch.tensor(adv, dtype=F64)[None, :])
    (g,) = torch.autograd.grad(out.per_token.sum(), logp)
    return g[0], out


def test_trust_region_tv_masks_by_the_probability_difference_in_the_advantage_direction():
    rule = rpg.TrustRegion(low=0.1, high=0.2, divergence="tv")
    p_old = [0.5, 0.5, 0.5, 0.5, 0.05, 0.05]
    p_new = [0.75, 0.65, 0.35, 0.45, 0.2, 0.001]
    for adv, kept in ((1.0, [False, True, True, True, True, True]), (-1.0, [True, True, False, True, True, True])):
        for style in ("reinforce", "differentiable"):
            g, out = _tr_grad(rule, p_old, p_new, [adv] * 6, style)
            assert (g != 0).tolist() == kept, (adv, style, g)
            # the masked token keeps the value of its branch, finite; metrics count it on its side
            assert torch.isfinite(out.per_token).all()
            assert out.metrics["clip_frac/high" if adv > 0 else "clip_frac/low"] == pytest.approx(1 / 6)
    # p − q = −0.049 for q = 0.05 can never go below −0.1: TV's per-token ε = δ/q does not bind there
    from rpg.objectives import Ratios

    q = torch.tensor([0.05]).log()
    assert (
        rpg.clipping.codes(torch.tensor([0.02]), torch.tensor([-1.0]), rule, Ratios(q + math.log(0.02), q)).item()
        == NONE
    )


def test_trust_region_kl_masks_by_the_binary_kl():
    q, p = 0.5, torch.tensor([0.5, 0.6, 0.9, 0.4, 0.1], dtype=F64)
    kl = q * math.log(q) - q * p.log() + (1 - q) * math.log(1 - q) - (1 - q) * torch.log1p(-p)
    rule = rpg.TrustRegion(low=0.05, high=0.05, divergence="kl")
    g, _ = _tr_grad(rule, [q] * 5, p.tolist(), [1.0] * 5)
    assert (g != 0).tolist() == (~((kl > 0.05) & (p > q))).tolist()
    g, _ = _tr_grad(rule, [q] * 5, p.tolist(), [-1.0] * 5)
    assert (g != 0).tolist() == (~((kl > 0.05) & (p < q))).tolist()
    assert kl[2] > 0.05 and kl[4] > 0.05 and kl[1] < 0.05  # the crafted tokens exercise both sides


@pytest.mark.parametrize("divergence", ["tv", "kl"])
@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
def test_trust_region_is_exact_where_it_does_not_bind(divergence, style):
    from rpg import testing as T

    p = T.random_problem(k=6, seed=4)
    for div in rpg.DIVERGENCES:
        fn = rpg.RPGLoss(div, style=style, beta=0.3, clip=rpg.TrustRegion(5.0, 5.0, divergence))
        got = T.expected_gradient(fn, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits)
        want = -T.objective_gradient(div, p.logits, p.ref_logits, p.rewards, 0.3)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # and where it binds, it is not (the oracle can tell)
    tight = rpg.RPGLoss("rkl", style=style, beta=0.3, clip=rpg.TrustRegion(0.01, 0.01, divergence))
    got = T.expected_gradient(tight, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits)
    assert (got + T.objective_gradient("rkl", p.logits, p.ref_logits, p.rewards, 0.3)).abs().max() > 1e-4


def test_dppo_loss_is_reinforce_with_a_trust_region_and_a_cap():
    fn = rpg.DPPOLoss(0.15, 0.15, "tv", cap=3.0)
    assert fn.loss_config == rpg.LossConfig(style="reinforce", clip=rpg.TrustRegion(0.15, 0.15, "tv", 3.0))
    assert repr(fn) == "DPPOLoss(low=0.15, high=0.15, divergence='tv', cap=3.0, agg='token-mean')"
    # the cap truncates the weight (no mask): w = 4 inside a loose region gives gradient −3·A
    g, _ = _tr_grad(rpg.TrustRegion(1.0, 1.0, "tv", cap=3.0), [0.1], [0.4], [1.0])
    assert g.item() == pytest.approx(-3.0)


def test_trust_region_errors():
    with pytest.raises(ValueError, match="divergence"):
        rpg.TrustRegion(divergence="js")
    with pytest.raises(ValueError, match="low"):
        rpg.TrustRegion(low=-0.1)
    with pytest.raises(ValueError, match="cap"):
        rpg.TrustRegion(cap=0.0)
    with pytest.raises(ValueError, match="ratio"):
        rpg.PolicyLoss(clip=rpg.TrustRegion(), ratio="sequence", agg="seq-mean-token-mean")
