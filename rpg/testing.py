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

A loss is exact for its objective when ``expected_gradient(...)`` equals
``-objective_gradient(...)``; test it off-policy (θ ≠ θ_old) and with
π_ref ≠ π_old in float64 — on-policy alone cannot tell the divergences apart:

```python
import rpg, rpg.testing as T
p = T.random_problem(k=6, seed=0)
loss_fn = rpg.RPGLoss("rkl", style="reinforce", beta=0.5, clip=None)
got = T.expected_gradient(loss_fn, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits)
want = -T.objective_gradient("rkl", p.logits, p.ref_logits, p.rewards, beta=0.5)
torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
```
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch

from .functional import unnormalized_policies
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
) -> torch.Tensor:
    r"""Σ_a π_old(a)·∇_θ ℓ(a), ``[K]``: the exact expected gradient of ``loss_fn`` over π_old.

    ``loss_fn`` follows the ``rpg`` call contract and is called once on a batch
    of K sequences of one token each (``[K, 1]``), action a in row a, with
    ``advantages = rewards``. ``ref_logits=None`` means π_ref = π_old.

    With ``behavior_logits`` (a rollout engine μ ≠ π_old) the tokens are drawn from
    μ instead: the result is Σ_a μ(a)·∇ℓ(a), and the loss is called with
    ``behavior_logp = log μ`` so that its correction applies. Then a token-level
    correction is exact when this equals ``-objective_gradient(...)``.
    """
    theta = logits.detach().clone().requires_grad_(True)
    logp = log_policy(theta, normalized)[:, None]
    old_logp = log_policy(old_logits, normalized).detach()[:, None]
    ref_logp = None if ref_logits is None else log_policy(ref_logits, normalized).detach()[:, None]
    sampler = old_logp if behavior_logits is None else log_policy(behavior_logits, normalized).detach()[:, None]
    s = _support(sampler)  # only the actions the sampler can draw are ever in a batch
    kwargs = {} if behavior_logits is None else {"behavior_logp": sampler[s]}
    ref = None if ref_logp is None else ref_logp[s]
    with contextlib.nullcontext() if normalized else unnormalized_policies():  # log π(a) = θ_a may exceed 0
        out = loss_fn(
            logp[s], old_logp[s], rewards[s], torch.ones_like(logp[s], dtype=torch.bool), ref_logp=ref, **kwargs
        )
    weighted = (sampler[s].exp() * out.per_token).sum()
    (grad,) = torch.autograd.grad(weighted, theta)
    return grad


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


def sequence_objective(logits, ref_logits, rewards, beta: float) -> torch.Tensor:
    r"""Exact J(θ) = Σ_y π_θ(y)·R(y) − β·KL(π_θ(y) ‖ π_ref(y)) over all K² two-token sequences."""
    logp = sequence_token_logp(logits).sum(-1)
    ref = sequence_token_logp(ref_logits).sum(-1)
    p = logp.exp()
    return (p * rewards).sum() - beta * (p * (logp - ref)).sum()


def sequence_objective_gradient(logits, ref_logits, rewards, beta: float) -> torch.Tensor:
    """∇_θ of [`sequence_objective`][rpg.testing.sequence_objective], ``[K + K²]``."""
    theta = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sequence_objective(theta, ref_logits, rewards, beta), theta)
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
) -> torch.Tensor:
    r"""Σ_y π_old(y)·∇_θ Σ_t ℓ_t(y): the exact expected gradient of a per-token loss over sequences.

    The batch holds every sequence once (``[K², 2]``). ``advantages`` is ``None``
    (the sequence reward as a ``[B]`` advantage) or a callable
    ``(rewards, mask, old_logp, ref_logp) -> [B, T]`` — e.g. REINFORCE++ returns.

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
    mask = torch.ones_like(logp, dtype=torch.bool)
    adv = (
        rewards
        if advantages is None
        else advantages(rewards, mask, old_logp, old_logp if ref_logp is None else ref_logp)
    )
    behavior = None if behavior_logits is None else sequence_token_logp(behavior_logits).detach()
    sampler = old_logp if behavior is None else behavior
    s = _support(sampler)
    kwargs = {} if behavior is None else {"behavior_logp": behavior[s]}
    if weights is not None:
        kwargs["weights"] = weights(old_logp, sampler)[s]
    out = loss_fn(logp[s], old_logp[s], adv[s], mask[s], ref_logp=None if ref_logp is None else ref_logp[s], **kwargs)
    weighted = (sampler[s].sum(-1).exp()[:, None] * out.per_token).sum()
    (grad,) = torch.autograd.grad(weighted, theta)
    return grad


def correction_bias(
    loss_fn: Callable,
    problem: Problem,
    behavior_logits: torch.Tensor,
    *,
    weights: Callable | None = None,
    behavior: bool = True,
) -> float:
    r"""Relative bias ‖E_μ[∇ℓ′] + ∇J‖ / ‖∇J‖ of ``loss_fn`` on a two-step problem with an outcome reward.

    At θ = θ_old (the trainer's recomputed policy is the current one), sequences drawn from μ
    (``behavior_logits``), β = 0: J = E_{π_θ}[R(y)]. ``behavior=False`` calls the loss without
    ``behavior_logp`` (no correction) while still sampling from μ; ``weights`` as in
    [`sequence_expected_gradient`][rpg.testing.sequence_expected_gradient]. 0 means the correction is exact for this objective.
    """
    want = -sequence_objective_gradient(problem.logits, problem.ref_logits, problem.rewards, 0.0)
    if behavior:
        got = sequence_expected_gradient(
            loss_fn, problem.logits, problem.logits, problem.rewards, behavior_logits=behavior_logits, weights=weights
        )
    else:
        theta = problem.logits.detach().clone().requires_grad_(True)
        logp = sequence_token_logp(theta)
        old = sequence_token_logp(problem.logits).detach()
        mu = sequence_token_logp(behavior_logits).detach()
        s = _support(mu)
        kwargs = {} if weights is None else {"weights": weights(old, mu)[s]}
        out = loss_fn(logp[s], old[s], problem.rewards[s], torch.ones_like(logp[s], dtype=torch.bool), **kwargs)
        (got,) = torch.autograd.grad((mu[s].sum(-1).exp()[:, None] * out.per_token).sum(), theta)
    return float((got - want).norm() / want.norm())
