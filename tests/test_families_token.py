"""Token-level families: SAPO, TOPR, GPPO / CE-GPPO, DRO (Kimi-1.5) and prime-rl's default loss.

For each: the kernel against the plain-autograd formula (tests/reference.py) to 1e-12; hand-computed
values and gradients on crafted tokens (every branch); exact-oracle statements (float64, off-policy) of
what its expected gradient is and is not; every aggregation with shard-sum invariance; the behaviour
policy, weights and entropy options; torch.compile; the fused head; clear errors for bad settings.
Peer equality (TRL, verl) lives in tests/integrations/test_families_token_peers.py.
"""

import math

import pytest
import torch

import rpg
from rpg import testing as T
from rpg.fused import FusedLinearLoss
from rpg.logprobs import from_hidden

from . import reference as R
from .conftest import F64, make_batch

UNTRUNCATED = rpg.RolloutCorrection(upper=None)  # the exact weight π_old/μ


def _wide(adv, like):
    adv = adv[:, None] if adv.dim() == 1 else adv
    return adv.expand_as(like)


def _sapo_seq(logp, old, adv, mask):
    s = R.sequence_ratio_tokens(logp, old, mask)
    return R.sapo_term(s, _wide(adv, logp), 1.0, 1.05)


# name -> (loss, reference per-token ℓ(logp, old, adv, mask) as the papers print it, ref_logp allowed)
FAMILIES = {
    "sapo": (rpg.SAPOLoss(), lambda lp, old, a, m: R.sapo_term((lp - old).exp(), _wide(a, lp), 1.0, 1.05)),
    "sapo-tau": (
        rpg.SAPOLoss(tau_pos=3.0, tau_neg=0.5),
        lambda lp, old, a, m: R.sapo_term((lp - old).exp(), _wide(a, lp), 3.0, 0.5),
    ),
    "sapo-sequence": (rpg.SAPOLoss(ratio="sequence"), _sapo_seq),
    "gppo": (rpg.GPPOLoss(), lambda lp, old, a, m: R.gppo_term((lp - old).exp(), _wide(a, lp), 0.2, 0.28, 1.0, 1.0)),
    "ce-gppo": (
        rpg.GPPOLoss(beta_low=0.5, beta_high=0.75),
        lambda lp, old, a, m: R.gppo_term((lp - old).exp(), _wide(a, lp), 0.2, 0.28, 0.5, 0.75),
    ),
    "gppo-dual": (
        rpg.GPPOLoss(beta_low=0.25, dual=1.5),
        lambda lp, old, a, m: R.gppo_term((lp - old).exp(), _wide(a, lp), 0.2, 0.28, 0.25, 1.0, 1.5),
    ),
    "topr": (rpg.TOPRLoss(), lambda lp, old, a, m: R.topr_term(lp, old, _wide(a, lp))),
    "dro": (rpg.DROLoss(0.3), lambda lp, old, a, m: R.dro_term(lp, old, _wide(a, lp), 0.3)),
    "prime-rl": (
        rpg.PrimeRLLoss(),
        lambda lp, old, a, m: R.prime_rl_term(lp, old, old, _wide(a, lp), 0.2, 0.2, 1e-3),
    ),
}


# --- the kernel is the formula ----------------------------------------------------------------------


