r"""Exact tabular oracle: unit-test a policy loss against the gradient of its objective.

A one-step "language model" over K actions is small enough to enumerate. With
logits θ ∈ R^K the policy is π_θ = softmax(θ) (``normalized=True``) or the
unnormalized measure π_θ(a) = exp(θ_a) (``normalized=False``, where the
normalized and unnormalized divergences differ: the mass term of UKL is 0 for
normalized policies, so there fkl ≡ ufkl and rkl ≡ urkl in expectation).

* :func:`objective` — J(θ) = Σ_a π_θ(a)·A(a) − β·D(π_θ, π_ref), exact.
* :func:`objective_gradient` — ∇J(θ), by autograd through the exact J.
* :func:`expected_gradient` — the expected gradient of a loss over tokens drawn
  from π_old: Σ_a π_old(a)·∇_θ ℓ(a), where ℓ(a) is the loss's ``per_token``
  entry for action a (a batch holding each action once, so the aggregation
  mode does not matter). For an unnormalized π_old the weights are the
  unnormalized masses: Σ_a π_old(a)·∇ℓ(a) = Z_old·E_{π̃_old}[∇ℓ], the paper's
  Z_old factor (Props. 3.2, 3.6).

A loss is exact for its objective when ``expected_gradient(...)`` equals
``-objective_gradient(...)``; test it off-policy (θ ≠ θ_old) and with
π_ref ≠ π_old in float64 — on-policy alone cannot tell the divergences apart::

    import rpg, rpg.testing as T
    p = T.random_problem(k=6, seed=0)
    loss_fn = rpg.RPGLoss("rkl", style="reinforce", beta=0.5, clip=None)
    got = T.expected_gradient(loss_fn, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits)
    want = -T.objective_gradient("rkl", p.logits, p.ref_logits, p.rewards, beta=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .kl import divergence as _divergence

__all__ = ["Problem", "random_problem", "log_policy", "objective", "objective_gradient", "expected_gradient"]


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
    r"""Exact J(θ) = Σ_a π_θ(a)·A(a) − β·D(π_θ, π_ref), D named as in :func:`rpg.kl.divergence`."""
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
) -> torch.Tensor:
    r"""Σ_a π_old(a)·∇_θ ℓ(a), ``[K]``: the exact expected gradient of ``loss_fn`` over π_old.

    ``loss_fn`` follows the ``rpg`` call contract (DESIGN §6) and is called once
    on a batch of K sequences of one token each (``[K, 1]``), action a in row
    a, with ``advantages = rewards``. ``ref_logits=None`` means π_ref = π_old.
    """
    theta = logits.detach().clone().requires_grad_(True)
    logp = log_policy(theta, normalized)[:, None]
    old_logp = log_policy(old_logits, normalized).detach()[:, None]
    ref_logp = None if ref_logits is None else log_policy(ref_logits, normalized).detach()[:, None]
    out = loss_fn(logp, old_logp, rewards, torch.ones_like(logp, dtype=torch.bool), ref_logp=ref_logp)
    weighted = (old_logp.exp() * out.per_token).sum()
    (grad,) = torch.autograd.grad(weighted, theta)
    return grad
