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
those of a divergence off-policy (see [`rpg.kl`][rpg.kl]); they exist to express the
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
autograd graph: the losses wrap them in one ``autograd.Function`` that
saves a single tensor. Values are exact — no clamp — and the
unnormalized ones are evaluated with ``expm1`` near ρ = 1 and from w and c far
from it, so ρ never overflows while w and c are finite.

**The registry.** Each KL term is one [`KLTerm`][rpg.objectives.KLTerm] record in
[`REGISTRY`][rpg.objectives.REGISTRY]: its in-place value/derivative update, its derivative split by
the importance weight (what truncation needs), and the advantage shift that
folds it into the clipped advantage where folding is exact. ``KL_TERMS``,
``DIVERGENCES`` and ``ESTIMATORS`` are read from it, and nothing else in the
library branches on a term's name: adding a term is one record here (plus its
exact divergence in [`rpg.kl`][rpg.kl] if it is one) and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._util import check_choice

__all__ = [
    "DIVERGENCES",
    "ESTIMATORS",
    "KL_TERMS",
    "KLTerm",
    "REGISTRY",
    "kl_term",
    "surrogate",
    "reinforce_weight",
]


class Ratios:
    r"""The per-token quantities of one batch, each computed once and only if asked for.

    ``logp``, ``old_logp`` and ``ref_logp`` (``None``: π_ref = π_old) are detached ``[B, T]``
    tensors; ``log_w = logp − old_logp`` and ``w`` may be given by a caller that has them.
    """

    def __init__(self, logp, old_logp, ref_logp=None, log_w=None, w=None):
        self.logp, self.old_logp, self.ref_logp = logp, old_logp, ref_logp
        self._log_w, self._w = log_w, w

    @property
    def log_w(self):  # log π_θ − log π_old
        if self._log_w is None:
            self._log_w = self.logp - self.old_logp
        return self._log_w

    @property
    def w(self):
        if self._w is None:
            self._w = self.log_w.exp()
        return self._w

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
    def c(self):  # π_ref / π_old: a tensor, or 1.0 when π_ref = π_old
        if not hasattr(self, "_c"):
            self._c = 1.0 if self.ref_logp is None else self.log_c.exp()
        return self._c


def _k3(x: torch.Tensor, scale, far: torch.Tensor) -> torch.Tensor:
    """scale·(e^x − 1 − x), a fresh tensor: ``expm1`` near x = 0; ``far`` = scale·e^x (given) away from it.

    ``far`` comes from quantities the kernel already has (w or c), so ρ = e^x is never formed
    and never overflows while w and c are finite; ``scale`` is a tensor or ``1.0``."""
    near = torch.expm1(x).sub_(x)
    if not isinstance(scale, float):
        near.mul_(scale)
    far = far - (x + 1) * scale
    return torch.where(x.abs() < 1, near, far)


def _sub_c(grad: torch.Tensor, beta: float, r: Ratios) -> None:
    grad.sub_(beta) if r.ref_logp is None else grad.sub_(r.c, alpha=beta)


# --- the records --------------------------------------------------------------------------


@dataclass(frozen=True)
class KLTerm:
    r"""One KL term of the framework: everything the library needs to know about it, in one place.

    Attributes:
        name: the ``kl=`` name (``"rkl"``, ``"k3"``, …).
        divergence: ``True`` for an objective D whose surrogate's expected gradient is exactly ∇D
            (an exact divergence of the same name lives in [`rpg.kl.divergence`][rpg.kl.divergence]); ``False``
            for an unweighted estimator used as a penalty.
        surrogate: the per-token surrogate as a formula (β excluded), for docs and errors.
        accumulate: ``(value | None, grad, beta, r) -> None``: in place, ``value += β·surrogate``
            (skipped when ``value`` is None) and ``grad += β·∂surrogate/∂logp``, ``r`` a `Ratios`.
        split: ``r -> (per_w, const)`` with ∂surrogate/∂logp = w·per_w + const: the importance
            weight factored out, so truncation can replace w by w̄ and keep log ρ and c exact.
        fold: ``r -> shift`` such that Â = A − β·shift is the exact folded advantage g/w of
            Algorithm 1, or ``None`` where folding the term into the clipped advantage is biased.
    """

    name: str
    divergence: bool
    surrogate: str
    accumulate: Callable
    split: Callable
    fold: Callable | None = None


def _fkl(value, grad, beta, r):  # −c·logp → −c
    if value is not None:
        value.sub_(r.logp if r.ref_logp is None else r.logp * r.c, alpha=beta)
    _sub_c(grad, beta, r)


def _rkl(value, grad, beta, r):  # w·log ρ → w·(log ρ + 1)
    w_log_rho = r.w * r.log_rho
    if value is not None:
        value.add_(w_log_rho, alpha=beta)
    grad.add_(w_log_rho.add_(r.w), alpha=beta)