@pytest.mark.parametrize("adv_shape", ["seq", "tok"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_kernel_equals_reference(name, adv_shape):
    loss_fn, ref = FAMILIES[name]
    logp, old, adv, mask, _ = make_batch(5, 7, seed=3, spread=0.6, adv_shape=adv_shape)
    out = loss_fn(logp, old, adv, mask)
    want = torch.where(mask, ref(logp, old, adv, mask), torch.zeros((), dtype=F64))
    torch.testing.assert_close(out.per_token, want, rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(out.per_token.sum(), logp)
    (g_want,) = torch.autograd.grad(want.sum(), logp)
    torch.testing.assert_close(g, g_want, rtol=0, atol=1e-12)
    assert g.abs().sum() > 0


def test_sapo_sequence_loss_is_the_sequence_gate():
    """ratio='sequence', seq-mean-token-mean: loss = mean_b −f(s_b)·A_b with autograd through s_b."""
    logp, old, adv, mask, _ = make_batch(5, 7, seed=4, spread=0.3)
    out = rpg.SAPOLoss(ratio="sequence")(logp, old, adv, mask)
    log_s = torch.where(mask, logp - old, torch.zeros((), dtype=F64)).sum(-1) / mask.sum(-1)
    tau = torch.where(adv > 0, torch.tensor(1.0, dtype=F64), torch.tensor(1.05, dtype=F64))
    want = (-(4 / tau) * torch.sigmoid(tau * (log_s.exp() - 1)) * adv).mean()
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-14)
    g, g_want = (torch.autograd.grad(x, logp)[0] for x in (out.loss, want))
    torch.testing.assert_close(g, g_want, rtol=0, atol=1e-14)


# --- hand-computed values on crafted tokens -----------------------------------------------------------


def _crafted(loss_fn, log_w, adv, *, old=-1.2, behavior=None):
    """One sequence of crafted tokens, token-sum: (per-token values, per-token gradients) as floats."""
    log_w = torch.tensor([log_w], dtype=F64)
    old_logp = torch.full_like(log_w, old)
    logp = (old_logp + log_w).requires_grad_(True)
    kw = {} if behavior is None else {"behavior_logp": torch.tensor([behavior], dtype=F64)}
    out = loss_fn.replace(agg="token-sum")(logp, old_logp, torch.tensor([adv], dtype=F64), **kw)
    (g,) = torch.autograd.grad(out.loss, logp)
    return out.per_token[0].tolist(), g[0].tolist()


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_sapo_crafted():
    log_w, adv = [0.0, 0.3, -0.5, -0.2], [1.0, -1.0, 2.0, -0.5]
    value, grad = _crafted(rpg.SAPOLoss(), log_w, adv)
    for lw, a, v, g in zip(log_w, adv, value, grad, strict=True):
        w, tau = math.exp(lw), (1.0 if a > 0 else 1.05)
        s = _sig(tau * (w - 1))
        assert v == pytest.approx(-(4 / tau) * s * a, abs=1e-14)
        assert g == pytest.approx(-4 * s * (1 - s) * w * a, abs=1e-14)
    assert value[0] == pytest.approx(-2.0) and grad[0] == pytest.approx(-1.0)  # w = 1: f = 2/τ, slope 1


def test_gppo_crafted_every_branch():
    #         inside(A>0)  above(A>0)   below(A<0)  above(A<0, no dual)  inside(A<0)
    w = [1.1, 1.5, 0.5, 1.5, 0.9]
    adv = [2.0, 2.0, -1.0, -1.0, -1.0]
    log_w = [math.log(x) for x in w]
    for b_lo, b_hi in [(1.0, 1.0), (0.5, 0.75), (0.0, 0.0)]:
        value, grad = _crafted(rpg.GPPOLoss(0.2, 0.28, b_lo, b_hi), log_w, adv)
        want_v = [-1.1 * 2, -1.28 * 2, -0.8 * -1, -1.5 * -1, -0.9 * -1]
        want_g = [-1.1 * 2, -b_hi * 1.28 * 2, -b_lo * 0.8 * -1, -1.5 * -1, -0.9 * -1]
        assert value == pytest.approx(want_v, abs=1e-14)
        assert grad == pytest.approx(want_g, abs=1e-14)
    # β = 0 is PPO's clip exactly
    ppo = rpg.PolicyLoss(clip=rpg.Clip(0.2, 0.28, None))
    assert _crafted(ppo, log_w, adv) == _crafted(rpg.GPPOLoss(0.2, 0.28, 0.0, 0.0), log_w, adv)


def test_topr_crafted_every_branch():
    log_w, adv = [math.log(2.0), math.log(2.0), math.log(0.5), math.log(0.5), 0.0], [1.5, -1.0, -1.0, 1.5, 0.0]
    value, grad = _crafted(rpg.TOPRLoss(), log_w, adv, old=-1.0)
    logp = [-1.0 + lw for lw in log_w]
    weights = [1.0, 1.0, 0.5, 1.0, 0.5]  # A > 0: 1 (no IS); A ≤ 0: min(w, 1)
    for lp, a, c, v, g in zip(logp, adv, weights, value, grad, strict=True):
        assert v == pytest.approx(-c * a * lp, abs=1e-14)
        assert g == pytest.approx(-c * a, abs=1e-14)


def test_dro_crafted_with_and_without_a_sampler():
    log_w, adv = [0.4, -0.3, 0.0], [1.0, -2.0, 0.5]
    old = -0.9
    value, grad = _crafted(rpg.DROLoss(0.2), log_w, adv, old=old)
    for lw, a, v, g in zip(log_w, adv, value, grad, strict=True):
        lp = old + lw
        assert v == pytest.approx(-a * lp + 0.1 * lw**2, abs=1e-14)
        assert g == pytest.approx(-a + 0.2 * lw, abs=1e-14)
    # with a sampler μ: the penalty anchors on log μ, the whole loss times ρ̄ = min(π_old/μ, 2)
    mu = [-1.5, -0.2, -0.9]
    for weight_penalty in (True, False):
        loss = rpg.DROLoss(0.2, weight_penalty=weight_penalty)
        value, grad = _crafted(loss, log_w, adv, old=old, behavior=mu)
        for lw, a, m, v, g in zip(log_w, adv, mu, value, grad, strict=True):
            lp, rho = old + lw, min(math.exp(old - m), 2.0)
            k = rho if weight_penalty else 1.0
            assert v == pytest.approx(-rho * a * lp + k * 0.1 * (lp - m) ** 2, abs=1e-14)
            assert g == pytest.approx(-rho * a + k * 0.2 * (lp - m), abs=1e-14)


def test_prime_rl_crafted_mask_and_penalty():
    old = math.log(0.5)
    # p − q: +0.3 (A>0: masked), +0.1 (A>0: kept), −0.3 (A<0: masked), +0.3 (A<0: kept: the mask is one-sided)
    probs, adv = [0.8, 0.6, 0.2, 0.8], [1.0, 1.0, -1.0, -1.0]
    log_w = [math.log(p / 0.5) for p in probs]
    value, grad = _crafted(rpg.PrimeRLLoss(kl_tau=0.01), log_w, adv, old=old)
    masked = [True, False, True, False]
    for lw, a, mk, v, g in zip(log_w, adv, masked, value, grad, strict=True):
        w = math.exp(lw)
        pen_v, pen_g = 0.01 * lw**2, 0.02 * lw
        edge = 1 + 0.2 / 0.5 if a > 0 else 1 - 0.2 / 0.5
        assert v == pytest.approx((-edge * a if mk else -w * a) + pen_v, abs=1e-14)
        assert g == pytest.approx((0.0 if mk else -w * a) + pen_g, abs=1e-14)
    out = rpg.PrimeRLLoss(kl_tau=0.01)(
        torch.tensor([[old + x for x in log_w]], dtype=F64), torch.full((1, 4), old, dtype=F64), torch.tensor([adv])
    )
    assert out.metrics["clip_frac"] == pytest.approx(0.5)


# --- exact oracles: what each gradient is, and what it is not -------------------------------------------


def _pg(logits):  # −∇E_θ[A]: the policy gradient every family is measured against
    return lambda p: -T.objective_gradient("rkl", logits, p.ref_logits, p.rewards, 0.0)


def _expected(coef, p, sampler_logits=None):
    """Σ_a q(a)·∇_θ ℓ(a) for ℓ(a) = coef(logp_θ(a), a) differentiable in θ, q = π_old (or the sampler)."""
    theta = p.logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    q = torch.softmax(p.old_logits if sampler_logits is None else sampler_logits, -1)
    (g,) = torch.autograd.grad((q * coef(logp, torch.log_softmax(p.old_logits, -1))).sum(), theta)
    return g


def _rel(a, b):
    return float((a - b).norm() / b.norm())


PROBLEMS = [T.random_problem(6, seed, scale=1.0) for seed in (0, 2, 3)]  # seeds where every rule binds


@pytest.mark.parametrize("p", PROBLEMS)
@pytest.mark.parametrize("name", ["sapo", "gppo", "topr", "dro", "prime-rl"])
def test_on_policy_gradient_is_the_policy_gradient(name, p):
    """θ = θ_old: every family's expected gradient is −∇E[A] (DRO's and prime-rl's penalty has gradient 0)."""
    got = T.expected_gradient(FAMILIES[name][0], p.logits, p.logits, p.rewards)
    torch.testing.assert_close(
        got, -T.objective_gradient("rkl", p.logits, p.ref_logits, p.rewards, 0.0), rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("p", PROBLEMS)
def test_sapo_off_policy_follows_the_gated_surrogate_not_the_policy_gradient(p):
    A = p.rewards
    for tau_pos, tau_neg in [(1.0, 1.05), (3.0, 0.5)]:
        got = T.expected_gradient(rpg.SAPOLoss(tau_pos, tau_neg), p.logits, p.old_logits, A)
        tau = torch.where(A > 0, torch.tensor(tau_pos, dtype=F64), torch.tensor(tau_neg, dtype=F64))
        want = _expected(lambda lp, old, tau=tau: -(4 / tau) * torch.sigmoid(tau * ((lp - old).exp() - 1)) * A, p)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        assert _rel(got, _pg(p.logits)(p)) > 1e-3  # not ∇E[A] off-policy: the gate's slope is < 1 off w = 1


@pytest.mark.parametrize("p", PROBLEMS)
def test_gppo_exact_where_no_bound_binds_and_the_bound_gradient_where_it_does(p):
    A = p.rewards
    wide = rpg.GPPOLoss(low=0.99, high=50.0)  # no ratio of these problems leaves (0.01, 51)
    got = T.expected_gradient(wide, p.logits, p.old_logits, A)
    torch.testing.assert_close(got, _pg(p.logits)(p), rtol=0, atol=1e-10)
    for b_lo, b_hi in [(1.0, 1.0), (0.5, 0.75)]:
        loss = rpg.GPPOLoss(0.1, 0.1, b_lo, b_hi)
        got = T.expected_gradient(loss, p.logits, p.old_logits, A)
        want = _expected(lambda lp, old, b=(b_lo, b_hi): R.gppo_term((lp - old).exp(), A, 0.1, 0.1, *b), p)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        ppo = T.expected_gradient(rpg.PolicyLoss(clip=rpg.Clip(0.1, 0.1, None)), p.logits, p.old_logits, A)
        assert _rel(got, ppo) > 1e-3 and _rel(got, _pg(p.logits)(p)) > 1e-3  # neither PPO's nor the IS gradient


@pytest.mark.parametrize("p", PROBLEMS)
def test_topr_off_policy_is_the_tapered_gradient_not_the_policy_gradient(p):
    A = p.rewards
    got = T.expected_gradient(rpg.TOPRLoss(), p.logits, p.old_logits, A)
    w_bar = lambda lp, old: torch.where(A > 0, torch.ones_like(lp), (lp - old).exp().clamp(max=1.0))  # noqa: E731
    want = _expected(lambda lp, old: -(w_bar(lp, old) * A).detach() * lp, p)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert _rel(got, _pg(p.logits)(p)) > 1e-3


@pytest.mark.parametrize("p", PROBLEMS)
def test_dro_follows_its_objective_under_the_sampler(p):
    """∇ of E_{y∼q}[A·log π_θ − (β/2)(log π_θ − log μ)²] exactly, q the sampler; not ∇E_θ[A] off-policy."""
    A, beta = p.rewards, 0.4
    mu_logits = p.ref_logits  # a sampler μ ≠ π_old
    log_mu = torch.log_softmax(mu_logits, -1)

    def objective(anchor):
        return lambda lp, old: -(A * lp - 0.5 * beta * (lp - anchor(old)) ** 2)

    got = T.expected_gradient(rpg.DROLoss(beta), p.logits, p.old_logits, A)
    torch.testing.assert_close(got, _expected(objective(lambda old: old), p), rtol=0, atol=1e-10)
    assert _rel(got, _pg(p.logits)(p)) > 1e-3
    # tokens from μ, the exact correction π_old/μ on the whole loss: the objective under π_old, anchored on μ
    loss = rpg.DROLoss(beta, correction=UNTRUNCATED)
    got = T.expected_gradient(loss, p.logits, p.old_logits, A, behavior_logits=mu_logits)
    torch.testing.assert_close(got, _expected(objective(lambda old: log_mu), p), rtol=0, atol=1e-10)
    # weight_penalty=False: the policy-gradient part under π_old, the penalty under μ itself
    loss = rpg.DROLoss(beta, weight_penalty=False, correction=UNTRUNCATED)
    got = T.expected_gradient(loss, p.logits, p.old_logits, A, behavior_logits=mu_logits)
    pg = _expected(lambda lp, old: -A * lp, p)
    pen = _expected(lambda lp, old: 0.5 * beta * (lp - log_mu) ** 2, p, sampler_logits=mu_logits)
    torch.testing.assert_close(got, pg + pen, rtol=0, atol=1e-10)


@pytest.mark.parametrize("p", PROBLEMS)
def test_prime_rl_exact_where_nothing_is_masked(p):
    """No token masked: ∇E_θ[A] − τ·∇E_{π_old}[(log π_θ − log π_old)²] exactly; masked: the masked gradient."""
    A, tau = p.rewards, 0.05
    got = T.expected_gradient(rpg.PrimeRLLoss(1.0, 1.0, tau), p.logits, p.old_logits, A)  # |p − q| ≤ 1 always
    pen = _expected(lambda lp, old: tau * (lp - old) ** 2, p)
    torch.testing.assert_close(got, _pg(p.logits)(p) + pen, rtol=0, atol=1e-10)
    got = T.expected_gradient(rpg.PrimeRLLoss(0.02, 0.02, tau), p.logits, p.old_logits, A)
    want = _expected(lambda lp, old: R.prime_rl_term(lp, old, old, A, 0.02, 0.02, tau), p)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert _rel(got, _pg(p.logits)(p) + pen) > 1e-3  # the mask binds on these problems


# --- every aggregation, global counts, options -------------------------------------------------------------


@pytest.mark.parametrize("agg", rpg.AGG_MODES)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_aggregation_shards_sum_to_the_full_batch(name, agg):
    loss_fn = FAMILIES[name][0].replace(agg=agg, max_len=9 if agg == "seq-mean-token-sum-norm" else None)
    logp, old, adv, mask, _ = make_batch(6, 7, seed=8, spread=0.5)
    counts = dict(batch_num_tokens=int(mask.sum()), global_batch_size=6)
    full = loss_fn(logp, old, adv, mask, **counts).loss
    (g_full,) = torch.autograd.grad(full, logp)
    parts = [loss_fn(logp[s], old[s], adv[s], mask[s], **counts).loss for s in (slice(0, 2), slice(2, 6))]
    (g_parts,) = torch.autograd.grad(sum(parts), logp)
    torch.testing.assert_close(sum(parts), full, rtol=0, atol=1e-13)
    torch.testing.assert_close(g_parts, g_full, rtol=0, atol=1e-13)
    assert g_full.abs().sum() > 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_behaviour_policy_weights_and_entropy(name):
    """per_token = ω·ρ̄·ℓ − c_H·H: the correction weight ρ̄ = min(π_old/μ, 2) and the caller's ω multiply the
    family's per-token loss (anchored on μ for DRO and prime-rl), and the entropy bonus is subtracted."""
    loss_fn, ref = FAMILIES[name]
    logp, old, adv, mask, _ = make_batch(4, 6, seed=9, spread=0.5)
    g = torch.Generator().manual_seed(1)
    mu = old + 0.4 * torch.randn(old.shape, generator=g, dtype=F64)
    omega = torch.rand(old.shape, generator=g, dtype=F64)
    entropy = torch.rand(old.shape, generator=g, dtype=F64).requires_grad_(True)
    out = loss_fn.replace(entropy_coef=0.1)(logp, old, adv, mask, behavior_logp=mu, weights=omega, entropy=entropy)
    if name == "dro":
        ell = R.dro_term(logp, mu, _wide(adv, logp), 0.3)
    elif name == "prime-rl":
        ell = R.prime_rl_term(logp, old, mu, _wide(adv, logp), 0.2, 0.2, 1e-3)
    else:
        ell = ref(logp, old, adv, mask)
    rho = (old - mu).exp().clamp(max=2.0)
    want = torch.where(mask, omega * rho * ell - 0.1 * entropy, torch.zeros((), dtype=F64))
    torch.testing.assert_close(out.per_token, want, rtol=0, atol=1e-12)
    want_loss = rpg.aggregate(want, mask, loss_fn.agg)
    torch.testing.assert_close(out.loss, want_loss, rtol=0, atol=1e-12)
    g_out = torch.autograd.grad(out.loss, (logp, entropy))
    g_want = torch.autograd.grad(want_loss, (logp, entropy))
    for a, b in zip(g_out, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_dro_penalty_unweighted_by_the_correction_when_asked():
    logp, old, adv, mask, _ = make_batch(3, 5, seed=10, spread=0.4)
    mu = old - 0.5
    rho = (old - mu).exp().clamp(max=2.0)
    out = rpg.DROLoss(0.3, weight_penalty=False)(logp, old, adv, mask, behavior_logp=mu)
    a = _wide(adv, logp)
    want = torch.where(mask, -rho * a * logp + 0.15 * (logp - mu) ** 2, torch.zeros((), dtype=F64))
    torch.testing.assert_close(out.per_token, want, rtol=0, atol=1e-12)


# --- torch.compile and the fused head ---------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("name", ["sapo-sequence", "ce-gppo", "topr", "dro", "prime-rl"])
def test_compiled_equals_eager(name, device):
    torch._dynamo.reset()
    fn = FAMILIES[name][0]
    logp, old, adv, mask, _ = (x.to(device) for x in make_batch(4, 16, seed=7, dtype=torch.float32))
    logp = logp.detach().requires_grad_(True)
    mu = old - 0.2

    def step(logp, old, adv, mask, mu):
        return fn(logp, old, adv, mask, behavior_logp=mu).loss

    eager = step(logp, old, adv, mask, mu)
    (g_eager,) = torch.autograd.grad(eager, logp)
    got = torch.compile(step, fullgraph=True)(logp, old, adv, mask, mu)
    (g_got,) = torch.autograd.grad(got, logp)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_head_equals_from_hidden_plus_loss(name):
    loss_fn = FAMILIES[name][0]
    g = torch.Generator().manual_seed(11)
    b, t, h, v = 4, 6, 5, 30
    hidden = torch.randn(b, t, h, generator=g, dtype=F64).requires_grad_(True)
    weight = torch.randn(v, h, generator=g, dtype=F64).requires_grad_(True)
    tokens = torch.randint(0, v, (b, t), generator=g)
    with torch.no_grad():
        lp0 = from_hidden(hidden, weight, tokens)
    old = lp0 + 0.4 * torch.randn(b, t, generator=g, dtype=F64)
    mu = old + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[:, 0] = True
    omega = torch.rand(b, t, generator=g, dtype=F64)
    kw = dict(behavior_logp=mu, weights=omega, batch_num_tokens=int(mask.sum()) + 3, global_batch_size=b + 1)
    ref = loss_fn(from_hidden(hidden, weight, tokens), old, adv, mask, **kw)
    g_ref = torch.autograd.grad(ref.loss, (hidden, weight))
    for chunk in (None, 5):
        out = FusedLinearLoss(loss_fn, chunk_size=chunk)(hidden, weight, tokens, old, adv, mask, **kw)
        g_out = torch.autograd.grad(out.loss, (hidden, weight))
        torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12)
        for a, r in zip(g_out, g_ref, strict=True):
            torch.testing.assert_close(a, r, rtol=0, atol=1e-10)


# --- second derivatives, metrics, settings and errors -------------------------------------------------------


def test_second_derivatives():
    """TOPR is linear in logp (double backward: exactly 0); DRO's squared penalty is not (it raises)."""
    logp, old, adv, mask, _ = make_batch(3, 4, seed=12)
    (g,) = torch.autograd.grad(rpg.TOPRLoss()(logp, old, adv, mask).loss, logp, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), logp, allow_unused=True)
    assert h is None or (h == 0).all()
    (g,) = torch.autograd.grad(rpg.DROLoss(0.1)(logp, old, adv, mask).loss, logp, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives") as err:
        torch.autograd.grad(g.sum(), logp)
    # the message names DRO's cause (a separate KL term in the REINFORCE style), not the differentiable style
    assert "separate_kl" in str(err.value) and "style='differentiable' loss" not in str(err.value)


def test_configurations_and_reprs():
    assert rpg.SAPOLoss().clip == rpg.SoftGate(1.0, 1.05) and rpg.SAPOLoss().agg == "seq-mean-token-mean"
    assert repr(rpg.SAPOLoss()) == "SAPOLoss(tau_pos=1.0, tau_neg=1.05, agg='seq-mean-token-mean')"
    assert rpg.TOPRLoss().clip == rpg.SignedTruncate(rpg.Truncate.at(1.0, 1.0), rpg.Truncate.at(0.0, 1.0))
    assert rpg.GPPOLoss().clip == rpg.GradientPreservingClip(0.2, 0.28, 1.0, 1.0)
    dro = rpg.DROLoss(0.1)
    assert (dro.kl, dro.beta, dro.style, dro.kl_anchor, dro.separate_kl) == ("k2", 0.1, "reinforce", "behavior", True)
    prime = rpg.PrimeRLLoss()
    assert (prime.kl, prime.beta, prime.kl_anchor, prime.clip) == ("k2", 2e-3, "behavior", rpg.TrustRegion(0.2, 0.2))
    for loss in (rpg.SAPOLoss(), rpg.TOPRLoss(), rpg.GPPOLoss(), dro, prime):
        logp, old, adv, mask, _ = make_batch(seed=13)
        same = rpg.PolicyLoss(**loss.config)
        torch.testing.assert_close(loss(logp, old, adv, mask).per_token, same(logp, old, adv, mask).per_token)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: rpg.SoftGate(0.0, 1.0), ValueError, "tau_pos"),
        (lambda: rpg.SoftGate(1.0, -1.0), ValueError, "tau_neg"),
        (lambda: rpg.SoftGate(float("inf"), 1.0), ValueError, "tau_pos"),
        (lambda: rpg.SAPOLoss(tau_pos=0), ValueError, "tau_pos"),
        (lambda: rpg.SoftGate("a", 1.0), TypeError, "tau_pos"),
        (lambda: rpg.PolicyLoss(style="reinforce", clip=rpg.SoftGate()), ValueError, "differentiable"),
        (lambda: rpg.GradientPreservingClip(1.0), ValueError, "low"),
        (lambda: rpg.GPPOLoss(beta_low=-0.5), ValueError, "beta_low"),
        (lambda: rpg.GPPOLoss(beta_high=None), TypeError, "beta_high"),
        (lambda: rpg.PolicyLoss(style="reinforce", clip=rpg.GradientPreservingClip()), ValueError, "differentiable"),
        (lambda: rpg.SignedTruncate(), ValueError, "at least one"),
        (lambda: rpg.SignedTruncate(positive=rpg.Clip()), TypeError, "positive"),
        (lambda: rpg.PolicyLoss(clip=rpg.SignedTruncate(negative=rpg.Truncate())), ValueError, "reinforce"),
        (
            lambda: rpg.TOPRLoss().replace(style="reinforce", ratio="geometric"),
            ValueError,
            "differentiable",
        ),
        (lambda: rpg.DROLoss(0.0), ValueError, "beta > 0"),
        (lambda: rpg.DROLoss(-1.0), ValueError, "beta"),
        (lambda: rpg.DROLoss(0.1, weight_penalty=1), TypeError, "weight_penalty"),
        (lambda: rpg.PrimeRLLoss(kl_tau=-1e-3), ValueError, "kl_tau"),
        (lambda: rpg.PrimeRLLoss(low=-0.1), ValueError, "low"),
        (lambda: rpg.PolicyLoss(kl_anchor="sampler"), ValueError, "kl_anchor"),
        (lambda: rpg.PolicyLoss(kl_anchor="behavior"), ValueError, "KL term"),
        (lambda: rpg.PolicyLoss(kl="k2", beta=0.1, separate_kl=True), ValueError, "reinforce"),
        (lambda: rpg.PolicyLoss(style="reinforce", separate_kl=True), ValueError, "KL term"),
        (lambda: rpg.PolicyLoss(kl="k2", beta=0.1, style="reinforce", weight_kl=False), ValueError, "separate_kl"),
    ],
)
def test_bad_settings_raise(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_a_reference_logp_is_refused_where_the_penalty_anchors_on_the_sampler():
    logp, old, adv, mask, ref = make_batch(seed=14)
    for loss in (rpg.DROLoss(0.1), rpg.PrimeRLLoss()):
        with pytest.raises(ValueError, match="ref_logp"):
            loss(logp, old, adv, mask, ref_logp=ref)


def test_separate_kl_with_weight_kl_false_weights_only_the_policy_gradient():
    """The general form under DRO: REINFORCE style, a separate KL term, multipliers on the PG term only."""
    logp, old, adv, mask, ref = make_batch(3, 5, seed=15, spread=0.4)
    omega = torch.rand(3, 5, dtype=F64)
    loss = rpg.PolicyLoss(kl="k3", beta=0.2, style="reinforce", separate_kl=True, weight_kl=False)
    out = loss(logp, old, adv, mask, ref_logp=ref, weights=omega)
    w = (logp - old).exp().detach()
    k3 = (ref - logp).exp() - (ref - logp) - 1
    want = torch.where(mask, -omega * (w * _wide(adv, logp)) * logp + 0.2 * k3, torch.zeros((), dtype=F64))
    torch.testing.assert_close(out.per_token, want, rtol=0, atol=1e-12)
    g, g_want = (torch.autograd.grad(x.sum(), logp)[0] for x in (out.per_token, want))
    torch.testing.assert_close(g, g_want, rtol=0, atol=1e-12)


def test_prime_rl_gradient_is_prime_rls_and_the_value_differs_only_at_masked_tokens():
    """prime-rl's default_loss_fn as it prints it: −keep·A·w + τ·(log w)² over the loss mask (bypass: the ratio
    on the sampler). Same gradient; prime-rl's masked token has value 0 (rpg's: the region's edge, detached)."""
    logp, mu, adv, mask, _ = make_batch(4, 6, seed=16, spread=0.6, adv_shape="tok")
    tau = 1e-3
    p, q = logp.detach().exp(), mu.exp()
    masked = torch.where(adv > 0, p - q > 0.05, p - q < -0.05)
    log_w = logp - mu
    keep = (~masked).to(F64)
    prime = torch.where(mask, -keep * adv * log_w.exp() + tau * log_w**2, torch.zeros((), dtype=F64))
    out = rpg.PrimeRLLoss(0.05, 0.05, tau, agg="token-sum")(logp, mu, adv, mask)  # old_logp = behavior_logp
    g, g_prime = (torch.autograd.grad(x.sum(), logp)[0] for x in (out.per_token, prime))
    torch.testing.assert_close(g, g_prime, rtol=0, atol=1e-12)
    assert (masked & mask).any() and (~masked & mask).any()
    torch.testing.assert_close(out.per_token[~masked], prime[~masked], rtol=0, atol=1e-12)
    assert not torch.allclose(out.per_token[masked & mask], prime[masked & mask])


def test_float32_overflowing_ratio_under_the_gate_and_the_kept_clip():
    """|log w| beyond float32's range: SAPO's gate saturates (value 4/τ·(−A), gradient exactly 0) and GPPO keeps
    the bounded gradient at the bound; both finite."""
    logp = torch.tensor([[0.0, -1.0]], dtype=torch.float32, requires_grad=True)
    old = torch.tensor([[-200.0, -1.0]], dtype=torch.float32)
    adv = torch.tensor([1.0])
    out = rpg.SAPOLoss(agg="token-sum")(logp, old, adv)
    (g,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(out.per_token).all() and torch.isfinite(g).all()
    assert out.per_token[0, 0].item() == pytest.approx(-4.0) and g[0, 0].item() == 0.0
    out = rpg.GPPOLoss(agg="token-sum")(logp, old, adv)
    (g,) = torch.autograd.grad(out.loss, logp)
    assert out.per_token[0, 0].item() == pytest.approx(-1.28) and g[0, 0].item() == pytest.approx(-1.28)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_padding_garbage_is_inert_and_an_empty_mask_gives_zero(name):
    loss_fn = FAMILIES[name][0]
    logp, old, adv, mask, _ = make_batch(4, 6, seed=17, spread=0.5, adv_shape="tok")
    mu = old - 0.3
    pad = ~mask
    results = []
    for dirty in (False, True):
        lp = logp.detach().clone()
        o, a, m = old.clone(), adv.clone(), mu.clone()
        if dirty:
            for x, v in ((lp, float("nan")), (o, float("inf")), (a, float("nan")), (m, -float("inf"))):
                x[pad] = v
        lp.requires_grad_(True)
        out = loss_fn(lp, o, a, mask, behavior_logp=m)
        (g,) = torch.autograd.grad(out.loss, lp)
        results.append((out.loss, g, out.metrics["clip_frac"]))
    (l0, g0, c0), (l1, g1, c1) = results
    assert torch.isfinite(l1) and torch.isfinite(g1).all()
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    assert c1 == c0
    empty = torch.zeros_like(mask)
    out = loss_fn(logp, old, adv, empty, behavior_logp=mu)
    (g,) = torch.autograd.grad(out.loss, logp)
    assert out.loss.item() == 0 and (g == 0).all()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_inputs_are_computed_in_float32(name):
    loss_fn = FAMILIES[name][0]
    logp, old, adv, mask, _ = make_batch(3, 5, seed=18, spread=0.4)
    lp16, old16, adv16 = logp.detach().bfloat16(), old.bfloat16(), adv.bfloat16()
    lp16.requires_grad_(True)
    lp32 = lp16.detach().float().requires_grad_(True)
    a = loss_fn(lp16, old16, adv16, mask)
    b = loss_fn(lp32, old16.float(), adv16.float(), mask)
    assert a.loss.dtype == torch.float32
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    (g16,) = torch.autograd.grad(a.loss, lp16)
    (g32,) = torch.autograd.grad(b.loss, lp32)
    torch.testing.assert_close(g16.float(), g32.bfloat16().float(), rtol=0, atol=0)


def test_clip_fractions_count_only_truncated_importance_weights():
    """DRO uses no importance weight (w̄ = 1 by construction) and TOPR none on its positives: neither is a
    truncation, so off-policy neither counts as clipped (else clip_frac reads ≈ 1 on any stale batch).
    TOPR's negatives with w > 1 are truncated to 1 and are counted (clip_frac/high)."""
    log_w = torch.tensor([[0.5, -0.5, 0.3, -0.2]], dtype=F64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=F64)
    old = torch.full((1, 4), -1.0, dtype=F64)
    dro = rpg.DROLoss(0.1)(old + log_w, old, adv).metrics
    assert dro["clip_frac"] == 0.0
    topr = rpg.TOPRLoss()(old + log_w, old, adv).metrics
    assert topr["clip_frac/high"] == pytest.approx(0.25) and topr["clip_frac/low"] == 0.0
    assert topr["clip_frac"] == pytest.approx(0.25)
    # a truncation that binds is still counted: CISPO's cap, and TOPR's negative side alone
    cispo = rpg.CISPOLoss(clip=rpg.Truncate.at(None, 1.5))(old + log_w, old, adv).metrics
    assert cispo["clip_frac/high"] == pytest.approx(0.25)


def _authors_gppo(logp, old, adv, mask, low, high, beta_low, beta_high, dual):
    """The GPPO / CE-GPPO loss as the authors' training code computes it (Kwai-Klear/CE-GPPO,
    ``compute_gppo_loss_general_beta``), rewritten here: the kept gradient β·bound·w/sg(w) on the two
    clipped sides, then verl's dual clip min(·, −A·c) for negative advantages; token-mean."""
    w = (logp - old).exp()
    w_d = w.detach()
    below = (w_d < 1 - low) & (adv < 0)
    above = (w_d > 1 + high) & (adv > 0)
    term = torch.where(
        below,
        -beta_low * (1 - low) * w / w_d * adv,
        torch.where(above, -beta_high * (1 + high) * w / w_d * adv, -w * adv),
    )
    term = torch.where(adv < 0, torch.minimum(term, -adv * dual), term)
    return (term * mask).sum() / mask.sum()


def test_gppo_dual_clip_equals_the_authors_code():
    """The authors' code (GPPO and CE-GPPO alike) runs verl's dual clip c = 3 on negative advantages:
    ``dual=3.0`` reproduces its loss and gradient; the default (the papers' formula) has none."""
    logp, old, adv, mask, _ = make_batch(4, 7, seed=21, spread=1.5)
    adv = torch.randn(4, 7, dtype=F64, generator=torch.Generator().manual_seed(3))
    w = (logp - old).exp()
    assert ((w > 3) & (adv < 0) & mask).any() and ((w > 1.28) & (adv > 0) & mask).any()
    for b_lo, b_hi in [(1.0, 1.0), (0.25, 1.0)]:  # GPPO; CE-GPPO with the authors' code defaults
        loss = rpg.GPPOLoss(beta_low=b_lo, beta_high=b_hi, dual=3.0)
        lp = logp.detach().clone().requires_grad_(True)
        out = loss(lp, old, adv, mask)
        (g,) = torch.autograd.grad(out.loss, lp)
        lp2 = logp.detach().clone().requires_grad_(True)
        want = _authors_gppo(lp2, old, adv, mask, 0.2, 0.28, b_lo, b_hi, 3.0)
        (g2,) = torch.autograd.grad(want, lp2)
        torch.testing.assert_close(g, g2, rtol=0, atol=1e-12)
        if b_lo == b_hi == 1.0:  # CE-GPPO's value is β·bound·A where a bound binds, here PPO's (docstring)
            torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-12)
    assert out.metrics["clip_frac/dual"] > 0
    # without it the dual-clipped tokens keep −w·A: the default differs from the authors' code there
    assert not torch.allclose(torch.autograd.grad(rpg.GPPOLoss(beta_low=0.25)(lp, old, adv, mask).loss, lp)[0], g2)
    assert repr(rpg.GPPOLoss()) == "GPPOLoss(low=0.2, high=0.28, beta_low=1.0, beta_high=1.0, agg='token-mean')"
    assert "dual=3.0" in repr(loss) and loss.clip == rpg.GradientPreservingClip(0.2, 0.28, 0.25, 1.0, dual=3.0)
    with pytest.raises(ValueError, match="dual"):
        rpg.GradientPreservingClip(dual=1.0)


def test_topr_with_a_kl_term_counts_clipped_tokens_by_the_sign_of_the_advantage():
    """TOPR truncates by the sign of the advantage A (arXiv 2503.14286); with a KL term the REINFORCE weight
    g = w̄·(A − β·log ρ) (urkl) can have the other sign, and clip_frac must follow the truncation the loss
    applies, not sign(g). Crafted (old = −2, β = 1), token by token:

    | A | log w | log ρ | branch (A) | w̄ | g | truncated |
    |---|---|---|---|---|---|---|
    | +0.1 | 0.5 | +1 | positive (w̄ = 1, no IS weight) | 1 | −0.9 | no |
    | −0.1 | 0.5 | −1 | negative (min(w, 1)) | 1 | +0.9 | yes: w > 1 |
    | +0.1 | 0.3 | +1 | positive | 1 | −0.9 | no |
    | −1 | −0.5 | 0 | negative | e^−0.5 | −e^−0.5 | no |

    so clip_frac = clip_frac/high = 1/4 (sign(g) would pick the other branch at the first three tokens and
    read 2/4)."""
    old = torch.full((1, 4), -2.0, dtype=F64)
    log_w = torch.tensor([[0.5, 0.5, 0.3, -0.5]], dtype=F64)
    log_rho = torch.tensor([[1.0, -1.0, 1.0, 0.0]], dtype=F64)
    adv = torch.tensor([[0.1, -0.1, 0.1, -1.0]], dtype=F64)
    logp = (old + log_w).requires_grad_(True)
    ref = logp.detach() - log_rho
    fn = rpg.TOPRLoss().replace(kl="urkl", beta=1.0)
    out = fn(logp, old, adv, None, ref_logp=ref)
    g = torch.tensor([[-0.9, 0.9, -0.9, -math.exp(-0.5)]], dtype=F64)  # the premise: sign(g) ≠ sign(A) at three
    torch.testing.assert_close(torch.autograd.grad(out.loss, logp)[0], -g / 4, rtol=0, atol=1e-14)
    m = out.metrics
    assert m["clip_frac/high"] == pytest.approx(0.25, abs=1e-15) and m["clip_frac/low"] == 0.0
    assert m["clip_frac"] == pytest.approx(0.25, abs=1e-15)
    # without the KL term the two signs agree and so do the counts
    assert rpg.TOPRLoss()(logp, old, adv, None).metrics["clip_frac"] == pytest.approx(0.25, abs=1e-15)


def test_prime_rl_without_its_penalty_accepts_and_ignores_a_reference():
    """kl_tau = 0 is no KL term: a ref_logp is accepted and unused, as by every loss with β = 0
    (GRPOLoss(beta=0) too); with τ > 0 the penalty is anchored on the sampler and a ref_logp is refused."""
    logp, old, adv, mask, ref = make_batch(3, 5, seed=4)
    for fn in (rpg.PrimeRLLoss(kl_tau=0.0), rpg.GRPOLoss(beta=0.0)):
        with_ref = fn(logp, old, adv, mask, ref_logp=ref)
        torch.testing.assert_close(with_ref.loss, fn(logp, old, adv, mask).loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="kl_anchor='behavior'"):
        rpg.PrimeRLLoss()(logp, old, adv, mask, ref_logp=ref)
