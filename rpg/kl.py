r"""KL divergences and their sample estimators: the one place directions are defined.

Directions, fixed for the whole library (docs/design.md, “Notation”):

* **forward** KL  = KL(π_ref ‖ π_θ) = Σ π_ref · log(π_ref / π_θ)
* **reverse** KL  = KL(π_θ ‖ π_ref) = Σ π_θ · log(π_θ / π_ref)
* unnormalized KL adds the mass term: UKL(p ‖ q) = Σ p·log(p/q) + Σ (q − p).
  For normalized distributions the mass term is 0; it matters for unnormalized
  measures (e.g. a truncated sampler π_old with mass Z_old < 1, paper §3).

Sample estimators (Schulman's k1/k2/k3). For tokens x ~ q and r = p(x)/q(x),
each estimates KL(q ‖ p):

| name | value | bias |
|---|---|---|
| k1 | −log r | unbiased |
| k2 | ½ (log r)² | biased (2nd order) |
| k3 | (r − 1) − log r | unbiased, ≥ 0 |

Signature ``kX(log_q, log_p)``: the **first argument is the distribution the
tokens were sampled from**. GRPO's penalty is ``k3(logp, ref_logp)``: tokens
treated as sampled from π_θ, p = π_ref.

Their *gradients*, when the value is used as a loss, are a different matter
(docs/estimators.md, verified by exact enumeration in ``tests/test_kl.py``). With tokens
from π_old:

| term | on-policy (π_old=π_θ) | off-policy |
|---|---|---|
| k1 as loss | 0 | wrong |
| k2 as loss | ∇ reverse KL | wrong |
| k3 as loss (GRPO) | ∇ **forward** KL | wrong |
| w·k3(π_θ→π_ref), w differentiable | ∇ reverse KL | ∇ reverse KL (= URKL) |
| sg(w)·k2 | ∇ reverse KL | ∇ reverse KL |
| k1 in reward, return-to-go (REINFORCE++) | ∇ sequence reverse KL | needs IS |

Values are never clamped: a log-ratio of 50 gives k3 = e^50 − 51, as the math
says. bf16/fp16 inputs are computed in float32.

Paper: Zhang et al., "On the Design of KL-Regularized Policy Gradient
Algorithms for LLM Reasoning", ICLR 2026 (arXiv 2505.17508), §2 and App. C.
"""

from __future__ import annotations

import torch

from ._util import check_choice, upcast

__all__ = ["k1", "k2", "k3", "kl", "ukl", "forward_kl", "reverse_kl", "divergence", "DIVERGENCES"]

DIVERGENCES = ("fkl", "rkl", "ufkl", "urkl")


def _log_ratio(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return upcast(log_p) - upcast(log_q)


def k1(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    r"""k1 = −log r = log q(x) − log p(x): unbiased estimate of KL(q ‖ p) for x ~ q.

    Args:
        log_q: ``[...]`` log-prob of each token under the sampling distribution q.
        log_p: ``[...]`` log-prob of the same tokens under p.

    Returns:
        ``[...]`` per-token values (float32 for bf16/fp16 inputs). Nothing is
        detached: gradients flow to whichever input requires them. As a loss its
        gradient is 0 on-policy (E_q[∇ log q] = 0) and wrong off-policy.
    """
    return -_log_ratio(log_q, log_p)


def k2(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    r"""k2 = ½ (log r)², r = p(x)/q(x): biased (second-order) estimate of KL(q ‖ p), x ~ q.

    Shapes as [`k1`][rpg.kl.k1]. As a loss in ``log_q = logp`` its gradient is
    ∇ KL(π_θ ‖ p) on-policy; ``sg(w)·k2`` keeps that off-policy (docs/estimators.md).
    """
    d = _log_ratio(log_q, log_p)
    return 0.5 * d * d


def k3(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    r"""k3 = (r − 1) − log r, r = p(x)/q(x): unbiased, non-negative estimate of KL(q ‖ p), x ~ q.

    Computed as ``expm1(log r) − log r``: absolute error a few ulps of
    |log r| near r = 1 (the naive (r − 1) − log r loses a few ulps of 1), and
    no clamp far from it. GRPO's penalty is ``k3(logp, ref_logp)``; as a loss its
    gradient is ∇ **forward** KL(π_ref ‖ π_θ) on-policy and neither direction
    off-policy. Multiplied by a differentiable w it becomes the URKL surrogate
    (paper Prop. 3.6). Shapes as [`k1`][rpg.kl.k1].
    """
    d = _log_ratio(log_q, log_p)
    return torch.expm1(d) - d


def _xlogy_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p · (log p − log q), with value and gradient 0 where p = 0 (even if q = 0).

    Both logs are replaced by 0 where p = 0 *before* the product, so the branch
    ``torch.where`` discards has no inf in it and no NaN reaches the gradient."""
    p = log_p.exp()
    support = p > 0
    zero = torch.zeros_like(p)
    safe = torch.where(support, log_p, zero) - torch.where(support, log_q, zero)
    return torch.where(support, p * safe, zero)


def kl(log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Exact KL(p ‖ q) = Σ p · log(p/q) over ``dim`` (normalized or not: no mass term).

    Args:
        log_p: ``[..., K, ...]`` log-probabilities (or log-measures) of p.
        log_q: the same for q, over the same support; both reduced over ``dim``.
        dim: the support dimension.

    Returns:
        ``[...]`` with ``dim`` removed. Fully differentiable in both arguments.
    """
    log_p, log_q = upcast(log_p), upcast(log_q)
    return _xlogy_ratio(log_p, log_q).sum(dim)


def ukl(log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Exact unnormalized KL: UKL(p ‖ q) = Σ p·log(p/q) + Σ (q − p) over ``dim``.

    Equals [`kl`][rpg.kl.kl] when p and q have equal mass; differs for unnormalized
    measures (paper §3, Props. 3.2 and 3.6). Shapes as [`kl`][rpg.kl.kl].
    """
    log_p, log_q = upcast(log_p), upcast(log_q)
    return (_xlogy_ratio(log_p, log_q) + log_q.exp() - log_p.exp()).sum(dim)


def forward_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, dim: int = -1, *, unnormalized: bool = False
) -> torch.Tensor:
    r"""Exact forward KL(π_ref ‖ π_θ) (or UKL with ``unnormalized=True``) over ``dim``.

    ``logp`` are log π_θ over the whole support, ``ref_logp`` log π_ref.
    """
    return (ukl if unnormalized else kl)(ref_logp, logp, dim)


def reverse_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, dim: int = -1, *, unnormalized: bool = False
) -> torch.Tensor:
    r"""Exact reverse KL(π_θ ‖ π_ref) (or UKL with ``unnormalized=True``) over ``dim``."""
    return (ukl if unnormalized else kl)(logp, ref_logp, dim)


def divergence(name: str, logp: torch.Tensor, ref_logp: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Exact divergence D named as in the RPG losses, over the full support ``dim``.

    ``"fkl"`` = KL(π_ref‖π_θ), ``"rkl"`` = KL(π_θ‖π_ref), ``"ufkl"`` = UKL(π_ref‖π_θ),
    ``"urkl"`` = UKL(π_θ‖π_ref). Used by the exact oracle ([`rpg.testing`][rpg.testing])
    to define J(θ) = E_{π_θ}[A] − β·D.
    """
    check_choice("divergence", name, DIVERGENCES)
    fn = forward_kl if name in ("fkl", "ufkl") else reverse_kl
    return fn(logp, ref_logp, dim, unnormalized=name.startswith("u"))
