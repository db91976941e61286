r"""Clipping rules for importance ratios: PPO / dual clip, RPG-Style Clip, truncation.

Three rules, each a pure function of per-token tensors (DESIGN §4, paper §3.3,
§4.1, App. G, Algorithms 1 and 2). ``w = exp(logp − old_logp)``; ε_low, ε_high
and the dual bound c_dual come from :class:`Clip` / :class:`Truncate`.

**PPO / dual clip** (:func:`ppo`, Algorithm 1; GRPO, DAPO). For an advantage
analogue Â the per-token loss is
ℓ = max(−w·Â, −clip(w, 1−ε_low, 1+ε_high)·Â), and for Â < 0 with a dual bound
ℓ = min(ℓ, −c_dual·Â). Written as ℓ = −m·Â with the *effective ratio*

* Â > 0: m = min(w, 1+ε_high) — clipped (no gradient through w) when w ≥ 1+ε_high;
* Â < 0: m = min(max(w, 1−ε_low), c_dual) — clipped when w ≤ 1−ε_low or w ≥ c_dual.

In the differentiable RPG losses the clip acts on the policy-gradient term with
the detached A, and the KL surrogate is added outside the clip (what the
authors' experiments ran). ``fold_kl=True`` instead folds the KL into
Â = g/w with gradient flowing through it (Algorithm 1 as printed): exact in
expectation for rkl and urkl while no bound binds (the extra gradient is
β·w·∇logp, and E_old[w·∇logp] = ∇Σπ_θ = 0 for a normalized policy), but for
fkl and ufkl it drops the KL gradient β·E_old[c·∇logp] ≠ 0 entirely, so it is
refused there.

**RPG-Style Clip** (:func:`rpg_clip`, Algorithm 2, REINFORCE style). With the
REINFORCE weight g and the effective advantage A′ = g/w (same sign as g):

* A′ ≥ 0: the token keeps its gradient only while w < 1+ε_high;
* A′ < 0: only while 1−ε_low < w < c_dual.

Otherwise its gradient is 0 and its value −g·logp is kept, detached (DESIGN
§4; Algorithm 2 instead prints the value at the bound, e.g. A′_high·w_high·ℓ —
the gradient, 0, is the same). This is exactly the gradient mask of the PPO
dual clip applied to sg(A′). We branch on A′ as the paper does; the authors'
released code branches on A alone and evaluates the KL part at the clipped w
— a different estimator, not copied here.

**Truncation** (:func:`truncate`, paper eq. 4.1, CISPO): the importance weight
in the REINFORCE weight is replaced by w̄ = sg(clip(w, 1−ε_low, 1+ε_high)):
g = w̄·(A − β·per_w) − β·const (:func:`rpg.objectives.kl_grad_split`), i.e.
C(w, sg(A′)) with the effective advantage A′ at the unclipped w — log ρ and c
are not clipped. Every token keeps a gradient, with a bounded weight.

Clip codes (:func:`codes`, ``int8`` per token, computed only when metrics are
read) record which bound bound the token: 0 none, 1 low, 2 high, 3 dual.
Under :class:`Clip`, tokens with Â = 0 (or g = 0) are never counted as
clipped: no bound acts on a zero advantage. Under :class:`Truncate` a token
counts whenever its w was truncated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

__all__ = [
    "Clip",
    "Truncate",
    "ppo",
    "rpg_clip",
    "truncate",
    "in_band",
    "branch_bounds",
    "out_of_band",
    "codes",
    "NONE",
    "LOW",
    "HIGH",
    "DUAL",
]

NONE, LOW, HIGH, DUAL = 0, 1, 2, 3


def _check_bound(name: str, value: object, ok, rule: str) -> None:
    """Raise TypeError for a non-number, ValueError unless ``ok(value)``; ``None`` is always valid."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number or None, got {type(value).__name__}")
    if math.isnan(value) or not ok(value):
        raise ValueError(f"{name} must satisfy {rule}, got {value!r}")


@dataclass(frozen=True)
class Clip:
    r"""Clip bounds for the importance ratio w = π_θ/π_old.

    Args:
        low: ε_low, 0 ≤ ε_low < 1; lower bound 1−ε_low (negative advantages).
            ``None`` turns the lower bound off.
        high: ε_high ≥ 0; upper bound 1+ε_high (positive advantages; DAPO's
            clip-higher uses ε_high > ε_low). ``None`` turns it off.
        dual: c_dual > 1, the dual-clip bound for negative advantages
            (Ye et al., 2020). ``None`` turns it off.

    Defaults are the paper's (App. H): (0.2, 0.28) and c_dual = 3.
    In the differentiable style this is the PPO / dual clip of Algorithm 1;
    in the REINFORCE style it is RPG-Style Clip (Algorithm 2).
    Invalid bounds raise ``ValueError`` (``TypeError`` for non-numbers).
    """

    low: float | None = 0.2
    high: float | None = 0.28
    dual: float | None = 3.0

    def __post_init__(self) -> None:
        _check_bound("Clip.low", self.low, lambda v: 0 <= v < 1, "0 <= low < 1")
        _check_bound("Clip.high", self.high, lambda v: v >= 0, "high >= 0")
        _check_bound("Clip.dual", self.dual, lambda v: v > 1, "dual > 1")


@dataclass(frozen=True)
class Truncate:
    r"""Truncated importance weights (paper eq. 4.1; CISPO): w̄ = sg(clip(w, 1−low, 1+high)).

    Used with ``style="reinforce"``: every token keeps its gradient, with the
    REINFORCE weight evaluated at w̄. ``low``: 0 ≤ low < 1 or ``None`` (no lower
    bound); ``high`` ≥ 0 or ``None`` (no upper bound).
    """

    low: float | None = None
    high: float | None = 0.28

    def __post_init__(self) -> None:
        _check_bound("Truncate.low", self.low, lambda v: 0 <= v < 1, "0 <= low < 1")
        _check_bound("Truncate.high", self.high, lambda v: v >= 0, "high >= 0")


