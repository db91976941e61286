r"""Exact tabular oracle: unit-test a policy loss against the gradient of its objective.

A one-step "language model" over K actions is small enough to enumerate. With
logits θ ∈ R^K the policy is π_θ = softmax(θ) (``normalized=True``) or the
unnormalized measure π_θ(a) = exp(θ_a) (``normalized=False``, where the
normalized and unnormalized divergences differ: the mass term of UKL is 0 for
normalized policies, so there fkl ≡ ufkl and rkl ≡ urkl in expectation).

* [`objective`][rpg.testing.objective] — J(θ) = Σ_a π_θ(a)·A(a) − β·D(π_θ, π_ref), exact.
* [`objective_gradient`][rpg.testing.objective_gradient] — ∇J(θ), by autograd through the exact J.
* [`expected_gradient`][rpg.testing.expected_gradient] — the expected gradient of a loss over tokens drawn
  from π_old: Σ_a π_old(a)·∇_θ ℓ(a), where ℓ(a) is the loss's ``per_token``
  entry for action a (a batch holding each action once, so the aggregation
  mode does not matter). For an unnormalized π_old the weights are the
  unnormalized masses: Σ_a π_old(a)·∇ℓ(a) = Z_old·E_{π̃_old}[∇ℓ], the paper's
  Z_old factor (Props. 3.2, 3.6).

**Sequences.** [`sequence_objective`][rpg.testing.sequence_objective] and [`sequence_expected_gradient`][rpg.testing.sequence_expected_gradient]
do the same for two-token responses y = (a, b) with π(y) = π(a)·π(b | a)
(first-token logits ``[K]`` and second-token logits ``[K, K]``, flattened into
one ``[K + K²]`` vector), against the *sequence-level* objective
J(θ) = E_{π_θ}[R(y)] − β·KL(π_θ(y) ‖ π_ref(y)). There a per-token KL penalty
is only a partial gradient of the sequence KL (Tang & Munos); a KL in the
reward with returns-to-go is exact on-policy (``tests/test_sequence.py``).

**A behaviour policy.** Both expected gradients take ``behavior_logits``: the
tokens (or sequences) are then drawn from a rollout engine μ ≠ π_old, and the
loss receives ``behavior_logp`` so that its [`RolloutCorrection`][rpg.correction.RolloutCorrection]
applies. [`correction_bias`][rpg.testing.correction_bias] measures how far a correction's expected
gradient is from −∇J on a two-step problem.

**A custom loss.** Every oracle calls ``loss_fn`` as rpg calls its losses:
``loss_fn(logp, old_logp, advantages, mask, ref_logp=ref_logp)`` (``ref_logp=None`` for a loss whose
``kl_anchor`` is ``"behavior"``, e.g. [`DROLoss`][rpg.presets.DROLoss], which refuses one), adding
``behavior_logp=`` when the problem has a behaviour policy and the function takes a parameter of
that name (or ``**kwargs``), and ``weights=`` only when a ``weights`` callable is given. ``logp``
is ``[B, T]`` and carries the gradient; the other log-probs are ``[B, T]`` and detached;
``advantages`` is ``[B]`` (or ``[B, T]`` from an ``advantages=`` callable); ``mask`` is all true.
The batch holds every action (``T = 1``) or every two-token response (``T = 2``) once. It returns
either a [`LossOutput`][rpg.metrics.LossOutput] (anything with a ``per_token`` ``[B, T]`` tensor;
a response's loss is the sum of its row) or a **bare scalar tensor**, the loss of the batch it was
given: the oracle then calls it once per response on a one-row batch and reads the scalar as the
mean of the response's per-token losses (``reduction="mean"``, rpg's ``token-mean``) or their sum
(``reduction="sum"``). Anything else raises ``TypeError``.

**The audit.** [`audit`][rpg.testing.audit] runs a loss through every scenario (``SCENARIOS``:
one and two tokens, on- and off-policy, normalized and unnormalized, with a behaviour policy)
against every candidate objective (``OBJECTIVES``: E[r] and E[r] − β·D for the four
divergences, per token and over whole responses) and returns an [`Audit`][rpg.testing.Audit]:
the objective the gradient follows and its bias against the one the loss names.

A loss is exact for its objective when ``expected_gradient(...)`` equals
``-objective_gradient(...)``; test it off-policy (θ ≠ θ_old) and with
π_ref ≠ π_old in float64 — on-policy alone cannot tell the divergences apart:

```python
import torch
import rpg
import rpg.testing as T

p = T.random_problem(k=6, seed=0)
loss_fn = rpg.RPGLoss("rkl", style="reinforce", beta=0.5, clip=None)
got = T.expected_gradient(loss_fn, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits)
want = -T.objective_gradient("rkl", p.logits, p.ref_logits, p.rewards, beta=0.5)
torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
print(T.audit(loss_fn, objective="rkl").statement())  # on-policy rkl; off-policy, per token, rkl
```
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._util import check_choice
from .functional import unnormalized_policies
from .kl import DIVERGENCES
from .kl import divergence as _divergence

__all__ = [
    "Problem",
    "random_problem",
    "log_policy",
    "objective",
    "objective_gradient",
    "expected_gradient",
    "random_sequence_problem",
    "sequence_token_logp",
    "sequence_objective",
    "sequence_objective_gradient",
    "sequence_expected_gradient",
    "correction_bias",
    "audit",
    "Audit",
    "Record",
    "Scenario",
    "SCENARIOS",
    "GROUPS",
    "OBJECTIVES",
]


class Problem(NamedTuple):
    """An off-policy tabular problem: current, behaviour and reference logits, and rewards (all ``[K]``)."""

    logits: torch.Tensor
    old_logits: torch.Tensor
    ref_logits: torch.Tensor
    rewards: torch.Tensor


def random_problem(k: int = 6, seed: int = 0, *, scale: float = 0.5, dtype: torch.dtype = torch.float64) -> Problem:
    """A reproducible problem with θ ≠ θ_old ≠ θ_ref (each logit perturbed by N(0, scale²))."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(k, generator=gen, dtype=dtype)

    def near():
        return base + scale * torch.randn(k, generator=gen, dtype=dtype)

    return Problem(near(), near(), near(), torch.randn(k, generator=gen, dtype=dtype))