def _ufkl(value, grad, beta, r):  # c·(ρ − 1 − log ρ) → w − c; far from ρ = 1: c·ρ = w
    if value is not None:
        x = r.log_rho
        if r.ref_logp is not None:  # π_ref = 0 (log ρ = +∞, c = 0): the limit w, not (∞ + 1)·0 = NaN
            x = x.clamp(max=torch.finfo(x.dtype).max)
        value.add_(_k3(x, r.c, r.w), alpha=beta)
    grad.add_(r.w, alpha=beta)
    _sub_c(grad, beta, r)


def _urkl(value, grad, beta, r):  # w·(1/ρ − 1 + log ρ) → w·log ρ; far from ρ = 1: w/ρ = c
    if value is not None:
        far = 1.0 if r.ref_logp is None else r.c
        value.add_(_k3(r.neg_log_rho, r.w, far), alpha=beta)
    grad.addcmul_(r.w, r.log_rho, value=beta)


def _k1(value, grad, beta, r):  # log ρ → 1
    if value is not None:
        value.add_(r.log_rho, alpha=beta)
    grad.add_(beta)


def _k2(value, grad, beta, r):  # ½(log ρ)² → log ρ
    if value is not None:
        value.addcmul_(r.log_rho, r.log_rho, value=0.5 * beta)
    grad.add_(r.log_rho, alpha=beta)


def _k3_penalty(value, grad, beta, r):  # 1/ρ − 1 + log ρ → 1 − 1/ρ; with t = −log ρ: expm1(t) − t
    t = r.neg_log_rho
    e = torch.expm1(t)
    if value is not None:
        value.add_(e, alpha=beta).sub_(t, alpha=beta)
    grad.sub_(e, alpha=beta)


def _unweighted(term):
    """The split of an unweighted penalty: no importance weight in its derivative."""

    def split(r):
        grad = torch.zeros_like(r.log_w)
        term(None, grad, 1.0, r)
        return 0.0, grad

    return split


REGISTRY: dict[str, KLTerm] = {}


def register(term: KLTerm) -> KLTerm:
    """Add a [`KLTerm`][rpg.objectives.KLTerm] to [`REGISTRY`][rpg.objectives.REGISTRY] (its name must be new)."""
    if term.name in REGISTRY:
        raise ValueError(f"KL term {term.name!r} is already registered")
    REGISTRY[term.name] = term
    return term


register(KLTerm("fkl", True, "−c·logp", _fkl, lambda r: (0.0, -r.c)))
register(KLTerm("rkl", True, "w·log ρ", _rkl, lambda r: (r.log_rho + 1, 0.0), fold=lambda r: r.log_rho + 1))
register(KLTerm("ufkl", True, "c·(ρ − 1 − log ρ)", _ufkl, lambda r: (1.0, -r.c)))
register(KLTerm("urkl", True, "w·(1/ρ − 1 + log ρ)", _urkl, lambda r: (r.log_rho, 0.0), fold=lambda r: r.log_rho))
register(KLTerm("k1", False, "log ρ", _k1, _unweighted(_k1)))
register(KLTerm("k2", False, "½(log ρ)²", _k2, _unweighted(_k2)))
register(KLTerm("k3", False, "1/ρ − 1 + log ρ", _k3_penalty, _unweighted(_k3_penalty)))

DIVERGENCES = tuple(name for name, t in REGISTRY.items() if t.divergence)
ESTIMATORS = tuple(name for name, t in REGISTRY.items() if not t.divergence)
KL_TERMS = tuple(REGISTRY)


def get(name: str) -> KLTerm:
    """The registered [`KLTerm`][rpg.objectives.KLTerm] called ``name`` (``ValueError`` listing the valid names otherwise)."""
    check_choice("kl", name, KL_TERMS)
    return REGISTRY[name]


# --- public per-token functions ------------------------------------------------------------


def kl_term(
    divergence: str, logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token KL term of ``divergence`` (β excluded) and its ∂/∂logp.

    Args:
        divergence: one of [`KL_TERMS`][rpg.objectives.KL_TERMS] (tables above).
        logp: ``[B, T]`` log π_θ of the sampled tokens.
        old_logp: ``[B, T]`` log π_old (the policy that sampled the tokens).
        ref_logp: ``[B, T]`` log π_ref; ``None`` means π_ref = π_old.

    Returns:
        ``(value, grad)``, both fresh ``[B, T]`` tensors: the surrogate value and
        its closed-form derivative with respect to ``logp``. No autograd graph
        (the losses wrap this for autograd). For the divergences the expected
        derivative E_old[grad·∇logp] is exactly ∇D, in the direction its name says.
    """
    term = get(divergence)
    logp, old_logp = logp.detach(), old_logp.detach()
    r = Ratios(logp, old_logp, None if ref_logp is None else ref_logp.detach())
    value, grad = torch.zeros_like(r.log_w), torch.zeros_like(r.log_w)
    term.accumulate(value, grad, 1.0, r)
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
    wa = (logp.detach() - old_logp.detach()).exp() * advantages
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
