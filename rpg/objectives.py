r"""The four RPG objectives as per-token surrogates with closed-form derivatives.

The objective is J(θ) = E_{π_θ}[A] − β·D with D one of

=========  ===================  ==============================================
name       D                    per-token KL surrogate (value → ∂/∂logp)
=========  ===================  ==============================================
``fkl``    KL(π_ref ‖ π_θ)      −c·logp                       → −c
``rkl``    KL(π_θ ‖ π_ref)      w·log ρ                       → w·(log ρ + 1)
``ufkl``   UKL(π_ref ‖ π_θ)     c·(ρ − 1 − log ρ) = c·k3      → w − c
``urkl``   UKL(π_θ ‖ π_ref)     w·(1/ρ − 1 + log ρ) = w·k3    → w·log ρ
=========  ===================  ==============================================

with tokens sampled from π_old and, per token (all ``[B, T]``),
``log w = logp − old_logp`` (w = π_θ/π_old), ``log ρ = logp − ref_logp``
(ρ = π_θ/π_ref) and ``c = exp(ref_logp − old_logp)`` (π_ref/π_old, constant).
With ``ref_logp = old_logp`` (the default, RPG's iterative reference) c = 1 and
ρ = w, which is the paper's setting.

Besides the four divergences, the KL term can be an *estimator used as a
penalty* (``"k1"``, ``"k2"``, ``"k3"``), unweighted, with the tokens treated as
if drawn from π_θ — GRPO's ``β·k3(logp → ref)`` is ``"k3"``. These are what
verl calls ``kl``, ``mse`` and ``low_var_kl``. Their expected gradients are not
those of a divergence off-policy (see :mod:`rpg.kl`); they exist to express the
published algorithms, and importance-weighting k3 turns it into ``"urkl"``.

=========  ==========================  =============================
``k1``     log ρ                       → 1
``k2``     ½ (log ρ)²                  → log ρ
``k3``     1/ρ − 1 + log ρ             → 1 − 1/ρ
=========  ==========================  =============================

The fully differentiable per-token loss (paper Table 1, Props. 3.2, 3.6, E.1,
E.3) is ℓ = −w·A + β·KL-surrogate, and its derivative with respect to ``logp``
is the weight of the REINFORCE-style loss with the sign flipped:
g = −∂ℓ/∂logp (paper Table 2, Props. F.1–F.5). For every divergence,
E_{π_old}[∂ℓ/∂logp · ∇logp] = −∇J exactly, also when π_ref ≠ π_old
(checked by exact enumeration in ``tests/test_objectives.py``).

Every per-token loss is a scalar function of the scalar ``logp``, so each
function here returns its value *and* its derivative in one pass, with no
autograd graph: :mod:`rpg.losses` wraps them in one ``autograd.Function`` that
saves a single tensor (DESIGN §7). Values are exact — no clamp — and the
unnormalized ones are evaluated with ``expm1`` near ρ = 1 and in log space far
from it, so ρ never overflows while w and c are finite.
"""

from __future__ import annotations

import torch

from ._util import check_choice
from .kl import DIVERGENCES

__all__ = [
    "DIVERGENCES",
    "ESTIMATORS",
    "KL_TERMS",
    "kl_term",
    "surrogate",
    "reinforce_weight",
    "kl_value_and_grad",
    "kl_grad_split",
]

ESTIMATORS = ("k1", "k2", "k3")
KL_TERMS = DIVERGENCES + ESTIMATORS


def _k3_exp(x: torch.Tensor, scale, log_scale) -> torch.Tensor:
    """scale·(e^x − 1 − x): expm1 near x = 0; exp(log_scale + x) far from it, finite whenever scale·e^x is.

    ``scale``/``log_scale`` are tensors, or ``1.0``/``None`` for scale 1."""
    small = x.abs() < 1
    near = scale * (torch.expm1(x) - x)
    far = torch.exp(x if log_scale is None else log_scale + x) - scale * (1 + x)
    return torch.where(small, near, far)