def log_policy(logits: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """log π(a) for every action: ``log_softmax(logits)``, or ``logits`` for an unnormalized measure."""
    return torch.log_softmax(logits, -1) if normalized else logits


def objective(
    divergence: str,
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    *,
    normalized: bool = True,
) -> torch.Tensor:
    r"""Exact J(θ) = Σ_a π_θ(a)·A(a) − β·D(π_θ, π_ref), D named as in [`rpg.kl.divergence`][rpg.kl.divergence]."""
    logp, ref_logp = log_policy(logits, normalized), log_policy(ref_logits, normalized)
    return (logp.exp() * rewards).sum() - beta * _divergence(divergence, logp, ref_logp)


def objective_gradient(
    divergence: str,
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    *,
    normalized: bool = True,
) -> torch.Tensor:
    """∇_θ J(θ), ``[K]``, by autograd through the exact objective."""
    theta = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(divergence, theta, ref_logits, rewards, beta, normalized=normalized), theta)
    return grad


def expected_gradient(
    loss_fn: Callable,
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    rewards: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    normalized: bool = True,
    behavior_logits: torch.Tensor | None = None,
    advantages: Callable | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Σ_a π_old(a)·∇_θ ℓ(a), ``[K]``: the exact expected gradient of ``loss_fn`` over π_old.

    ``loss_fn`` follows the calling convention of the module docs ("A custom loss") and is
    called on a batch of K sequences of one token each (``[K, 1]``), action a in row a,
    with ``advantages = rewards`` (or ``advantages(rewards, mask, old_logp, ref_logp)``,
    ``[K, 1]``, when that callable is given). ``ref_logits=None`` means π_ref = π_old.

    With ``behavior_logits`` (a rollout engine μ ≠ π_old) the tokens are drawn from
    μ instead: the result is Σ_a μ(a)·∇ℓ(a), and the loss is called with
    ``behavior_logp = log μ`` so that its correction applies. Then a token-level
    correction is exact when this equals ``-objective_gradient(...)``.
    """
    theta = logits.detach().clone().requires_grad_(True)
    logp = log_policy(theta, normalized)[:, None]
    old_logp = log_policy(old_logits, normalized).detach()[:, None]
    ref_logp = None if ref_logits is None else log_policy(ref_logits, normalized).detach()[:, None]
    behavior = None if behavior_logits is None else log_policy(behavior_logits, normalized).detach()[:, None]
    adv = _advantages(advantages, rewards, logp, old_logp, ref_logp)
    with contextlib.nullcontext() if normalized else unnormalized_policies():  # log π(a) = θ_a may exceed 0
        return _expected(loss_fn, theta, logp, old_logp, adv, ref_logp, behavior, reduction=reduction)


def _advantages(advantages, rewards, logp, old_logp, ref_logp):
    """The call's advantages: the rewards (``[N]``), or ``advantages(rewards, mask, old_logp, ref_logp)``."""
    if advantages is None:
        return rewards
    mask = torch.ones_like(logp, dtype=torch.bool)
    return advantages(rewards, mask, old_logp, old_logp if ref_logp is None else ref_logp)


def _accepts(loss_fn: Callable, name: str) -> bool:
    """Whether ``loss_fn`` takes the keyword ``name`` (or ``**kwargs``); unknown signatures are assumed to."""
    try:
        params = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _expected(
    loss_fn: Callable,
    theta: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    ref_logp: torch.Tensor | None,
    behavior_logp: torch.Tensor | None,
    *,
    weights: torch.Tensor | None = None,
    pass_behavior: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Σ_rows P(row)·∇_θ Σ_t ℓ_t(row): rows are responses (``[N, T]`` log-probs), drawn from the
    sampler (μ = ``behavior_logp`` when given, else π_old) over its support.

    A [`LossOutput`][rpg.metrics.LossOutput] (anything with ``per_token``) is read from one call
    on the whole batch; a bare scalar is the loss of the batch it was given, so the loss is then
    called once per response on a one-row batch, and its scalar times the row's token count
    (``reduction="mean"``) or as is (``"sum"``) is that response's Σ_t ℓ_t."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (how a scalar loss reduces tokens), got {reduction!r}")
    sampler = old_logp if behavior_logp is None else behavior_logp
    s = _support(sampler)  # only the responses the sampler can draw are ever in a batch
    prob = sampler[s].sum(-1).exp()
    rows = (logp[s], old_logp[s], adv[s], torch.ones_like(logp[s], dtype=torch.bool))
    # a KL term anchored on the sampler (kl_anchor="behavior", e.g. DROLoss) takes no ref_logp
    anchored = getattr(loss_fn, "kl_anchor", "ref") == "behavior"
    kwargs = {"ref_logp": None if ref_logp is None or anchored else ref_logp[s]}
    if behavior_logp is not None and pass_behavior and _accepts(loss_fn, "behavior_logp"):
        kwargs["behavior_logp"] = behavior_logp[s]
    if weights is not None:
        kwargs["weights"] = weights[s]
    out = loss_fn(*rows, **kwargs)
    per_token = getattr(out, "per_token", None)
    if isinstance(per_token, torch.Tensor):
        if per_token.shape != rows[0].shape:
            raise ValueError(f"loss_fn's per_token has shape {tuple(per_token.shape)}, expected {tuple(rows[0].shape)}")
        total = (prob[:, None] * per_token).sum()
    elif isinstance(out, torch.Tensor) and out.dim() == 0:
        total = torch.zeros((), dtype=logp.dtype)
        for i in range(len(prob)):
            one = {k: None if v is None else v[i : i + 1] for k, v in kwargs.items()}
            value = loss_fn(*(x[i : i + 1] for x in rows), **one)
            if not (isinstance(value, torch.Tensor) and value.dim() == 0):
                raise TypeError(f"loss_fn returned a scalar for the batch but {type(value).__name__} for one row")
            total = total + prob[i] * value * (rows[0].shape[-1] if reduction == "mean" else 1)
    else:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(
            "loss_fn must return an rpg.LossOutput (or any object with a per_token [B, T] tensor) or a scalar "
            f"tensor (the loss of the batch it was given), got {got}"
        )
    if not total.requires_grad:
        return torch.zeros_like(theta)
    (grad,) = torch.autograd.grad(total, theta, allow_unused=True)
    return torch.zeros_like(theta) if grad is None else grad


def _support(sampler_logp: torch.Tensor) -> torch.Tensor:
    """Row indices of ``[N, T]`` log-probs whose rows the sampler can draw (every token's prob > 0).

    The expectation runs over the sampler's support only: a response it never samples is never
    in a batch, and its untruncated weight π_old/μ = ∞ must not become 0·∞ = NaN (a top-p engine)."""
    return torch.nonzero(torch.isfinite(sampler_logp).all(-1) & (sampler_logp.sum(-1) > -float("inf"))).squeeze(-1)


# --- two-step sequences -------------------------------------------------------------------


def random_sequence_problem(k: int = 3, seed: int = 0, *, scale: float = 0.5, dtype=torch.float64) -> Problem:
    """Like [`random_problem`][rpg.testing.random_problem] for two-token sequences: logits ``[K + K²]``, rewards ``[K²]``."""
    p = random_problem(k + k * k, seed, scale=scale, dtype=dtype)
    return Problem(p.logits, p.old_logits, p.ref_logits, p.rewards[: k * k])


def _k_of(logits: torch.Tensor) -> int:
    k = round((-1 + (1 + 4 * logits.numel()) ** 0.5) / 2)
    if k + k * k != logits.numel():
        raise ValueError(f"sequence logits must have K + K^2 entries, got {logits.numel()}")
    return k


def sequence_token_logp(logits: torch.Tensor) -> torch.Tensor:
    """``[K², 2]`` per-token log-probs of every sequence y = (a, b), row a·K + b: [log π(a), log π(b | a)]."""
    k = _k_of(logits)
    first = torch.log_softmax(logits[:k], -1)
    second = torch.log_softmax(logits[k:].view(k, k), -1)
    return torch.stack([first[:, None].expand(k, k).reshape(-1), second.reshape(-1)], -1)


def sequence_objective(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    *,
    divergence: str = "rkl",
    level: str = "sequence",
) -> torch.Tensor:
    r"""Exact J(θ) = Σ_y π_θ(y)·R(y) − β·D over all K² two-token sequences y = (a, b).

    ``level="sequence"``: D is the KL of whole responses, reverse KL(π_θ(y) ‖ π_ref(y)) or forward
    KL(π_ref(y) ‖ π_θ(y)) — by the chain rule KL_1 + Σ_a π(a)·KL_2(a), so its gradient also moves
    the prefix law (the autoregressive term). ``level="token"``: D = KL_1 + Σ_a sg(π_θ(a))·KL_2(a),
    each step's KL with the prefix law held fixed — what a per-token KL loss differentiates
    on-policy. KL_1 is the first step's KL, KL_2(a) the second step's after prefix a, in the
    direction ``divergence`` names (``"u"`` names are the same here: every step is normalized).
    """
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("level", level, ("sequence", "token"))
    lp, ref = sequence_token_logp(logits), sequence_token_logp(ref_logits)
    seq, ref_seq = lp.sum(-1), ref.sum(-1)
    reward = (seq.exp() * rewards).sum()
    direction = "fkl" if divergence in ("fkl", "ufkl") else "rkl"
    if beta == 0:
        return reward
    if level == "sequence":
        return reward - beta * _divergence(direction, seq, ref_seq)
    k = _k_of(logits)
    first, ref_first = lp[::k, 0], ref[::k, 0]
    second, ref_second = lp[:, 1].view(k, k), ref[:, 1].view(k, k)
    kl = (
        _divergence(direction, first, ref_first)
        + (first.exp().detach() * _divergence(direction, second, ref_second)).sum()
    )
    return reward - beta * kl


def sequence_objective_gradient(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    *,
    divergence: str = "rkl",
    level: str = "sequence",
) -> torch.Tensor:
    """∇_θ of [`sequence_objective`][rpg.testing.sequence_objective], ``[K + K²]``."""
    theta = logits.detach().clone().requires_grad_(True)
    j = sequence_objective(theta, ref_logits, rewards, beta, divergence=divergence, level=level)
    (grad,) = torch.autograd.grad(j, theta)
    return grad


def sequence_expected_gradient(
    loss_fn: Callable,
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    rewards: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    advantages: Callable | None = None,
    behavior_logits: torch.Tensor | None = None,
    weights: Callable | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Σ_y π_old(y)·∇_θ Σ_t ℓ_t(y): the exact expected gradient of a per-token loss over sequences.

    The batch holds every sequence once (``[K², 2]``). ``advantages`` is ``None``
    (the sequence reward as a ``[B]`` advantage) or a callable
    ``(rewards, mask, old_logp, ref_logp) -> [B, T]`` — e.g. REINFORCE++ returns.
    ``loss_fn`` follows the calling convention of the module docs; a loss returning a bare
    scalar is called once per sequence, and ``reduction`` says whether that scalar is the
    mean (``"mean"``, rpg's ``token-mean``) or the sum (``"sum"``) of the sequence's two
    per-token losses.

    With ``behavior_logits`` the sequences are drawn from μ: the result is
    Σ_y μ(y)·∇Σ_t ℓ_t(y), the loss called with ``behavior_logp`` (log μ per token)
    so that its correction applies. ``weights`` is an optional callable
    ``(old_logp, behavior_logp) -> [B, T]`` passed as the call's ``weights=`` (e.g. a
    prefix product of ρ, to measure an estimator the correction does not offer).
    """
    theta = logits.detach().clone().requires_grad_(True)
    logp = sequence_token_logp(theta)
    old_logp = sequence_token_logp(old_logits).detach()
    ref_logp = None if ref_logits is None else sequence_token_logp(ref_logits).detach()
    adv = _advantages(advantages, rewards, logp, old_logp, ref_logp)
    behavior = None if behavior_logits is None else sequence_token_logp(behavior_logits).detach()
    w = None if weights is None else weights(old_logp, old_logp if behavior is None else behavior)
    return _expected(loss_fn, theta, logp, old_logp, adv, ref_logp, behavior, weights=w, reduction=reduction)


def correction_bias(
    loss_fn: Callable,
    problem: Problem,
    behavior_logits: torch.Tensor,
    *,
    weights: Callable | None = None,
    behavior: bool = True,
    reduction: str = "mean",
) -> float:
    r"""Relative bias ‖E_μ[∇ℓ′] + ∇J‖ / ‖∇J‖ of ``loss_fn`` on a two-step problem with an outcome reward.

    At θ = θ_old (the trainer's recomputed policy is the current one), sequences drawn from μ
    (``behavior_logits``), β = 0: J = E_{π_θ}[R(y)]. ``behavior=False`` calls the loss without
    ``behavior_logp`` (no correction) while still sampling from μ; ``weights`` as in
    [`sequence_expected_gradient`][rpg.testing.sequence_expected_gradient]. 0 means the correction is exact for this objective.
    """
    want = -sequence_objective_gradient(problem.logits, problem.ref_logits, problem.rewards, 0.0)
    theta = problem.logits.detach().clone().requires_grad_(True)
    logp = sequence_token_logp(theta)
    old = sequence_token_logp(problem.logits).detach()
    mu = sequence_token_logp(behavior_logits).detach()
    w = None if weights is None else weights(old, mu)
    got = _expected(
        loss_fn, theta, logp, old, problem.rewards, None, mu, weights=w, pass_behavior=behavior, reduction=reduction
    )
    return float((got - want).norm() / want.norm())


# --- the audit: which objective a loss's gradient follows --------------------------------

OBJECTIVES: dict[str, str] = {
    "E[r]": "E[r], the expected reward alone",
    "fkl": "E[r] − β·KL(π_ref‖π_θ), per token",
    "rkl": "E[r] − β·KL(π_θ‖π_ref), per token",
    "ufkl": "E[r] − β·UKL(π_ref‖π_θ), per token",
    "urkl": "E[r] − β·UKL(π_θ‖π_ref), per token",
    "seq-fkl": "E[r] − β·KL(π_ref(y)‖π_θ(y)), whole responses",
    "seq-rkl": "E[r] − β·KL(π_θ(y)‖π_ref(y)), whole responses",
    "seq-ufkl": "E[r] − β·UKL(π_ref(y)‖π_θ(y)), whole responses",
    "seq-urkl": "E[r] − β·UKL(π_θ(y)‖π_ref(y)), whole responses",
}


class Scenario(NamedTuple):
    """One family of exact problems the audit enumerates: response length (1 or 2 tokens), whether
    π_old ≠ π_θ, whether the policies are normalized, and whether a behaviour policy μ ≠ π_old samples."""

    name: str
    tokens: int
    off_policy: bool
    normalized: bool
    behavior: bool


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("1 token, on-policy", 1, False, True, False),
    Scenario("1 token, on-policy, unnormalized", 1, False, False, False),
    Scenario("2 tokens, on-policy", 2, False, True, False),
    Scenario("1 token, off-policy", 1, True, True, False),
    Scenario("1 token, off-policy, unnormalized", 1, True, False, False),
    Scenario("2 tokens, off-policy", 2, True, True, False),
    Scenario("1 token, off-policy, μ ≠ π_old", 1, True, True, True),
    Scenario("2 tokens, μ ≠ π_old", 2, False, True, True),
)

GROUPS: dict[str, tuple[str, ...]] = {
    "on-policy": tuple(s.name for s in SCENARIOS[:3]),
    "off-policy": tuple(s.name for s in SCENARIOS[3:5]),
    "sequence off-policy": (SCENARIOS[5].name,),
    "behavior": tuple(s.name for s in SCENARIOS[6:]),
}

_UNNORMALIZED_LOG_MASS = (-0.2, -0.5, -0.1)  # log Z of π_θ, π_old, π_ref in the unnormalized problems


class Record(NamedTuple):
    """The relative bias ‖E[∇ℓ] + ∇J‖ / ‖∇J‖ of the audited loss against one objective J on one scenario
    (the largest over the audit's seeds)."""

    scenario: str
    objective: str
    bias: float


def _fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.1e}"


@dataclass(frozen=True)
class Audit:
    r"""The exactness statement of one loss, computed by [`audit`][rpg.testing.audit].

    ``records`` holds one [`Record`][rpg.testing.Record] per scenario × candidate objective
    (keys of ``OBJECTIVES``); a bias below ``tol`` is exact (rounding error). ``print(audit)`` and
    ``audit.to_markdown()`` show the table: one row per scenario, its bias against the named
    ``objective``, the closest objective, and the bias against every candidate. ``corrected`` is
    ``False`` when the loss takes no ``behavior_logp``: the μ scenarios then measure it uncorrected.
    """

    loss: str
    objective: str | None
    beta: float
    records: tuple[Record, ...]
    corrected: bool = True
    tol: float = 1e-9

    def _worst(self, key: str, group: str) -> float:
        names = GROUPS.get(group, (group,))
        values = [r.bias for r in self.records if r.objective == key and r.scenario in names]
        if not values:
            if group in GROUPS or any(s.name == group for s in SCENARIOS):
                raise ValueError(f"this audit ran no scenario of {group!r} (it ran a subset of SCENARIOS)")
            raise ValueError(f"unknown scenario or group {group!r}; groups: {', '.join(GROUPS)}")
        return max(values)

    def _candidates(self, group: str) -> list[str]:
        names = GROUPS.get(group, (group,))
        one_token = all(s.tokens == 1 for s in SCENARIOS if s.name in names)
        return [k for k in OBJECTIVES if not (one_token and k.startswith("seq-"))]  # one token: seq-X is X

    def bias(self, objective: str | None = None, where: str = "on-policy") -> float:
        """The largest bias against ``objective`` (default: the named one) over ``where``, a scenario
        name or a group of ``GROUPS`` (``"on-policy"``, ``"off-policy"``, ``"sequence off-policy"``,
        ``"behavior"``)."""
        key = self.objective if objective is None else objective
        if key is None:
            raise ValueError("no objective named: pass objective= to audit() or to bias()")
        check_choice("objective", key, tuple(OBJECTIVES))
        return self._worst(key, where)

    def followed(self, where: str = "on-policy") -> tuple[str, ...]:
        """The candidate objectives whose gradient the loss follows exactly (bias < ``tol``) on every
        scenario of ``where``; on one-token scenarios a whole-response KL is the per-token one, so
        only the per-token names are listed there."""
        return tuple(k for k in self._candidates(where) if self._worst(k, where) < self.tol)

    def closest(self, where: str = "on-policy") -> str:
        """The candidate with the smallest largest bias over ``where`` (the first of near-equal ones)."""
        worst = {k: self._worst(k, where) for k in self._candidates(where)}
        best = min(worst.values())
        return next(k for k, v in worst.items() if v <= best * (1 + 1e-6) + 1e-12)

    def describe(self, where: str = "on-policy") -> str:
        """``"rkl"``, ``"fkl = ufkl"`` (equal there), or ``"none (closest: X)"``."""
        exact = self.followed(where)
        return " = ".join(exact) if exact else f"none (closest: {self.closest(where)})"

    def statement(self) -> str:
        """One sentence: what the gradient follows on-policy (1 and 2 tokens) and off-policy, per token."""
        return f"on-policy {self.describe('on-policy')}; off-policy, per token, {self.describe('off-policy')}"

    @property
    def rows(self) -> list[dict]:
        """One dict per scenario: ``scenario``, ``named`` (bias against the named objective, or ``None``),
        ``closest`` and the bias against every candidate (keys of ``OBJECTIVES``)."""
        out = []
        for s in SCENARIOS:
            if not any(r.scenario == s.name for r in self.records):
                continue
            bias = {k: self._worst(k, s.name) for k in OBJECTIVES}
            exact = [k for k in self._candidates(s.name) if bias[k] < self.tol]
            named = None if self.objective is None else bias[self.objective]
            closest = " = ".join(exact) if exact else self.closest(s.name)
            out.append({"scenario": s.name, "named": named, "closest": closest, **bias})
        return out

    def _table(self) -> tuple[list[str], list[list[str]]]:
        head = ["scenario", f"bias vs {self.objective}" if self.objective else "named", "closest", *OBJECTIVES]
        body = [
            [
                r["scenario"],
                "—" if r["named"] is None else _fmt(r["named"]),
                r["closest"],
                *(_fmt(r[k]) for k in OBJECTIVES),
            ]
            for r in self.rows
        ]
        return head, body

    def _title(self) -> str:
        named = f"; named objective: {self.objective}" if self.objective else ""
        uncorrected = "" if self.corrected else "; it takes no behavior_logp: uncorrected under μ"
        return f"audit of {self.loss} (β = {self.beta:g}{named}{uncorrected}): {self.statement()}"

    def to_markdown(self) -> str:
        """The table in Markdown, preceded by the one-sentence statement."""
        head, body = self._table()
        lines = [self._title(), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)

    def __str__(self) -> str:
        head, body = self._table()
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        lines = [self._title(), "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
        return "\n".join(lines)


def _name(loss_fn: Callable) -> str:
    """A function's qualified name (its repr holds an address), else the object's repr."""
    if inspect.isfunction(loss_fn) or inspect.ismethod(loss_fn):
        return loss_fn.__qualname__
    if isinstance(loss_fn, functools.partial):
        args = [repr(a) for a in loss_fn.args] + [f"{k}={v!r}" for k, v in loss_fn.keywords.items()]
        return f"{_name(loss_fn.func)}({', '.join(args)})"
    return repr(loss_fn)


def _own_beta(loss_fn: Callable) -> float | None:
    value = getattr(loss_fn, "beta", None)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return None
    return float(value)


def _scenario_problem(s: Scenario, seed: int, sigma: float):
    """(θ, θ_old, θ_ref, rewards, μ-logits or None) of one scenario: K = 5 actions (1 token) or K = 3
    per step (2 tokens), logits perturbed by N(0, 0.5²) from a common base, float64."""
    p = random_problem(k=5, seed=seed) if s.tokens == 1 else random_sequence_problem(k=3, seed=seed)
    logits, old, ref = p.logits, p.old_logits, p.ref_logits
    if not s.normalized:  # measures of total mass Z ≠ 1, a different Z for each policy
        logits, old, ref = (
            torch.log_softmax(x, -1) + z for x, z in zip((logits, old, ref), _UNNORMALIZED_LOG_MASS, strict=True)
        )
    if not s.off_policy:
        old = logits
    behavior = None
    if s.behavior:
        gen = torch.Generator().manual_seed(1000 + seed)
        behavior = old + sigma * torch.randn(old.shape, generator=gen, dtype=old.dtype)
    return logits, old, ref, p.rewards, behavior


def _candidate_gradient(key: str, s: Scenario, logits, ref, rewards, beta: float) -> torch.Tensor:
    """−∇J of the candidate objective ``key`` on one problem of scenario ``s``."""
    if key == "E[r]":
        key, beta = "rkl", 0.0
    div = key.removeprefix("seq-")
    if s.tokens == 1:  # a one-token response: its whole-response KL is the per-token one
        return -objective_gradient(div, logits, ref, rewards, beta, normalized=s.normalized)
    level = "sequence" if key.startswith("seq-") else "token"
    return -sequence_objective_gradient(logits, ref, rewards, beta, divergence=div, level=level)


@functools.lru_cache(maxsize=128)
def _targets(s: Scenario, seed: int, sigma: float, beta: float):
    """One problem of scenario ``s`` and −∇J of every candidate on it (computed once per setting)."""
    problem = _scenario_problem(s, seed, sigma)
    logits, _, ref, rewards, _ = problem
    targets: dict[str, torch.Tensor] = {}
    for key in OBJECTIVES:
        same = key.removeprefix("seq-") if s.tokens == 1 else key  # one token: seq-X is X
        targets[key] = targets[same] if same in targets else _candidate_gradient(key, s, logits, ref, rewards, beta)
    return problem, targets


def audit(
    loss_fn: Callable,
    *,
    objective: str | None = None,
    beta: float | None = None,
    advantages: Callable | None = None,
    reduction: str = "mean",
    seeds: tuple[int, ...] = (0, 1, 2),
    sigma: float = 0.2,
    scenarios: tuple[Scenario, ...] = SCENARIOS,
) -> Audit:
    r"""Which objective's gradient ``loss_fn`` follows, by exact enumeration: its exactness statement.

    For every scenario of ``SCENARIOS`` — one-token (K = 5 actions) and two-token (K = 3 per step)
    problems; on-policy (π_old = π_θ) and off-policy (π_old ≠ π_θ); normalized and unnormalized
    policies (one token); with a behaviour policy μ ≠ π_old (π_old's logits plus N(0, ``sigma``²)
    noise; the loss gets ``behavior_logp`` and applies its default correction), always with
    π_ref ≠ π_old — and for each candidate objective J of ``OBJECTIVES`` (E[r] alone, E[r] − β·D
    for D forward/reverse, normalized/unnormalized, per token or over whole responses), the
    relative bias ‖E[∇ℓ] + ∇J‖ / ‖∇J‖ of the loss's exact expected gradient E[∇ℓ]
    ([`expected_gradient`][rpg.testing.expected_gradient],
    [`sequence_expected_gradient`][rpg.testing.sequence_expected_gradient]), the largest over ``seeds``.
    Float64, deterministic.

    Args:
        loss_fn: any callable with rpg's calling convention (module docs: "A custom loss"),
            returning a [`LossOutput`][rpg.metrics.LossOutput] or a bare scalar tensor.
        objective: the objective the loss claims (a key of ``OBJECTIVES``); the table then shows
            the bias against it. ``None``: only the closest objective is reported.
        beta: β of the KL candidates. Default: ``loss_fn.beta`` when it is > 0, else 0.5 (so
            that E[r] and the KL objectives differ); a value that disagrees with ``loss_fn.beta``
            raises ``ValueError``. Pass it for a KL the loss does not hold, e.g. in the advantages.
        advantages: ``None`` (the reward is the advantage) or a callable
            ``(rewards, mask, old_logp, ref_logp) -> [B, T]``, e.g. REINFORCE++ returns.
        reduction: for a loss returning a bare scalar: ``"mean"`` (the mean of a response's
            per-token losses, rpg's ``token-mean``) or ``"sum"``.
        seeds: the random problems of each scenario.
        sigma: the std of μ's logit noise.
        scenarios: the scenarios to run (a subset of ``SCENARIOS``).

    Returns:
        an [`Audit`][rpg.testing.Audit]: ``print`` it, ``.to_markdown()``, ``.rows``, ``.records``,
        ``.followed(group)``, ``.bias(objective, group)``, ``.statement()``.
    """
    if objective is not None:
        check_choice("objective", objective, tuple(OBJECTIVES))
    own = _own_beta(loss_fn)
    if beta is None:
        beta = own if own is not None else 0.5
    else:
        beta = float(beta)
        if not (0 < beta < math.inf):
            raise ValueError(f"beta must be > 0 and finite (the KL candidates' coefficient), got {beta!r}")
        if own is not None and beta != own:
            raise ValueError(f"beta={beta!r} disagrees with loss_fn.beta={own!r}; leave beta=None to use the loss's")
    if not seeds:
        raise ValueError("seeds must name at least one problem")
    records = []
    for s in scenarios:
        if s not in SCENARIOS:
            raise ValueError(f"unknown scenario {s!r}; pass a subset of rpg.testing.SCENARIOS")
        worst = dict.fromkeys(OBJECTIVES, 0.0)
        for seed in seeds:
            problem, targets = _targets(s, seed, float(sigma), beta)
            logits, old, ref, rewards = (x.clone() for x in problem[:4])
            mu = None if problem[4] is None else problem[4].clone()
            if s.tokens == 1:
                got = expected_gradient(
                    loss_fn,
                    logits,
                    old,
                    rewards,
                    ref_logits=ref,
                    advantages=advantages,
                    behavior_logits=mu,
                    reduction=reduction,
                    normalized=s.normalized,
                )
            else:
                got = sequence_expected_gradient(
                    loss_fn,
                    logits,
                    old,
                    rewards,
                    ref_logits=ref,
                    advantages=advantages,
                    behavior_logits=mu,
                    reduction=reduction,
                )
            for key, want in targets.items():
                b = float((got - want).norm() / want.norm())
                worst[key] = max(worst[key], b if math.isfinite(b) else math.inf)
        records += [Record(s.name, k, v) for k, v in worst.items()]
    return Audit(_name(loss_fn), objective, beta, tuple(records), _accepts(loss_fn, "behavior_logp"))
