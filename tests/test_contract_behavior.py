"""Black-box contract tests: the behaviour policy μ, ``RolloutCorrection``, ``weights=`` and the
entropy bonus.

Written against the public call contract only (the four policies μ, π_old, π_ref, π_θ; the
constant weight ρ_t = π_old/μ = exp(old_logp − behavior_logp) that multiplies the whole per-token
loss before aggregation; absolute bounds; the sequence weight Π_t ρ_t; per-token ``weights``; the
entropy bonus loss − c_H·agg(entropy)). The exact oracles below are written here, independently of
``rpg.testing``: a tabular softmax policy over K actions (one step) and over two-token responses.
Everything is float64 and compared to 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch

import rpg
import rpg.kl

from .conftest import shift_to_logprobs

F64 = torch.float64
DIVS = ("fkl", "rkl", "ufkl", "urkl")
STYLES = ("differentiable", "reinforce")
RPG_VARIANTS = [(d, s) for d in DIVS for s in STYLES]
EXACT = dict(rtol=0.0, atol=1e-10)
UNTRUNCATED = dict(lower=None, upper=None)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def make_batch(b=4, t=6, seed=0, spread=0.4, mismatch=0.5):
    """Random off-policy batch with μ ≠ π_old ≠ π_ref ≠ π_θ and ragged padding.

    Returns logp (leaf, requires grad), old, ref, behavior, advantages [B], mask (bool).
    """
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 2.5 - 0.05
    logp = (old + spread * torch.randn(b, t, generator=g, dtype=F64)).requires_grad_(True)
    ref = old + spread * torch.randn(b, t, generator=g, dtype=F64)
    beh = old + mismatch * torch.randn(b, t, generator=g, dtype=F64)
    old, logp, ref, beh = shift_to_logprobs(old, logp.detach(), ref, beh)
    logp.requires_grad_(True)
    adv = torch.randn(b, generator=g, dtype=F64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return logp, old, ref, beh, adv, mask


def grad_of(scalar, x):
    (g,) = torch.autograd.grad(scalar, x, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def all_loss_classes(t):
    """Every loss class with β > 0 where it has one, so the KL term is exercised too."""
    out = [(f"RPGLoss-{d}-{s}", rpg.RPGLoss(d, style=s, beta=0.3)) for d, s in RPG_VARIANTS]
    out += [
        ("GRPOLoss-unweighted", rpg.GRPOLoss(beta=0.2, importance_weighted_kl=False)),
        ("GRPOLoss-weighted", rpg.GRPOLoss(beta=0.2, importance_weighted_kl=True)),
        ("DAPOLoss", rpg.DAPOLoss()),
        ("DrGRPOLoss", rpg.DrGRPOLoss(max_len=t)),
        ("CISPOLoss", rpg.CISPOLoss()),
        ("GSPOLoss", rpg.GSPOLoss()),
        ("REINFORCEPlusPlusLoss", rpg.REINFORCEPlusPlusLoss()),
        ("OnPolicyDistillationLoss", rpg.OnPolicyDistillationLoss(beta=0.5)),
    ]
    return out


def token_mean(x, mask):
    m = mask.to(x.dtype)
    return torch.where(mask, x, torch.zeros_like(x)).sum() / m.sum()


def seq_mean_token_mean(x, mask):
    m = mask.to(x.dtype)
    per_seq = torch.where(mask, x, torch.zeros_like(x)).sum(-1) / m.sum(-1)
    return per_seq.mean()


AGG_ORACLE = {"token-mean": token_mean, "seq-mean-token-mean": seq_mean_token_mean}


# ----------------------------------------------------------------------------------------------
# 1. behavior_logp = None  ≡  behavior_logp = old_logp   (ρ = 1)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("idx", range(16))
def test_behavior_equal_old_changes_nothing_default_correction(idx):
    """μ = π_old: every loss class gives the same loss, per_token, gradient and metrics."""
    logp, old, ref, _, adv, mask = make_batch(b=5, t=7, seed=10 + idx, spread=0.6)  # clips bind on some tokens
    name, loss_fn = all_loss_classes(7)[idx]
    a = loss_fn(logp, old, adv, mask, ref_logp=ref)
    b = loss_fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=old.clone())
    assert torch.equal(a.loss, b.loss), name
    assert torch.equal(a.per_token, b.per_token), name
    assert torch.equal(grad_of(a.loss, logp), grad_of(b.loss, logp)), name
    assert torch.equal(grad_of(a.per_token.sum(), logp), grad_of(b.per_token.sum(), logp)), name
    ma, mb = a.metrics, b.metrics
    for k in ma:
        if not k.startswith("rollout_corr/"):
            assert k in mb, (name, k)
            assert float(ma[k]) == float(mb[k]) or (math.isnan(float(ma[k])) and math.isnan(float(mb[k]))), (name, k)


@pytest.mark.parametrize(
    "correction",
    [
        rpg.RolloutCorrection(**UNTRUNCATED),
        rpg.RolloutCorrection(level="sequence", **UNTRUNCATED),
        rpg.RolloutCorrection(level="sequence", mode="mask", lower=0.5, upper=2.0),
        rpg.RolloutCorrection(mode="mask", lower=0.5, upper=2.0),
    ],
    ids=["token-exact", "seq-exact", "seq-mask", "token-mask"],
)
@pytest.mark.parametrize("d,s", RPG_VARIANTS)
def test_behavior_equal_old_changes_nothing_any_correction_with_one_in_band(correction, d, s):
    logp, old, ref, _, adv, mask = make_batch(seed=3)
    plain = rpg.RPGLoss(d, style=s, beta=0.3)
    corr = rpg.RPGLoss(d, style=s, beta=0.3, correction=correction)
    a = plain(logp, old, adv, mask, ref_logp=ref)
    b = corr(logp, old, adv, mask, ref_logp=ref, behavior_logp=old.clone())
    c = corr(logp, old, adv, mask, ref_logp=ref)  # no behavior_logp: the correction is not used
    for o in (b, c):
        assert torch.equal(a.loss, o.loss)
        assert torch.equal(a.per_token, o.per_token)
        assert torch.equal(grad_of(a.loss, logp), grad_of(o.loss, logp))


def test_every_loss_class_takes_correction_and_entropy_coef():
    corr = rpg.RolloutCorrection(level="sequence", **UNTRUNCATED)
    ctors = [
        lambda **k: rpg.RPGLoss("rkl", **k),
        lambda **k: rpg.GRPOLoss(**k),
        lambda **k: rpg.DAPOLoss(**k),
        lambda **k: rpg.DrGRPOLoss(max_len=6, **k),
        lambda **k: rpg.CISPOLoss(**k),
        lambda **k: rpg.GSPOLoss(**k),
        lambda **k: rpg.REINFORCEPlusPlusLoss(**k),
        lambda **k: rpg.OnPolicyDistillationLoss(**k),
        lambda **k: rpg.PolicyLoss(kl="k3", beta=0.1, **k),
    ]
    for ctor in ctors:
        fn = ctor(correction=corr, entropy_coef=0.01)
        assert fn.correction == corr
        assert fn.entropy_coef == 0.01


# ----------------------------------------------------------------------------------------------
# 2. One-step exactness under μ-sampling
# ----------------------------------------------------------------------------------------------


class OneStep:
    """A tabular softmax problem over K actions with four distinct policies."""

    def __init__(self, k=5, seed=0, scale=0.8):
        g = torch.Generator().manual_seed(seed)
        r = lambda: scale * torch.randn(k, generator=g, dtype=F64)  # noqa: E731
        self.theta = r()
        self.theta_old = self.theta + 0.5 * r()
        self.theta_ref = self.theta + 0.5 * r()
        self.theta_mu = self.theta_old + 0.6 * r()
        self.adv = torch.randn(k, generator=g, dtype=F64)
        self.k = k

    def objective_grad(self, div, beta):
        """∇J for J(θ) = Σ_a π_θ(a)·A(a) − β·D(π_θ, π_ref), D exact over the support."""
        th = leaf(self.theta)
        logp = torch.log_softmax(th, -1)
        ref = torch.log_softmax(self.theta_ref, -1)
        J = (logp.exp() * self.adv).sum()
        if beta:
            J = J - beta * rpg.kl.divergence(div, logp, ref)
        return grad_of(J, th)

    def expected_grad(self, loss_fn, *, sample="mu", pass_behavior=True):
        """Σ_a q(a)·∇ℓ(a), q = μ or π_old, ℓ(a) = per_token of a [K, 1] batch holding each action once."""
        th = leaf(self.theta)
        logp = torch.log_softmax(th, -1)[:, None]
        old = torch.log_softmax(self.theta_old, -1)[:, None]
        ref = torch.log_softmax(self.theta_ref, -1)[:, None]
        mu = torch.log_softmax(self.theta_mu, -1)[:, None]
        mask = torch.ones(self.k, 1, dtype=torch.bool)
        kw = dict(ref_logp=ref)
        if pass_behavior:
            kw["behavior_logp"] = mu
        out = loss_fn(logp, old, self.adv, mask, **kw)
        q = (mu if sample == "mu" else old).exp()
        return grad_of((q * out.per_token).sum(), th)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("d,s", RPG_VARIANTS)
def test_token_weight_is_exact_under_mu(d, s, seed):
    """E_μ[∇(sg(ρ)·ℓ)] = Σ_a μ·(π_old/μ)·∇ℓ = E_{π_old}[∇ℓ] = −∇J, with μ ≠ π_old ≠ π_ref ≠ π_θ."""
    p = OneStep(seed=seed)
    beta = 0.7
    fn = rpg.RPGLoss(d, style=s, beta=beta, clip=None, correction=rpg.RolloutCorrection(**UNTRUNCATED))
    want = -p.objective_grad(d, beta)
    got = p.expected_grad(fn)
    torch.testing.assert_close(got, want, **EXACT)
    # sanity of the oracle itself: without μ, sampling from π_old is exact too
    plain = rpg.RPGLoss(d, style=s, beta=beta, clip=None)
    torch.testing.assert_close(p.expected_grad(plain, sample="old", pass_behavior=False), want, **EXACT)


@pytest.mark.parametrize("d,s", RPG_VARIANTS)
def test_without_correction_mu_sampling_is_biased(d, s):
    """The same loss without behavior_logp, tokens from μ: Σ μ∇ℓ ≠ −∇J (the mismatch is real)."""
    p = OneStep(seed=0)
    beta = 0.7
    plain = rpg.RPGLoss(d, style=s, beta=beta, clip=None)
    want = -p.objective_grad(d, beta)
    got = p.expected_grad(plain, sample="mu", pass_behavior=False)
    assert (got - want).abs().max() > 1e-4


@pytest.mark.parametrize("d,s", [("rkl", "reinforce"), ("ufkl", "differentiable")])
def test_mask_mode_with_a_band_that_never_binds_is_exact(d, s):
    p = OneStep(seed=2)
    corr = rpg.RolloutCorrection(mode="mask", lower=1e-3, upper=1e3)
    fn = rpg.RPGLoss(d, style=s, beta=0.4, clip=None, correction=corr)
    torch.testing.assert_close(p.expected_grad(fn), -p.objective_grad(d, 0.4), **EXACT)


def test_truncation_that_binds_is_biased_by_the_oracle():
    """Truncation trades exactness for variance: with an upper bound below max ρ, the gradient is off."""
    p = OneStep(seed=0)
    rho = (torch.log_softmax(p.theta_old, -1) - torch.log_softmax(p.theta_mu, -1)).exp()
    upper = float(rho.max()) * 0.6
    assert upper > float(rho.min())
    fn = rpg.RPGLoss("rkl", style="reinforce", beta=0.4, clip=None, correction=rpg.RolloutCorrection(upper=upper))
    assert (p.expected_grad(fn) + p.objective_grad("rkl", 0.4)).abs().max() > 1e-4


@pytest.mark.parametrize(
    "make,div",
    [
        (lambda: rpg.GRPOLoss(beta=0.6, clip=None, importance_weighted_kl=True), "urkl"),
        (lambda: rpg.OnPolicyDistillationLoss(beta=0.6), "rkl"),
    ],
    ids=["GRPO-iw-kl", "OPD"],
)
def test_presets_exact_for_their_objective_under_mu(make, div):
    """GRPO with the importance-weighted k3 (= URKL surrogate) and on-policy distillation (reverse KL)
    keep their exactness under μ-sampling with the untruncated token weight."""
    p = OneStep(seed=4)
    fn = make()
    fn = fn.replace(correction=rpg.RolloutCorrection(**UNTRUNCATED))
    torch.testing.assert_close(p.expected_grad(fn), -p.objective_grad(div, 0.6), **EXACT)


# ----------------------------------------------------------------------------------------------
# 3. Two-token sequences: only Π_t ρ_t is exact for an outcome reward
# ----------------------------------------------------------------------------------------------


class TwoStep:
    """Responses y = (a, b), π(y) = π(a)·π(b|a), first-token logits [K], second [K, K]."""

    def __init__(self, k=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: 0.9 * torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
        self.k = k
        self.t1, self.t2 = r(k), r(k, k)
        self.o1, self.o2 = self.t1 + 0.5 * r(k), self.t2 + 0.5 * r(k, k)
        self.r1, self.r2 = self.t1 + 0.5 * r(k), self.t2 + 0.5 * r(k, k)
        self.m1, self.m2 = self.t1 + 0.7 * r(k), self.t2 + 0.7 * r(k, k)
        self.R = torch.randn(k * k, generator=g, dtype=F64)

    def token_logp(self, l1, l2):
        """[K², 2]: (log π(a), log π(b|a)) for y = (a, b) in row a·K + b."""
        k = self.k
        a = torch.arange(k).repeat_interleave(k)
        b = torch.arange(k).repeat(k)
        lp1 = torch.log_softmax(l1, -1)[a]
        lp2 = torch.log_softmax(l2, -1)[a, b]
        return torch.stack([lp1, lp2], -1)

    def expected_grad(self, loss_fn, *, on_policy, sample="mu", pass_behavior=True, beta_ref=False):
        t1, t2 = leaf(self.t1), leaf(self.t2)
        logp = self.token_logp(t1, t2)
        old = logp.detach().clone() if on_policy else self.token_logp(self.o1, self.o2)
        mu = self.token_logp(self.m1, self.m2)
        ref = self.token_logp(self.r1, self.r2)
        mask = torch.ones(self.k * self.k, 2, dtype=torch.bool)
        kw = dict(ref_logp=ref)
        if pass_behavior:
            kw["behavior_logp"] = mu
        out = loss_fn(logp, old, self.R, mask, **kw)
        q = (mu if sample == "mu" else old).sum(-1).exp()  # sequence probability μ(y) or π_old(y)
        S = (q[:, None] * out.per_token).sum()
        return torch.cat([grad_of(S, t1).flatten(), grad_of(S, t2).flatten()])

    def reward_grad(self):
        """∇_θ E_{π_θ}[R] = ∇ Σ_y π_θ(a)π_θ(b|a)·R(y)."""
        t1, t2 = leaf(self.t1), leaf(self.t2)
        J = (self.token_logp(t1, t2).sum(-1).exp() * self.R).sum()
        return torch.cat([grad_of(J, t1).flatten(), grad_of(J, t2).flatten()])


SEQ_LOSSES = [
    ("rpg-fkl-diff", lambda c: rpg.RPGLoss("fkl", beta=0.0, clip=None, agg="token-sum", correction=c)),
    (
        "rpg-urkl-rf",
        lambda c: rpg.RPGLoss("urkl", style="reinforce", beta=0.0, clip=None, agg="token-sum", correction=c),
    ),
    ("dapo", lambda c: rpg.DAPOLoss(agg="token-sum", correction=c)),
    ("cispo", lambda c: rpg.CISPOLoss(agg="token-sum", correction=c)),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,make", SEQ_LOSSES, ids=[n for n, _ in SEQ_LOSSES])
def test_sequence_weight_exact_for_outcome_reward(name, make, seed):
    """Outcome reward, β = 0, π_old = π_θ (the trainer's recompute), μ ≠ π_θ.

    Per sequence y = (a, b) the loss has two tokens with ∇ℓ_t = −w_t·R(y)·∇log π_θ(y_t | y_<t),
    w_t = 1 here (π_old = π_θ; no clip can bind at w = 1). With the sequence weight
    ρ(y) = Π_t π_old(y_t|·)/μ(y_t|·) = π_θ(y)/μ(y) at both tokens, the expected gradient over
    μ-sampled sequences is
        Σ_y μ(y)·ρ(y)·Σ_t (−R(y)·∇log π_θ(y_t|·)) = −Σ_y π_θ(y)·R(y)·∇log π_θ(y) = −∇E_{π_θ}[R].
    The token weight gives Σ_y μ(y)[ρ_1·(−R∇log π(a)) + ρ_2·(−R∇log π(b|a))]
    = −Σ_y [π(a)μ(b|a)·R∇log π(a) + μ(a)π(b|a)·R∇log π(b|a)]: the prefix / continuation still
    come from μ, so it is biased.
    """
    p = TwoStep(seed=seed)
    want = -p.reward_grad()
    seq = make(rpg.RolloutCorrection(level="sequence", **UNTRUNCATED))
    torch.testing.assert_close(p.expected_grad(seq, on_policy=True), want, **EXACT)
    tok = make(rpg.RolloutCorrection(level="token", **UNTRUNCATED))
    assert (p.expected_grad(tok, on_policy=True) - want).abs().max() > 1e-4
    none = make(None)
    assert (p.expected_grad(none, on_policy=True, pass_behavior=False) - want).abs().max() > 1e-4


@pytest.mark.parametrize("d,s", RPG_VARIANTS)
def test_sequence_weight_turns_mu_expectation_into_old_expectation(d, s):
    """Off-policy (θ ≠ θ_old), β > 0, π_ref ≠ π_old: with the weight Π_t ρ_t on every token (PG and
    KL term), E_{y~μ}[Σ_t ∇ℓ′_t] = E_{y~π_old}[Σ_t ∇ℓ_t] exactly — i.e. the weight is π_old(y)/μ(y)."""
    p = TwoStep(seed=5)
    seq = rpg.RPGLoss(
        d,
        style=s,
        beta=0.5,
        clip=None,
        agg="token-sum",
        correction=rpg.RolloutCorrection(level="sequence", **UNTRUNCATED),
    )
    plain = rpg.RPGLoss(d, style=s, beta=0.5, clip=None, agg="token-sum")
    got = p.expected_grad(seq, on_policy=False)
    want = p.expected_grad(plain, on_policy=False, sample="old", pass_behavior=False)
    torch.testing.assert_close(got, want, **EXACT)


# ----------------------------------------------------------------------------------------------
# 4. Crafted tokens: the weight formulas
# ----------------------------------------------------------------------------------------------


def observed_weight(correction, old, beh, mask):
    """Read the weight off a loss with per_token = 1·weight and ∂per_token/∂logp = weight.

    fkl differentiable, β = 0, no clip: ℓ = −w·A; with logp = old_logp (w = 1) and A = −1, ℓ = 1.
    """
    fn = rpg.RPGLoss("fkl", beta=0.0, clip=None, agg="token-sum", correction=correction)
    logp = leaf(old)
    adv = -torch.ones(old.shape[0], dtype=F64)
    out = fn(logp, old, adv, mask, behavior_logp=beh)
    g = grad_of(out.per_token.sum(), logp)
    return out.per_token.detach(), g


LOG_RHO = torch.tensor(
    [
        [math.log(0.1), math.log(0.5), 0.0, math.log(1.5), math.log(2.5), math.log(10.0)],
        [math.log(0.3), math.log(0.8), math.log(1.2), math.log(3.0), 0.0, 0.0],
    ],
    dtype=F64,
)
CRAFT_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)


def crafted(log_rho=LOG_RHO, mask=CRAFT_MASK, pad_nan=True):
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(log_rho.shape, generator=g, dtype=F64) * 2 - 2.5  # behavior_logp = old - log ρ <= 0 too
    beh = old - log_rho
    if pad_nan:
        beh = torch.where(mask, beh, torch.full_like(beh, float("nan")))
    return old, beh, mask


@pytest.mark.parametrize("lower,upper", [(None, 2.0), (0.4, None), (0.4, 2.0), (0.3, 1.1)])
def test_token_truncate_weight_formula(lower, upper):
    old, beh, mask = crafted()
    rho = LOG_RHO.exp()
    want = rho.clamp(min=lower, max=upper)
    want = torch.where(mask, want, torch.zeros_like(want))
    w, g = observed_weight(rpg.RolloutCorrection(lower=lower, upper=upper), old, beh, mask)
    torch.testing.assert_close(w, want, **EXACT)
    torch.testing.assert_close(g, want, **EXACT)  # the weight scales the gradient too


@pytest.mark.parametrize("lower,upper", [(0.4, 2.0), (None, 1.3), (0.7, None), (1.0, 1.0)])
def test_token_mask_weight_formula(lower, upper):
    """Mask mode: ρ where lower ≤ ρ ≤ upper (closed band), else 0; ρ = 1 exactly sits on bound 1."""
    old, beh, mask = crafted()
    rho = LOG_RHO.exp()
    inside = torch.ones_like(mask)
    if lower is not None:
        inside &= LOG_RHO >= math.log(lower)
    if upper is not None:
        inside &= LOG_RHO <= math.log(upper)
    want = torch.where(mask & inside, rho, torch.zeros_like(rho))
    w, g = observed_weight(rpg.RolloutCorrection(mode="mask", lower=lower, upper=upper), old, beh, mask)
    torch.testing.assert_close(w, want, **EXACT)
    torch.testing.assert_close(g, want, **EXACT)


def test_bounds_are_absolute_not_epsilon_offsets():
    """upper=1.5 caps ρ = 2.5 at 1.5 (an ε reading would cap at 2.5); lower=0.3 lifts ρ=0.1 to 0.3."""
    log_rho = torch.tensor([[math.log(2.5), math.log(0.1), math.log(0.6)]], dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    old, beh, _ = crafted(log_rho, mask)
    w, _ = observed_weight(rpg.RolloutCorrection(lower=0.3, upper=1.5), old, beh, mask)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.3, 0.6]], dtype=F64), **EXACT)
    w, _ = observed_weight(rpg.RolloutCorrection(mode="mask", lower=0.5, upper=0.7), old, beh, mask)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.6]], dtype=F64), **EXACT)


SEQ_LOG_RHO = torch.tensor(
    [
        [0.2, -0.1, 0.3, 0.0],  # 4 tokens: Π = e^{0.4}
        [0.5, 0.6, 9.0, -7.0],  # 2 tokens (padding holds huge values): Π = e^{1.1}
        [-0.9, -0.4, 0.1, 0.0],  # 3 tokens: Π = e^{-1.2}
        [0.05, 0.0, 0.0, 0.0],
    ],  # 1 token:  Π = e^{0.05}
    dtype=F64,
)
SEQ_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)


def clamp(x, lower, upper):
    return x if lower is None and upper is None else x.clamp(min=lower, max=upper)


def seq_rho():
    return torch.where(SEQ_MASK, SEQ_LOG_RHO, torch.zeros_like(SEQ_LOG_RHO)).sum(-1).exp()


@pytest.mark.parametrize("pad_nan", [True, False])
@pytest.mark.parametrize("lower,upper", [(None, None), (None, 2.0), (0.5, None), (0.5, 1.2)])
def test_sequence_truncate_weight_is_product_over_unmasked_tokens(lower, upper, pad_nan):
    old, beh, mask = crafted(SEQ_LOG_RHO, SEQ_MASK, pad_nan=pad_nan)
    want_seq = clamp(seq_rho(), lower, upper)
    want = torch.where(mask, want_seq[:, None].expand_as(old), torch.zeros_like(old))
    corr = rpg.RolloutCorrection(level="sequence", lower=lower, upper=upper)
    w, g = observed_weight(corr, old, beh, mask)
    torch.testing.assert_close(w, want, **EXACT)
    torch.testing.assert_close(g, want, **EXACT)


@pytest.mark.parametrize("lower,upper", [(0.5, 2.0), (None, 1.2), (0.5, None)])
def test_sequence_mask_rejects_whole_sequences(lower, upper):
    old, beh, mask = crafted(SEQ_LOG_RHO, SEQ_MASK)
    r = seq_rho()
    inside = torch.ones(4, dtype=torch.bool)
    if lower is not None:
        inside &= r >= lower
    if upper is not None:
        inside &= r <= upper
    want = torch.where(mask & inside[:, None], r[:, None].expand_as(old), torch.zeros_like(old))
    w, _ = observed_weight(
        rpg.RolloutCorrection(level="sequence", mode="mask", lower=lower, upper=upper), old, beh, mask
    )
    torch.testing.assert_close(w, want, **EXACT)
    assert (inside == False).any() and inside.any()  # noqa: E712 — the crafted band really splits


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_padding_in_behavior_logp_is_inert(level, poison):
    logp, old, ref, beh, adv, mask = make_batch(seed=11)
    corr = rpg.RolloutCorrection(level=level, upper=3.0)
    fn = rpg.RPGLoss("rkl", style="reinforce", beta=0.2, correction=corr)
    clean = fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh)
    bad = torch.where(mask, beh, torch.full_like(beh, poison))
    dirty = fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=bad)
    assert torch.isfinite(dirty.loss)
    assert torch.equal(clean.loss, dirty.loss)
    assert torch.equal(clean.per_token, dirty.per_token)
    gd = grad_of(dirty.loss, logp)
    assert torch.isfinite(gd).all()
    assert torch.equal(grad_of(clean.loss, logp), gd)
    for k, v in dirty.metrics.items():
        if k.startswith("rollout_corr/"):
            assert math.isfinite(float(v)), k


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_weight_never_receives_gradient(level):
    logp, old, ref, beh, adv, mask = make_batch(seed=12)
    old_l, beh_l = leaf(old), leaf(beh)
    fn = rpg.RPGLoss("urkl", beta=0.3, clip=None, correction=rpg.RolloutCorrection(level=level, lower=0.5, upper=1.5))
    out = fn(logp, old_l, adv, mask, ref_logp=ref, behavior_logp=beh_l)
    (out.loss + out.per_token.sum()).backward()
    for t in (old_l, beh_l):
        assert t.grad is None or torch.count_nonzero(t.grad) == 0
    assert logp.grad is not None and torch.count_nonzero(logp.grad) > 0


def _manual_token_weight(old, beh, mask, lower=None, upper=2.0):
    rho = (old - torch.where(mask, beh, old)).exp()
    return torch.where(mask, rho.clamp(min=lower, max=upper), torch.zeros_like(rho))


@pytest.mark.parametrize(
    "name,make",
    [
        ("rpg-ufkl-diff-clip", lambda c: rpg.RPGLoss("ufkl", beta=0.4, correction=c)),
        ("rpg-rkl-rf-clip", lambda c: rpg.RPGLoss("rkl", style="reinforce", beta=0.4, correction=c)),
        ("rpg-fkl-diff-noclip", lambda c: rpg.RPGLoss("fkl", beta=0.4, clip=None, correction=c)),
        ("grpo", lambda c: rpg.GRPOLoss(beta=0.3, correction=c)),
        ("opd", lambda c: rpg.OnPolicyDistillationLoss(beta=0.8, correction=c)),
    ],
)
def test_weight_multiplies_whole_per_token_loss(name, make):
    """per_token(μ) = ρ̄·per_token(no μ) where ρ̄ = clip(ρ, lower, upper), KL term included (β > 0)."""
    logp, old, ref, beh, adv, mask = make_batch(seed=13, mismatch=0.8)
    corr = rpg.RolloutCorrection(lower=0.6, upper=1.4)
    wt = _manual_token_weight(old, beh, mask, 0.6, 1.4)
    assert ((wt != 1) & mask).sum() >= 5
    fn = make(corr)
    base = fn(logp, old, adv, mask, ref_logp=ref)
    out = fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh)
    torch.testing.assert_close(out.per_token, wt * base.per_token, **EXACT)
    torch.testing.assert_close(grad_of(out.per_token.sum(), logp), grad_of((wt * base.per_token).sum(), logp), **EXACT)
    # loss keeps its own aggregation over the same counts
    torch.testing.assert_close(
        out.loss,
        token_mean(wt * base.per_token, mask)
        if fn.agg == "token-mean"
        else seq_mean_token_mean(wt * base.per_token, mask),
        **EXACT,
    )


# ----------------------------------------------------------------------------------------------
# 5. Default correction
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,s", RPG_VARIANTS)
def test_default_correction_is_token_truncation_at_two(d, s):
    logp, old, ref, beh, adv, mask = make_batch(seed=14, mismatch=1.0)
    wt = _manual_token_weight(old, beh, mask, None, 2.0)
    assert ((wt == 2.0) & mask).any() and ((wt < 1.0) & mask).any()
    default = rpg.RPGLoss(d, style=s, beta=0.3)
    explicit = rpg.RPGLoss(d, style=s, beta=0.3, correction=rpg.RolloutCorrection())
    pinned = rpg.RPGLoss(
        d, style=s, beta=0.3, correction=rpg.RolloutCorrection(level="token", mode="truncate", lower=None, upper=2.0)
    )
    base = default(logp, old, adv, mask, ref_logp=ref)
    a = default(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh)
    b = explicit(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh)
    c = pinned(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.loss, c.loss)
    assert torch.equal(a.per_token, b.per_token)
    torch.testing.assert_close(a.per_token, wt * base.per_token, **EXACT)
    torch.testing.assert_close(grad_of(a.loss, logp), grad_of(token_mean(wt * base.per_token, mask), logp), **EXACT)


def test_default_on_functional_form():
    logp, old, ref, beh, adv, mask = make_batch(seed=15, mismatch=1.0)
    wt = _manual_token_weight(old, beh, mask)
    base = rpg.policy_loss(logp, old, adv, mask, ref_logp=ref, kl="urkl", beta=0.2)
    out = rpg.policy_loss(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh, kl="urkl", beta=0.2)
    torch.testing.assert_close(out.per_token, wt * base.per_token, **EXACT)


# ----------------------------------------------------------------------------------------------
# 6. Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(level="seq"), "level"),
        (dict(level="prefix"), "level"),
        (dict(mode="clip"), "mode"),
        (dict(mode="reject"), "mode"),
        (dict(lower=-0.1), "lower"),
        (dict(upper=-1.0), "upper"),
        (dict(lower=3.0, upper=2.0), "lower"),
    ],
)
def test_bad_correction_settings(kwargs, word):
    with pytest.raises(ValueError, match=word):
        rpg.RolloutCorrection(**kwargs)


def test_lower_greater_than_upper_names_both():
    with pytest.raises(ValueError) as e:
        rpg.RolloutCorrection(lower=3.0, upper=2.0)
    assert "lower" in str(e.value) and "upper" in str(e.value)


def test_correction_must_be_a_rolloutcorrection():
    with pytest.raises((TypeError, ValueError), match="correction"):
        rpg.RPGLoss("rkl", correction="token")
    with pytest.raises((TypeError, ValueError), match="correction"):
        rpg.PolicyLoss(kl="rkl", beta=0.1, correction=2.0)


@pytest.mark.parametrize(
    "bad",
    [
        lambda old: old[:, :-1],
        lambda old: old[:-1],
        lambda old: old.flatten(),
        lambda old: old[..., None],
    ],
    ids=["short-T", "short-B", "flat", "3d"],
)
def test_wrong_shape_behavior_logp(bad):
    logp, old, ref, beh, adv, mask = make_batch(seed=16)
    fn = rpg.RPGLoss("rkl", beta=0.1)
    with pytest.raises(ValueError, match="behavior_logp"):
        fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=bad(beh))


def test_non_float_behavior_logp():
    logp, old, ref, beh, adv, mask = make_batch(seed=16)
    fn = rpg.RPGLoss("rkl", beta=0.1)
    for bad in (beh.round().long(), beh < -1.0):
        with pytest.raises((TypeError, ValueError), match="behavior_logp"):
            fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=bad)


def test_wrong_shape_weights_and_entropy():
    logp, old, ref, _beh, adv, mask = make_batch(seed=16)
    fn = rpg.RPGLoss("rkl", beta=0.1)
    with pytest.raises(ValueError, match="weights"):
        fn(logp, old, adv, mask, ref_logp=ref, weights=torch.ones(3, dtype=F64))
    fe = rpg.RPGLoss("rkl", beta=0.1, entropy_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        fe(logp, old, adv, mask, ref_logp=ref, entropy=torch.ones(old.shape[0], 2, dtype=F64))


def test_negative_entropy_coef():
    with pytest.raises(ValueError, match="entropy_coef"):
        rpg.RPGLoss("rkl", entropy_coef=-0.01)


def test_entropy_coef_without_entropy_raises():
    logp, old, _ref, _beh, adv, mask = make_batch(seed=16)
    fn = rpg.DAPOLoss(entropy_coef=0.01)
    with pytest.raises((ValueError, TypeError), match="entropy"):
        fn(logp, old, adv, mask)


# ----------------------------------------------------------------------------------------------
# 7. weights=
# ----------------------------------------------------------------------------------------------


def rand_weights(shape, seed=0, pad=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(shape, generator=g, dtype=F64) * 2
    w[0, 0] = 0.0
    if pad is not None:
        w = torch.where(pad, w, torch.full_like(w, float("nan")))
    return w


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize(
    "name,make",
    [
        ("rpg-rkl-rf", lambda agg: rpg.RPGLoss("rkl", style="reinforce", beta=0.3, agg=agg)),
        ("rpg-ufkl-diff", lambda agg: rpg.RPGLoss("ufkl", beta=0.3, agg=agg)),
        ("grpo", lambda agg: rpg.GRPOLoss(beta=0.1, agg=agg)),
        ("cispo", lambda agg: rpg.CISPOLoss(agg=agg)),
    ],
)
def test_weights_multiply_per_token_before_aggregation(agg, name, make):
    logp, old, ref, _beh, adv, mask = make_batch(seed=20)
    fn = make(agg)
    w = rand_weights(old.shape, seed=1, pad=mask)  # NaN at padding
    w_leaf = w.clone().requires_grad_(True)
    base = fn(logp, old, adv, mask, ref_logp=ref)
    out = fn(logp, old, adv, mask, ref_logp=ref, weights=w_leaf)
    wz = torch.where(mask, w, torch.zeros_like(w))
    want_pt = wz * base.per_token
    torch.testing.assert_close(out.per_token, want_pt, **EXACT)
    want_loss = AGG_ORACLE[agg](want_pt, mask)  # the counts are the mask's: a weight 0 still counts
    torch.testing.assert_close(out.loss, want_loss, **EXACT)
    assert torch.isfinite(out.loss)
    g = grad_of(out.loss, logp)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, grad_of(want_loss, logp), **EXACT)
    out.loss.backward()
    assert w_leaf.grad is None or torch.count_nonzero(torch.nan_to_num(w_leaf.grad, nan=1.0)) == 0


def test_weights_compose_with_correction():
    logp, old, ref, beh, adv, mask = make_batch(seed=21, mismatch=0.9)
    corr = rpg.RolloutCorrection(lower=0.5, upper=1.5)
    fn = rpg.RPGLoss("urkl", style="reinforce", beta=0.3, correction=corr)
    w = rand_weights(old.shape, seed=2)
    rho = _manual_token_weight(old, beh, mask, 0.5, 1.5)
    base = fn(logp, old, adv, mask, ref_logp=ref)
    out = fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh, weights=w)
    torch.testing.assert_close(out.per_token, w * rho * base.per_token, **EXACT)


@pytest.mark.parametrize("use_weights,use_corr", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "token-sum"])
def test_shards_with_global_counts_sum_to_full_batch(agg, use_weights, use_corr):
    logp, old, ref, beh, adv, mask = make_batch(b=6, t=5, seed=22, mismatch=0.8)
    corr = rpg.RolloutCorrection(level="sequence", mode="mask", lower=0.3, upper=3.0) if use_corr else None
    fn = rpg.RPGLoss("rkl", beta=0.2, agg=agg, correction=corr)
    w = rand_weights(old.shape, seed=3, pad=mask) if use_weights else None
    kw = lambda sl: dict(  # noqa: E731
        ref_logp=ref[sl],
        behavior_logp=beh[sl] if use_corr else None,
        weights=None if w is None else w[sl],
    )
    full = fn(logp, old, adv, mask, **kw(slice(None)))
    n_tok, n_seq = int(mask.sum()), mask.shape[0]
    total = 0
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = fn(logp[sl], old[sl], adv[sl], mask[sl], batch_num_tokens=n_tok, global_batch_size=n_seq, **kw(sl))
        total = total + part.loss
    torch.testing.assert_close(total, full.loss, **EXACT)
    torch.testing.assert_close(grad_of(total, logp), grad_of(full.loss, logp), **EXACT)


# ----------------------------------------------------------------------------------------------
# 8. entropy bonus
# ----------------------------------------------------------------------------------------------


def make_entropy(shape, mask, seed=0, pad=float("nan")):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(shape, generator=g, dtype=F64) * 3
    return torch.where(mask, h, torch.full_like(h, pad)).requires_grad_(True)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize(
    "name,make",
    [
        ("rpg-urkl-rf", lambda agg, c: rpg.RPGLoss("urkl", style="reinforce", beta=0.3, agg=agg, entropy_coef=c)),
        ("dapo", lambda agg, c: rpg.DAPOLoss(agg=agg, entropy_coef=c)),
        ("grpo", lambda agg, c: rpg.GRPOLoss(agg=agg, entropy_coef=c)),
    ],
)
def test_entropy_bonus_value_and_gradient(agg, name, make):
    logp, old, ref, _beh, adv, mask = make_batch(b=5, t=6, seed=30)
    coef = 0.07
    H = make_entropy(old.shape, mask, seed=1)  # NaN at padding must be inert
    base = make(agg, 0.0)(logp, old, adv, mask, ref_logp=ref)
    out = make(agg, coef)(logp, old, adv, mask, ref_logp=ref, entropy=H)
    Hz = torch.where(mask, H, torch.zeros_like(H)).detach()
    want = base.loss - coef * AGG_ORACLE[agg](Hz, mask)
    torch.testing.assert_close(out.loss, want, **EXACT)
    torch.testing.assert_close(grad_of(out.loss, logp), grad_of(base.loss, logp), **EXACT)
    gH = grad_of(out.loss, H)
    m = mask.to(F64)
    if agg == "token-mean":
        want_gH = -coef * m / m.sum()
    else:
        want_gH = -coef * m / (m.sum(-1, keepdim=True) * mask.shape[0])
    assert torch.isfinite(gH).all()
    torch.testing.assert_close(gH, want_gH, **EXACT)
    torch.testing.assert_close(float(out.metrics["entropy/mean"]), float(Hz.sum() / m.sum()), **EXACT)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_entropy_uses_global_counts_and_is_unweighted(agg):
    """With batch_num_tokens / global_batch_size the bonus divides by them (shards sum to the full
    batch), and neither weights= nor the rollout correction multiplies it."""
    logp, old, ref, beh, adv, mask = make_batch(b=6, t=5, seed=31, mismatch=0.8)
    coef = 0.05
    H = make_entropy(old.shape, mask, seed=2)
    w = rand_weights(old.shape, seed=4, pad=mask)
    fn = rpg.RPGLoss("rkl", beta=0.2, agg=agg, entropy_coef=coef)
    full = fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh, weights=w, entropy=H)
    n_tok, n_seq = int(mask.sum()), mask.shape[0]
    total = 0
    for sl in (slice(0, 4), slice(4, 6)):
        part = fn(
            logp[sl],
            old[sl],
            adv[sl],
            mask[sl],
            ref_logp=ref[sl],
            behavior_logp=beh[sl],
            weights=w[sl],
            entropy=H[sl],
            batch_num_tokens=n_tok,
            global_batch_size=n_seq,
        )
        total = total + part.loss
    torch.testing.assert_close(total, full.loss, **EXACT)
    gH_full = grad_of(full.loss, H)
    torch.testing.assert_close(grad_of(total, H), gH_full, **EXACT)
    m = mask.to(F64)
    want_gH = -coef * m / m.sum() if agg == "token-mean" else -coef * m / (m.sum(-1, keepdim=True) * n_seq)
    torch.testing.assert_close(gH_full, want_gH, **EXACT)


def test_per_token_aggregates_to_loss_with_entropy():
    """The call contract pins: aggregating per_token yourself gives the matching gradient. With an entropy
    bonus the token-mean of per_token must therefore carry the entropy's gradient too."""
    logp, old, ref, _beh, adv, mask = make_batch(b=5, t=6, seed=32)
    H = make_entropy(old.shape, mask, seed=3)
    fn = rpg.RPGLoss("rkl", beta=0.2, entropy_coef=0.1, agg="token-mean")
    out = fn(logp, old, adv, mask, ref_logp=ref, entropy=H)
    mine = token_mean(out.per_token, mask)
    torch.testing.assert_close(mine, out.loss, **EXACT)
    torch.testing.assert_close(grad_of(mine, H), grad_of(out.loss, H), **EXACT)


# ----------------------------------------------------------------------------------------------
# 9. Metrics under rollout_corr/
# ----------------------------------------------------------------------------------------------


def test_rollout_corr_metrics_on_crafted_batch():
    old, beh, mask = crafted()  # NaN at padding
    logp = leaf(old)
    adv = torch.ones(old.shape[0], dtype=F64)
    lower, upper = None, 2.0
    fn = rpg.RPGLoss("rkl", beta=0.1, correction=rpg.RolloutCorrection(lower=lower, upper=upper))
    out = fn(logp, old, adv, mask, behavior_logp=beh)
    met = {k: float(v) for k, v in out.metrics.items()}
    keys = sorted(k for k in met if k.startswith("rollout_corr/"))
    assert keys, f"no rollout_corr/ metric; got {sorted(met)}"
    lr = LOG_RHO[mask]
    rho = lr.exp()
    n = lr.numel()
    assert math.isclose(met["rollout_corr/kl"], float((-lr).mean()), rel_tol=0, abs_tol=1e-12)
    assert math.isclose(met["rollout_corr/kl"], float((beh - old)[mask].mean()), rel_tol=0, abs_tol=1e-12)
    assert math.isclose(met["rollout_corr/k3_kl"], float((rho - 1 - lr).mean()), rel_tol=0, abs_tol=1e-12)
    assert math.isclose(met["rollout_corr/chi2_token"], float((rho**2).mean() - 1), rel_tol=0, abs_tol=1e-10)
    applied = rho.clamp(max=upper)
    assert math.isclose(
        met["rollout_corr/rollout_is_ratio_fraction_high"], float((rho > upper).sum()) / n, rel_tol=0, abs_tol=1e-12
    )
    assert math.isclose(met["rollout_corr/rollout_is_max"], float(applied.max()), rel_tol=0, abs_tol=1e-12)
    assert math.isclose(met["rollout_corr/rollout_is_mean"], float(applied.mean()), rel_tol=0, abs_tol=1e-12)
    ess = float(applied.sum() ** 2 / (n * (applied**2).sum()))
    assert math.isclose(met["rollout_corr/rollout_is_eff_sample_size"], ess, rel_tol=0, abs_tol=1e-12)
    rows = [
        math.exp(float(beh[i][mask[i]].mean() - old[i][mask[i]].mean())) for i in range(old.shape[0]) if mask[i].any()
    ]
    assert math.isclose(met["rollout_corr/ppl_ratio"], sum(rows) / len(rows), rel_tol=1e-12)  # verl's definition
    rho_seq = torch.where(mask, LOG_RHO, torch.zeros_like(LOG_RHO)).sum(-1).exp()
    assert math.isclose(met["rollout_corr/chi2_seq"], float((rho_seq**2).mean() - 1), rel_tol=1e-12)


def test_rollout_corr_rejection_metrics():
    old, beh, mask = crafted()
    logp = leaf(old)
    adv = torch.ones(old.shape[0], dtype=F64)
    fn = rpg.RPGLoss("rkl", beta=0.1, correction=rpg.RolloutCorrection(mode="mask", lower=0.4, upper=2.0))
    met = {k: float(v) for k, v in fn(logp, old, adv, mask, behavior_logp=beh).metrics.items()}
    lr = LOG_RHO[mask]
    rejected = (lr < math.log(0.4)) | (lr > math.log(2.0))
    assert math.isclose(met["rollout_corr/rollout_rs_masked_fraction"], float(rejected.double().mean()), abs_tol=1e-12)
    # row 0 has ρ = 0.1, 2.5, 10 rejected; row 1 has ρ = 0.3, 3.0 rejected: both sequences
    assert math.isclose(met["rollout_corr/rollout_rs_seq_masked_fraction"], 1.0, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------
# Documented options of RolloutCorrection: sequence filters and the rejected tokens' denominators
# ----------------------------------------------------------------------------------------------


def test_geometric_mean_filter_rejects_whole_sequences():
    """geo band on exp(mean_t log ρ_t) over the response's tokens; kept sequences keep their weight."""
    old, beh, mask = crafted(SEQ_LOG_RHO, SEQ_MASK)
    m = SEQ_MASK.to(F64)
    geo = (torch.where(SEQ_MASK, SEQ_LOG_RHO, torch.zeros_like(SEQ_LOG_RHO)).sum(-1) / m.sum(-1)).exp()
    lo, hi = 0.8, 1.3  # geo = e^{0.1}, e^{0.55}, e^{-0.4}, e^{0.05}: rows 1 and 2 fall outside
    keep = (geo >= lo) & (geo <= hi)
    assert keep.tolist() == [True, False, False, True]
    want = torch.where(SEQ_MASK & keep[:, None], SEQ_LOG_RHO.exp(), torch.zeros_like(old))
    corr = rpg.RolloutCorrection(geo_lower=lo, geo_upper=hi, **UNTRUNCATED)
    w, _ = observed_weight(corr, old, beh, mask)
    torch.testing.assert_close(w, want, **EXACT)
    torch.testing.assert_close(corr.keep(old, beh, mask), SEQ_MASK & keep[:, None], rtol=0, atol=0)


def test_worst_token_filter_rejects_whole_sequences():
    """token band: a sequence with any response token whose ρ_t is outside it is rejected
    (padding holds ρ = e^9 and e^-7 in row 1 and must not count)."""
    old, beh, mask = crafted(SEQ_LOG_RHO, SEQ_MASK)
    lo, hi = math.exp(-0.5), math.exp(0.55)
    bad = torch.where(SEQ_MASK, (SEQ_LOG_RHO < -0.5) | (SEQ_LOG_RHO > 0.55), torch.zeros_like(SEQ_MASK)).any(-1)
    assert bad.tolist() == [False, True, True, False]
    want = torch.where(SEQ_MASK & ~bad[:, None], SEQ_LOG_RHO.exp(), torch.zeros_like(old))
    corr = rpg.RolloutCorrection(token_lower=lo, token_upper=hi, **UNTRUNCATED)
    w, _ = observed_weight(corr, old, beh, mask)
    torch.testing.assert_close(w, want, **EXACT)


@pytest.mark.parametrize("count_rejected", [True, False])
def test_rejected_tokens_in_the_denominator(count_rejected):
    """count_rejected=True: a rejected token still counts in token-mean's denominator (pure weight);
    False: the mask shrinks, the denominator is the kept tokens (``keep().sum()``)."""
    old, beh, mask = crafted()
    logp = leaf(old + 0.1)
    adv = torch.tensor([0.7, -1.3], dtype=F64)
    corr = rpg.RolloutCorrection(mode="mask", lower=0.4, upper=2.0, count_rejected=count_rejected)
    fn = rpg.RPGLoss("rkl", beta=0.2, clip=None, correction=corr)
    base = fn(logp, old, adv, mask)
    out = fn(logp, old, adv, mask, behavior_logp=beh)
    inside = (LOG_RHO >= math.log(0.4)) & (LOG_RHO <= math.log(2.0))
    keep = mask & inside
    torch.testing.assert_close(corr.keep(old, beh, mask), keep, rtol=0, atol=0)
    weighted = torch.where(keep, LOG_RHO.exp(), torch.zeros_like(old)) * base.per_token
    torch.testing.assert_close(out.per_token, weighted, **EXACT)
    denom = mask.sum() if count_rejected else keep.sum()
    torch.testing.assert_close(out.loss, weighted.sum() / denom, **EXACT)
