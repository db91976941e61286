r"""The four RPG objectives as per-token surrogates with closed-form derivatives.

The objective is J(θ) = E_{π_θ}[A] − β·D with D one of

| name | D | per-token KL surrogate | ∂/∂logp |
|---|---|---|---|
| ``fkl`` | KL(π_ref ‖ π_θ) | −c·logp | −c |
| ``rkl`` | KL(π_θ ‖ π_ref) | w·log ρ | w·(log ρ + 1) |
| ``ufkl`` | UKL(π_ref ‖ π_θ) | c·(ρ − 1 − log ρ) = c·k3 | w − c |
| ``urkl`` | UKL(π_θ ‖ π_ref) | w·(1/ρ − 1 + log ρ) = w·k3 | w·log ρ |

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

| name | penalty | ∂/∂logp |
|---|---|---|
| ``k1`` | log ρ | 1 |
| ``k2`` | ½ (log ρ)² | log ρ |
| ``k3`` | 1/ρ − 1 + log ρ | 1 − 1/ρ |

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
    "kl_accumulate",
    "kl_grad_split",
]

ESTIMATORS = ("k1", "k2", "k3")
KL_TERMS = DIVERGENCES + ESTIMATORS


def _k3_exp(x: torch.Tensor, scale, log_scale) -> torch.Tensor:
    """scale·(e^x − 1 − x): expm1 near x = 0; exp(log_scale + x) far from it, finite whenever scale·e^x is.

    ``scale``/``log_scale`` are tensors, or ``1.0``/``None`` for scale 1."""
    near = torch.expm1(x).sub_(x).mul_(scale)
    far = (x if log_scale is None else log_scale + x).exp()
    far.sub_((x + 1).mul_(scale))
    return torch.where(x.abs() < 1, near, far)


class _Ratios:
    """log ρ, −log ρ, c and log c of one batch, each computed once and only if asked for."""

    def __init__(self, logp, old_logp, ref_logp, log_w):
        self.logp, self.old_logp, self.ref_logp, self.log_w = logp, old_logp, ref_logp, log_w

    @property
    def log_rho(self):  # log π_θ − log π_ref
        if not hasattr(self, "_log_rho"):
            self._log_rho = self.log_w if self.ref_logp is None else self.logp - self.ref_logp
        return self._log_rho

    @property
    def neg_log_rho(self):  # a fresh tensor: callers may overwrite it
        return torch.neg(self.log_w) if self.ref_logp is None else self.ref_logp - self.logp

    @property
    def log_c(self):  # log π_ref − log π_old, or None when π_ref = π_old
        if not hasattr(self, "_log_c"):
            self._log_c = None if self.ref_logp is None else self.ref_logp - self.old_logp
        return self._log_c

    @property
    def c(self):
        if not hasattr(self, "_c"):
            self._c = 1.0 if self.ref_logp is None else self.log_c.exp()
        return self._c


def kl_accumulate(
    divergence: str,
    value: torch.Tensor | None,
    grad: torch.Tensor,
    beta: float,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    log_w: torch.Tensor,
    w: torch.Tensor,
) -> None:
    r"""In place: ``value += β·KL-surrogate`` (skipped when ``value`` is None) and ``grad += β·∂KL/∂logp``.

    The one implementation of every KL term (table above), written to make as
    few passes over memory as it can — on a CPU the fast path's cost is mostly
    fresh tensors. ``log_w = logp − old_logp`` and ``w = exp(log_w)`` come from
    the caller; ``ref_logp=None`` means π_ref = π_old (c = 1). ``value`` and
    ``grad`` are ``[B, T]`` tensors the caller owns. Inputs must be detached.
    """
    r = _Ratios(logp, old_logp, ref_logp, log_w)
    if divergence == "fkl":  # −c·logp → −c
        if value is not None:
            value.sub_(logp if ref_logp is None else logp * r.c, alpha=beta)
        grad.sub_(beta) if ref_logp is None else grad.sub_(r.c, alpha=beta)
    elif divergence == "rkl":  # w·log ρ → w·(log ρ + 1)
        w_log_rho = w * r.log_rho
        if value is not None:
            value.add_(w_log_rho, alpha=beta)
        grad.add_(w_log_rho.add_(w), alpha=beta)
    elif divergence == "ufkl":  # c·(ρ − 1 − log ρ) → w − c
        if value is not None:
            value.add_(_k3_exp(r.log_rho, r.c, r.log_c), alpha=beta)
        grad.add_(w, alpha=beta)
        grad.sub_(beta) if ref_logp is None else grad.sub_(r.c, alpha=beta)
    elif divergence == "urkl":  # w·(1/ρ − 1 + log ρ) → w·log ρ
        if value is not None:
            value.add_(_k3_exp(-r.log_rho, w, log_w), alpha=beta)
        grad.addcmul_(w, r.log_rho, value=beta)
    elif divergence == "k1":  # log ρ → 1
        if value is not None:
            value.add_(r.log_rho, alpha=beta)
        grad.add_(beta)
    elif divergence == "k2":  # ½(log ρ)² → log ρ
        if value is not None:
            value.addcmul_(r.log_rho, r.log_rho, value=0.5 * beta)
        grad.add_(r.log_rho, alpha=beta)
    elif divergence == "k3":  # 1/ρ − 1 + log ρ → 1 − 1/ρ, with t = −log ρ: k3 = expm1(t) − t
        t = r.neg_log_rho
        e = torch.expm1(t)
        if value is not None:
            value.add_(e, alpha=beta).sub_(t, alpha=beta)
        grad.sub_(e, alpha=beta)
    else:
        check_choice("kl", divergence, KL_TERMS)


def kl_grad_split(
    divergence: str, logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, log_w: torch.Tensor
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    r"""The KL derivative split by its importance weight: ∂KL/∂logp = w·per_w + const.

    fkl: (0, −c); rkl: (log ρ + 1, 0); ufkl: (1, −c); urkl: (log ρ, 0); the
    unweighted estimators: (0, ∂k/∂logp). The REINFORCE weight is then
    g = w·(A − β·per_w) − β·const, so the effective advantage is A′ = g/w, and
    truncation (:class:`rpg.Truncate`) replaces only the weight w by w̄ — log ρ
    and c stay exact (DESIGN §4).
    """
    r = _Ratios(logp, old_logp, ref_logp, log_w)
    if divergence == "fkl":
        return 0.0, -r.c
    if divergence == "rkl":
        return r.log_rho + 1, 0.0
    if divergence == "ufkl":
        return 1.0, -r.c
    if divergence == "urkl":
        return r.log_rho, 0.0
    if divergence in ESTIMATORS:  # unweighted penalties: no importance weight in their derivative
        return 0.0, kl_term(divergence, logp, old_logp, ref_logp)[1]
    check_choice("kl", divergence, KL_TERMS)
    raise AssertionError("unreachable")  # pragma: no cover


def kl_term(
    divergence: str, logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token KL term of ``divergence`` (β excluded) and its ∂/∂logp.

    Args:
        divergence: one of :data:`KL_TERMS` (tables above).
        logp: ``[B, T]`` log π_θ of the sampled tokens.
        old_logp: ``[B, T]`` log π_old (behaviour policy).
        ref_logp: ``[B, T]`` log π_ref; ``None`` means π_ref = π_old.

    Returns:
        ``(value, grad)``, both fresh ``[B, T]`` tensors: the surrogate value and
        its closed-form derivative with respect to ``logp``. No autograd graph
        (the losses wrap this for autograd). For the divergences the expected
        derivative E_old[grad·∇logp] is exactly ∇D, in the direction its name says.
    """
    check_choice("kl", divergence, KL_TERMS)
    logp, old_logp = logp.detach(), old_logp.detach()
    ref_logp = None if ref_logp is None else ref_logp.detach()
    log_w = logp - old_logp
    value, grad = torch.zeros_like(log_w), torch.zeros_like(log_w)
    kl_accumulate(divergence, value, grad, 1.0, logp, old_logp, ref_logp, log_w, log_w.exp())
    return value, grad


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