def kl_value_and_grad(
    divergence: str, log_w: torch.Tensor, log_c: torch.Tensor | None, logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""KL surrogate value and its derivative in ``logp``, from log w, log c and logp.

    The internal form of :func:`kl_term`, taking ``log_w = logp − old_logp`` and
    ``log_c = ref_logp − old_logp`` already formed; ``log_c=None`` means
    π_ref = π_old (c = 1), and saves two passes over the batch.
    """
    log_rho = log_w if log_c is None else log_w - log_c
    c = 1.0 if log_c is None else log_c.exp()
    if divergence == "fkl":
        return -c * logp, -c * torch.ones_like(logp) if log_c is None else -c
    if divergence == "rkl":
        w = log_w.exp()
        return w * log_rho, w * (log_rho + 1)
    if divergence == "ufkl":
        w = log_w.exp()
        return _k3_exp(log_rho, c, log_c), w - c
    if divergence == "urkl":
        w = log_w.exp()
        return _k3_exp(-log_rho, w, log_w), w * log_rho
    if divergence == "k1":
        return log_rho, torch.ones_like(log_rho)
    if divergence == "k2":
        return 0.5 * log_rho * log_rho, log_rho
    if divergence == "k3":
        e = torch.expm1(-log_rho)
        return e + log_rho, -e
    check_choice("kl", divergence, KL_TERMS)
    raise AssertionError("unreachable")  # pragma: no cover


def kl_grad_split(
    divergence: str, log_w: torch.Tensor, log_c: torch.Tensor | None
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    r"""The KL derivative split by its importance weight: ∂KL/∂logp = w·per_w + const.

    fkl: (0, −c); rkl: (log ρ + 1, 0); ufkl: (1, −c); urkl: (log ρ, 0). The
    REINFORCE weight is then g = w·(A − β·per_w) − β·const, so the effective
    advantage is A′ = g/w, and truncation (:class:`rpg.Truncate`) replaces only
    the weight w by w̄ — log ρ and c stay exact (DESIGN §4).
    """
    log_rho = log_w if log_c is None else log_w - log_c
    c = 1.0 if log_c is None else log_c.exp()
    if divergence == "fkl":
        return 0.0, -c
    if divergence == "rkl":
        return log_rho + 1, 0.0
    if divergence == "ufkl":
        return 1.0, -c
    if divergence == "urkl":
        return log_rho, 0.0
    if divergence in ESTIMATORS:  # unweighted penalties: no importance weight in their derivative
        return 0.0, kl_value_and_grad(divergence, log_w, log_c, log_rho)[1]
    check_choice("kl", divergence, KL_TERMS)
    raise AssertionError("unreachable")  # pragma: no cover


def kl_term(
    divergence: str, logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token KL surrogate of ``divergence`` (β excluded) and its ∂/∂logp.

    Args:
        divergence: ``"fkl"``, ``"rkl"``, ``"ufkl"`` or ``"urkl"`` (table above).
        logp: ``[B, T]`` log π_θ of the sampled tokens.
        old_logp: ``[B, T]`` log π_old (behaviour policy).
        ref_logp: ``[B, T]`` log π_ref; ``None`` means π_ref = π_old.

    Returns:
        ``(value, grad)``, both ``[B, T]``: the surrogate value and its closed-form
        derivative with respect to ``logp``. No autograd graph is built; the
        expected derivative E_old[grad·∇logp] is exactly ∇D (the divergence's
        gradient, in the direction its name says).
    """
    log_c = None if ref_logp is None else ref_logp - old_logp
    return kl_value_and_grad(divergence, logp - old_logp, log_c, logp)


def surrogate(
    divergence: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    beta: float,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fully differentiable RPG per-token loss ℓ = −w·A + β·KL-surrogate, and ∂ℓ/∂logp.

    ``advantages`` broadcasts against ``logp`` (``[B, 1]`` or ``[B, T]``) and is a
    constant. Returns ``(value, grad)``, ``[B, T]``; E_old[grad·∇logp] = −∇J
    for J = E_{π_θ}[A] − β·D (paper Props. 3.2, 3.6, E.1, E.3).
    """
    kl_v, kl_g = kl_term(divergence, logp, old_logp, ref_logp)
    wa = (logp - old_logp).exp() * advantages
    return beta * kl_v - wa, beta * kl_g - wa


def reinforce_weight(
    divergence: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    beta: float,
    ref_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""REINFORCE-style weight g = −∂ℓ/∂logp, so that ℓ = −sg(g)·logp has the RPG gradient.

    fkl: g = w·A + β·c; rkl: g = w·(A − β(log ρ + 1)); ufkl: g = w·A − β(w − c);
    urkl: g = w·(A − β·log ρ) (paper Table 2, Props. F.1–F.5, with c = π_ref/π_old).
    Returns ``[B, T]``; a value, never differentiated.
    """
    return -surrogate(divergence, logp, old_logp, advantages, beta=beta, ref_logp=ref_logp)[1]