def _bounds(clip: Clip | Truncate) -> tuple[float | None, float | None, float | None]:
    """(1 − ε_low, 1 + ε_high, c_dual) with ``None`` for a bound that is off."""
    lo = 1 - clip.low if clip.low is not None else None
    hi = 1 + clip.high if clip.high is not None else None
    return lo, hi, getattr(clip, "dual", None)


def branch_bounds(up: torch.Tensor, clip: Clip, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-element open interval (lo, hi) for w on each branch: Â ≥ 0 → (−∞, 1+ε_high), else (1−ε_low, c_dual).

    Shaped like ``up`` (``[B, 1]`` for per-sequence advantages: tiny), so the
    clip is one ``clamp`` and the band two comparisons. Off bounds are ±∞.
    """
    inf = float("inf")
    lo, hi, dual = _bounds(clip)

    def scalar(v):  # a 0-dim tensor made on the device (no host-to-device copy)
        return torch.full((), v, dtype=dtype, device=up.device)

    lo_t = torch.where(up, scalar(-inf), scalar(-inf if lo is None else lo))
    hi_t = torch.where(up, scalar(inf if hi is None else hi), scalar(inf if dual is None else dual))
    return lo_t, hi_t


def out_of_band(w: torch.Tensor, lo_t: torch.Tensor, hi_t: torch.Tensor) -> torch.Tensor:
    """Bool: w ≤ lo or w ≥ hi (the clipped tokens; a ratio at a bound counts as clipped)."""
    return torch.le(w, lo_t).logical_or_(w >= hi_t)


def in_band(w: torch.Tensor, up: torch.Tensor, clip: Clip) -> torch.Tensor:
    r"""Bool ``[B, T]``: True where the ratio leaves the gradient on for its branch.

    ``up`` (the sign of Â or A′, ≥ 0): w < 1+ε_high; otherwise 1−ε_low < w < c_dual.
    A ratio exactly at a bound counts as clipped (Algorithm 2's strict inequalities).
    """
    return out_of_band(w, *branch_bounds(up, clip, w.dtype)).logical_not_()


def ppo(w: torch.Tensor, adv_hat: torch.Tensor, clip: Clip) -> tuple[torch.Tensor, torch.Tensor]:
    r"""PPO / dual clip as an effective ratio: ℓ = −m·Â.

    Args:
        w: ``[B, T]`` importance ratio.
        adv_hat: ``[B, T]`` or ``[B, 1]`` advantage analogue Â (its sign picks the branch).
        clip: the bounds.

    Returns:
        ``(m, clipped)``: ``m`` ``[B, T]``, min(w, 1+ε_high) for Â ≥ 0 and
        min(max(w, 1−ε_low), c_dual) for Â < 0; ``clipped`` bool, the tokens
        whose gradient does not flow through w: where m ≠ w. A ratio exactly on a
        bound (a kink of max/min, measure zero) keeps its gradient here, as the
        unclipped term; RPG-Style Clip follows Algorithm 2's strict inequalities.
    """
    lo_t, hi_t = branch_bounds(adv_hat >= 0, clip, w.dtype)
    m = torch.clamp(w, lo_t, hi_t)
    return m, m != w


def rpg_clip(w: torch.Tensor, g: torch.Tensor, clip: Clip) -> torch.Tensor:
    r"""RPG-Style Clip (Algorithm 2), branching on A′ = g/w (the sign of g): the clipped tokens.

    Returns bool ``[B, T]``, True where the token loses its REINFORCE gradient −g
    (A′ ≥ 0: w ≥ 1+ε_high; A′ < 0: w ≤ 1−ε_low or w ≥ c_dual); :func:`in_band`
    is its complement.
    """
    return out_of_band(w, *branch_bounds(g >= 0, clip, w.dtype))


def truncate(log_w: torch.Tensor, trunc: Truncate) -> torch.Tensor:
    r"""Truncated log-ratio log w̄ = clip(log w, log(1−low), log(1+high)), a value (use it inside sg)."""
    lo = math.log1p(-trunc.low) if trunc.low is not None else None
    hi = math.log1p(trunc.high) if trunc.high is not None else None
    return log_w.clamp(min=lo, max=hi) if (lo is not None or hi is not None) else log_w


def codes(w: torch.Tensor, direction: torch.Tensor | None, clip: Clip | Truncate) -> torch.Tensor:
    r"""``int8`` clip code per token, for the metrics: 0 none, 1 low, 2 high, 3 dual.

    Under :class:`Clip` a bound counts only for the sign of ``direction`` (Â or
    A′) it acts on, and never for a zero one; under :class:`Truncate` (``direction``
    unused) wherever w lies outside [1−low, 1+high].
    """
    lo, hi, dual = _bounds(clip)
    false = torch.zeros_like(w, dtype=torch.bool)
    if isinstance(clip, Truncate):
        low = w < lo if lo is not None else false
        high = w > hi if hi is not None else false
        return low.to(torch.int8) * LOW + high.to(torch.int8) * HIGH
    up, down = direction > 0, direction < 0
    low = down & (w <= lo) if lo is not None else false
    high = up & (w >= hi) if hi is not None else false
    dual_ = down & (w >= dual) if dual is not None else false
    return low.to(torch.int8) * LOW + high.to(torch.int8) * HIGH + dual_.to(torch.int8) * DUAL
