r"""Clipping rules for importance ratios: PPO / dual clip, RPG-Style Clip, truncation.

Clip rules are small frozen objects that carry their own behaviour (paper §3.3,
§4.1, App. G, Algorithms 1 and 2). ``w = exp(logp − old_logp)``; ε_low, ε_high
and the dual bound c_dual come from [`Clip`][rpg.clipping.Clip] / [`Truncate`][rpg.clipping.Truncate].

**PPO / dual clip** ([`ppo`][rpg.clipping.ppo], Algorithm 1; GRPO, DAPO). For an advantage
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

**RPG-Style Clip** ([`rpg_clip`][rpg.clipping.rpg_clip], Algorithm 2, REINFORCE style). With the
REINFORCE weight g and the effective advantage A′ = g/w (same sign as g):

* A′ ≥ 0: the token keeps its gradient only while w < 1+ε_high;
* A′ < 0: only while 1−ε_low < w < c_dual.

Otherwise its gradient is 0 and its value −g·logp is kept, detached (Algorithm 2 instead prints the value at the bound, e.g. A′_high·w_high·ℓ —
the gradient, 0, is the same). This is exactly the gradient mask of the PPO
dual clip applied to sg(A′). We branch on A′ as the paper does; the authors'
released code branches on A alone and evaluates the KL part at the clipped w
— a different estimator, not copied here.

**Truncation** ([`truncate`][rpg.clipping.truncate], paper eq. 4.1, CISPO): the importance weight
in the REINFORCE weight is replaced by w̄ = sg(clip(w, 1−ε_low, 1+ε_high)):
g = w̄·(A − β·per_w) − β·const (the KL term's ``split``, [`rpg.objectives.KLTerm`][rpg.objectives.KLTerm]), i.e.
C(w, sg(A′)) with the effective advantage A′ at the unclipped w — log ρ and c
are not clipped. Every token keeps a gradient, with a bounded weight.

**How a rule plugs in.** Every rule subclasses [`ClipRule`][rpg.clipping.ClipRule] and answers
four questions, so neither the loss kernel nor the metrics branch on its type:
``styles`` (which loss styles it applies to), ``effective_ratio(w, Â)`` (the
differentiable style's ℓ = −m·Â and ∂m/∂logp: w, w with the clipped tokens cut to
0, or a slope of the rule's own — SAPO's smooth gate, GPPO's kept gradient),
``reinforce_ratio(log_w, A)`` (the importance weight the REINFORCE weight g uses:
w itself, or a truncated w̄, possibly by the sign of A as TOPR's) and
``reinforce_clipped(w, g)`` (the REINFORCE tokens that lose their gradient), plus
``codes(w, direction)`` for the metrics. A new rule is one class here and its tests.

Clip codes ([`codes`][rpg.clipping.codes], ``int8`` per token, computed only when metrics are
read) record which bound bound the token: 0 none, 1 low, 2 high, 3 dual.
Under [`Clip`][rpg.clipping.Clip], tokens with Â = 0 (or g = 0) are never counted as
clipped: no bound acts on a zero advantage. Under [`Truncate`][rpg.clipping.Truncate] a token
counts whenever its w was truncated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._util import check_bound as _check_bound
from ._util import check_real

__all__ = ["ClipRule", "Clip", "Truncate", "TrustRegion", "ppo", "rpg_clip", "truncate", "codes"]

NONE, LOW, HIGH, DUAL = 0, 1, 2, 3
_INF = float("inf")


def _scalar(v: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor made on ``like``'s device (no host-to-device copy)."""
    return torch.full((), v, dtype=like.dtype, device=like.device)


def _out_of_band(w: torch.Tensor, lo_t: torch.Tensor, hi_t: torch.Tensor) -> torch.Tensor:
    """Bool: w ≤ lo or w ≥ hi (a ratio at a bound counts as clipped)."""
    return torch.le(w, lo_t).logical_or_(w >= hi_t)


class ClipRule:
    """Base of every clip rule: the answers the kernel and the metrics ask of it (module docstring).

    Subclasses are frozen dataclasses (hashable, so ``torch.compile`` treats them as constants)."""

    styles: tuple[str, ...] = ("differentiable", "reinforce")
    ratios: tuple[str, ...] = ("token", "sequence")
    branch_on_advantage: bool = False
    """Whether the rule picks its bounds by the sign of the advantage A the call passes (not of the
    REINFORCE weight g): then its ``codes`` read A as their ``direction`` (``rpg._kernel.clip_codes``)."""

    def effective_ratio(
        self, w: torch.Tensor, adv_hat: torch.Tensor, ratios=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Differentiable style: ``(m, d)`` with ℓ_pg = −m·Â, and ∂ℓ_pg/∂logp = −(∂m/∂logp)·Â given by ``d``:

        * ``None``: ∂m/∂logp = w everywhere (m = w);
        * a bool tensor ``cut``: ∂m/∂logp = w where ``cut`` is False and 0 where it is True (a hard clip
          or mask: no gradient through w there);
        * a floating tensor: ∂m/∂logp itself, the *slope* of a smooth gate (SAPO) or a bounded gradient
          through a clipped value (GPPO). Where m = w the slope is w (∂w/∂logp = w).

        ``ratios`` (the batch's `rpg.objectives.Ratios` — log π_θ, log π_old, log w —, or ``None`` for a
        sequence ratio) is there for rules that depend on the tokens' probabilities, not only on the ratio."""
        raise ValueError(f"{type(self).__name__} does not apply to style='differentiable'")

    def reinforce_ratio(self, log_w: torch.Tensor, adv: torch.Tensor | None = None) -> torch.Tensor | None:
        """REINFORCE style: the importance weight g is evaluated at (a value), or ``None`` for w itself.

        ``adv`` (the advantage A, ``[B, 1]`` or ``[B, T]``) is there for rules whose weight depends on its
        sign (TOPR); a returned tensor has the shape of ``log_w``."""
        return None

    def reinforce_clipped(self, w: torch.Tensor, g: torch.Tensor, ratios=None) -> torch.Tensor | None:
        """REINFORCE style: bool ``[B, T]``, the tokens whose gradient −g is set to 0, or ``None``."""
        return None

    def codes(self, w: torch.Tensor, direction: torch.Tensor | None, ratios=None) -> torch.Tensor:
        """``int8`` code per token for the metrics: 0 none, 1 low, 2 high, 3 dual."""
        raise NotImplementedError


def _band_codes(w, direction, low: float | None, high: float | None, dual: float | None) -> torch.Tensor:
    """PPO's band codes: LOW where ``direction`` < 0 and w ≤ 1 − low, HIGH where > 0 and w ≥ 1 + high, DUAL
    where < 0 and w ≥ dual (a bound that is ``None`` is off)."""
    up, down = direction > 0, direction < 0
    code = torch.zeros_like(w, dtype=torch.int8)
    if low is not None:
        code.masked_fill_(down & (w <= 1 - low), LOW)
    if high is not None:
        code.masked_fill_(up & (w >= 1 + high), HIGH)
    if dual is not None:
        code.masked_fill_(down & (w >= dual), DUAL)
    return code


@dataclass(frozen=True)
class Clip(ClipRule):
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
        object.__setattr__(self, "low", _check_bound("Clip.low", self.low, lambda v: 0 <= v < 1, "0 <= low < 1"))
        object.__setattr__(
            self, "high", _check_bound("Clip.high", self.high, lambda v: 0 <= v < _INF, "0 <= high < inf")
        )
        object.__setattr__(self, "dual", _check_bound("Clip.dual", self.dual, lambda v: 1 < v < _INF, "1 < dual < inf"))

    def bounds(self, up: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Per-element open interval (lo, hi) for w on each branch: ``up`` → (−∞, 1+ε_high), else (1−ε_low, c_dual).

        Shaped like ``up`` (``[B, 1]`` for per-sequence advantages: tiny), so the clip is one
        ``clamp`` and the band two comparisons. Off bounds are ±∞."""
        lo = -_INF if self.low is None else 1 - self.low
        hi = _INF if self.high is None else 1 + self.high
        dual = _INF if self.dual is None else self.dual
        lo_t = torch.where(up, _scalar(-_INF, like), _scalar(lo, like))
        hi_t = torch.where(up, _scalar(hi, like), _scalar(dual, like))
        return lo_t, hi_t

    def effective_ratio(self, w, adv_hat, ratios=None):
        m = torch.clamp(w, *self.bounds(adv_hat >= 0, w))
        return m, m != w

    def reinforce_clipped(self, w, g, ratios=None):
        # Bounds that are off are never compared: a w that overflowed the dtype (inf) is not "at" an
        # absent bound, so float32 keeps the tokens float64 keeps (and the metrics, which skip them too, agree).
        up = g >= 0
        lo = None if self.low is None else 1 - self.low
        hi_up = None if self.high is None else 1 + self.high
        if hi_up is None and lo is None and self.dual is None:
            return torch.zeros_like(up)
        down_cut = None if lo is None else torch.le(w, lo)
        if self.dual is not None:
            down_cut = torch.ge(w, self.dual) if down_cut is None else down_cut.logical_or_(w >= self.dual)
        up_cut = None if hi_up is None else torch.ge(w, hi_up)
        if up_cut is None:
            return up.logical_not_().logical_and_(down_cut)
        if down_cut is None:
            return up.logical_and_(up_cut)
        return torch.where(up, up_cut, down_cut)

    def codes(self, w, direction, ratios=None):
        return _band_codes(w, direction, self.low, self.high, self.dual)


@dataclass(frozen=True)
class Truncate(ClipRule):
    r"""Truncated importance weights (paper eq. 4.1; CISPO): w̄ = sg(clip(w, 1−low, 1+high)).

    Used with ``style="reinforce"``: every token keeps its gradient, with the
    REINFORCE weight evaluated at w̄. ``low``: 0 ≤ low < 1 or ``None`` (no lower
    bound); ``high`` ≥ 0 or ``None`` (no upper bound). With ``absolute=True`` the
    bounds are values of w itself, w̄ = sg(clip(w, low, high)) with 0 ≤ low and
    0 < high (e.g. a cap below 1, as TRL's CISPO reads its ``epsilon_high``);
    [`Truncate.at`][rpg.clipping.Truncate.at] builds that.

    Clip codes: 1 (low) where w < lower bound, 2 (high) where w > upper bound; none when the two
    bounds coincide (w̄ is then a constant, e.g. ``Truncate.at(1, 1)``: the loss uses no importance
    weight, as DRO's and TOPR's positives, and no token is reported as clipped).
    """

    low: float | None = None
    high: float | None = 0.28
    absolute: bool = False

    styles = ("reinforce",)

    def __post_init__(self) -> None:
        if not isinstance(self.absolute, bool):
            raise TypeError(f"Truncate.absolute must be a bool, got {type(self.absolute).__name__}")
        if self.absolute:
            low = _check_bound("Truncate.low", self.low, lambda v: 0 <= v < _INF, "0 <= low < inf (absolute)")
            high = _check_bound("Truncate.high", self.high, lambda v: 0 < v < _INF, "0 < high < inf (absolute)")
        else:
            low = _check_bound("Truncate.low", self.low, lambda v: 0 <= v < 1, "0 <= low < 1")
            high = _check_bound("Truncate.high", self.high, lambda v: 0 <= v < _INF, "0 <= high < inf")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        lo, hi = self.ratio_bounds()
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"Truncate bounds are empty: lower bound {lo} > upper bound {hi}")

    @classmethod
    def at(cls, lower: float | None = None, upper: float | None = None) -> Truncate:
        r"""Truncation to absolute bounds of w: w̄ = sg(clip(w, lower, upper)) (``Truncate(lower, upper, absolute=True)``)."""
        return cls(lower, upper, absolute=True)

    def ratio_bounds(self) -> tuple[float | None, float | None]:
        """The bounds as values of w: (1 − low, 1 + high), or (low, high) when ``absolute``; ``None`` = off."""
        if self.absolute:
            return self.low, self.high
        return (None if self.low is None else 1 - self.low, None if self.high is None else 1 + self.high)

    def log_bounds(self) -> tuple[float | None, float | None]:
        """The bounds on log w, ``None`` where a bound is off."""
        lo, hi = self.ratio_bounds()
        return (None if lo is None else (math.log(lo) if lo > 0 else -_INF), None if hi is None else math.log(hi))

    def __repr__(self) -> str:
        extra = ", absolute=True" if self.absolute else ""
        return f"Truncate(low={self.low!r}, high={self.high!r}{extra})"

    def effective_ratio(self, w, adv_hat, ratios=None):
        raise ValueError("clip=rpg.Truncate(...) applies to style='reinforce'; use rpg.Clip for the PPO clip")

    def reinforce_ratio(self, log_w, adv=None):
        return truncate(log_w, self).exp()

    def codes(self, w, direction, ratios=None):
        lo, hi = self.ratio_bounds()
        code = torch.zeros_like(w, dtype=torch.int8)
        if lo is not None and lo == hi:  # w̄ a constant (e.g. 1: no importance weight at all): nothing is clipped
            return code
        if lo is not None:
            code.masked_fill_(w < lo, LOW)
        if hi is not None:
            code.masked_fill_(w > hi, HIGH)
        return code


@dataclass(frozen=True)
class TrustRegion(ClipRule):
    r"""Trust-region masking (DPPO, arXiv 2602.04879): drop a token's gradient when π_θ leaves a region around π_old.

    Instead of bounding the ratio w, bound a divergence between π_θ and π_old on the
    sampled token's two-outcome partition {token, not token}, with p = π_θ(token) and
    q = π_old(token), in the direction the advantage pushes (sign of Â or A′; a zero
    advantage takes the low branch, which never matters for the gradient):

    * ``divergence="tv"``: masked when p − q > δ_high (Â > 0) or p − q < −δ_low (Â ≤ 0) —
      equivalently w > 1 + δ_high/q or w < 1 − δ_low/q: the PPO clip with a per-token
      ε = δ/q (verl ``dppo_tv``, prime-rl's default loss);
    * ``divergence="kl"``: masked when KL(Bern(q) ‖ Bern(p)) > δ_high and p > q (Â > 0), or
      > δ_low and p < q (Â ≤ 0) (verl ``dppo_kl``).

    Masked tokens lose their gradient and still count in the denominators; in the
    differentiable style (ℓ = −m·Â, as PPO) a masked token's value is taken at the edge of the
    region, m = 1 ± δ/q for ``"tv"`` (PPO's clip with a per-token ε = δ/q), and at its own w for
    ``"kl"``; in the REINFORCE style the value is kept (−g·logp, detached). Where no
    token is masked the loss is exactly the rule-free loss: its expected gradient is −∇J of
    its objective (tested by enumeration). ``cap`` (REINFORCE style) additionally truncates the
    importance weight at an absolute value, verl's ``clip_ratio_c`` for DPPO (``None``: none);
    in the differentiable style it caps the effective ratio (no gradient above it). The mask
    is evaluated at the current θ, so it changes over off-policy epochs, as a clip does. The
    paper's default anchors the region on the rollout policy μ: pass ``old_logp =
    behavior_logp`` (bypass mode). The recommended thresholds are 0.15 (tv) and 0.05 (kl).

    Args:
        low: δ_low ≥ 0, the threshold for Â ≤ 0 (``None``: that side never masks).
        high: δ_high ≥ 0, the threshold for Â > 0 (``None``: that side never masks).
        divergence: ``"tv"`` or ``"kl"``.
        cap: absolute cap C > 0 on the importance weight, or ``None``.
    """

    low: float | None = 0.15
    high: float | None = 0.15
    divergence: str = "tv"
    cap: float | None = None

    ratios = ("token",)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "low", _check_bound("TrustRegion.low", self.low, lambda v: 0 <= v < _INF, "0 <= low < inf")
        )
        object.__setattr__(
            self, "high", _check_bound("TrustRegion.high", self.high, lambda v: 0 <= v < _INF, "0 <= high < inf")
        )
        object.__setattr__(
            self, "cap", _check_bound("TrustRegion.cap", self.cap, lambda v: 0 < v < _INF, "0 < cap < inf")
        )
        if self.divergence not in ("tv", "kl"):
            raise ValueError(f"unknown TrustRegion.divergence {self.divergence!r}; valid options: 'tv', 'kl'")

    def _outside(self, up: torch.Tensor, ratios) -> torch.Tensor:
        """Bool: the token left the region for its branch (``up``: Â > 0). Formed from log π_θ and
        log π_old themselves, so a ratio that overflows (or a q that underflows) is still decided."""
        if ratios is None:
            raise ValueError("rpg.TrustRegion needs per-token probabilities (token-level ratios only)")
        none = torch.zeros_like(up, dtype=torch.bool).expand(ratios.log_w.shape)
        if self.divergence == "tv":
            diff = ratios.logp.exp() - ratios.old_logp.exp()  # p − q
            hi = none if self.high is None else diff > self.high
            lo = none if self.low is None else diff < -self.low
        else:
            kl = _bernoulli_kl(ratios.old_logp, ratios.logp)
            hi = none if self.high is None else (kl > self.high) & (ratios.log_w > 0)
            lo = none if self.low is None else (kl > self.low) & (ratios.log_w < 0)
        return torch.where(up, hi, lo)

    def effective_ratio(self, w, adv_hat, ratios=None):
        up = adv_hat > 0
        out = self._outside(up, ratios)
        m = w
        if self.divergence == "tv":  # a masked token's value at the region's edge, w = 1 ± δ/q, as a value
            edge_up = _INF if self.high is None else 1 + self.high * torch.exp(-ratios.old_logp)
            edge_down = -_INF if self.low is None else 1 - self.low * torch.exp(-ratios.old_logp)
            m = torch.where(out, torch.where(up, edge_up, edge_down), w)
        # Where that value is not representable (q below the dtype's range, or w overflowed: float32,
        # |log w| ≳ 88), a masked token — gradient 0 either way — takes the value 0, verl's value of a
        # masked token, so the loss stays finite.
        m = torch.where(out & ~torch.isfinite(m), _scalar(0.0, w), m)
        if self.cap is None:
            return m, out
        capped = w > self.cap
        return torch.where(capped & ~out, _scalar(self.cap, w), m), out | capped

    def reinforce_ratio(self, log_w, adv=None):
        return None if self.cap is None else log_w.clamp(max=math.log(self.cap)).exp()

    def reinforce_clipped(self, w, g, ratios=None):
        return self._outside(g > 0, ratios)

    def codes(self, w, direction, ratios=None):
        out = self._outside(direction > 0, ratios)
        code = torch.zeros_like(w, dtype=torch.int8)
        code.masked_fill_(out & (direction > 0), HIGH)
        code.masked_fill_(out & (direction < 0), LOW)
        if self.cap is not None:
            code.masked_fill_(~out & (direction != 0) & (w > self.cap), DUAL)
        return code


def _bernoulli_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(Bern(q) ‖ Bern(p)) = q·log(q/p) + (1−q)·log((1−q)/(1−p)), with 0·log 0 = 0."""
    q = log_q.exp()
    log1m_q, log1m_p = torch.log1p(-q), torch.log1p(-log_p.exp())
    zero = torch.zeros_like(q)
    second = torch.where(q < 1, (1 - q) * (log1m_q - log1m_p), zero)
    return q * (log_q - log_p) + second


# --- the rules as plain functions -------------------------------------------------------------


def in_band(w: torch.Tensor, up: torch.Tensor, clip: Clip) -> torch.Tensor:
    r"""Bool ``[B, T]``: True where the ratio leaves the gradient on for its branch.

    ``up`` (the sign of Â or A′, ≥ 0): w < 1+ε_high; otherwise 1−ε_low < w < c_dual.
    A ratio exactly at a bound counts as clipped (Algorithm 2's strict inequalities).
    """
    return _out_of_band(w, *clip.bounds(up, w)).logical_not_()


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
    return clip.effective_ratio(w, adv_hat)


def rpg_clip(w: torch.Tensor, g: torch.Tensor, clip: Clip) -> torch.Tensor:
    r"""RPG-Style Clip (Algorithm 2), branching on A′ = g/w (the sign of g): the clipped tokens.

    Returns bool ``[B, T]``, True where the token loses its REINFORCE gradient −g
    (A′ ≥ 0: w ≥ 1+ε_high; A′ < 0: w ≤ 1−ε_low or w ≥ c_dual); `in_band`
    is its complement.
    """
    return clip.reinforce_clipped(w, g)


def truncate(log_w: torch.Tensor, trunc: Truncate) -> torch.Tensor:
    r"""Truncated log-ratio log w̄ = clip(log w, log(1−low), log(1+high)), a value (use it inside sg)."""
    lo, hi = trunc.log_bounds()
    return log_w.clamp(min=lo, max=hi) if (lo is not None or hi is not None) else log_w


def codes(w: torch.Tensor, direction: torch.Tensor | None, clip: ClipRule, ratios=None) -> torch.Tensor:
    r"""``int8`` clip code per token, for the metrics: 0 none, 1 low, 2 high, 3 dual.

    Under [`Clip`][rpg.clipping.Clip] a bound counts only for the sign of ``direction`` (Â or
    A′) it acts on, and never for a zero one; under [`Truncate`][rpg.clipping.Truncate] (``direction``
    unused) wherever w lies outside [1−low, 1+high].
    """
    return clip.codes(w, direction, ratios)


# --- smooth gates, gradient-preserving clips and sign-dependent truncation ---------------------
# (SAPO, GPPO / CE-GPPO, TOPR: rules whose effective ratio has a slope other than 0 or w, or whose
# REINFORCE weight depends on the sign of the advantage.)

__all__ += ["SoftGate", "GradientPreservingClip", "SignedTruncate"]


def _positive(name: str, value: object) -> float:
    return check_real(name, value, lambda v: 0 < v < _INF, "0 < value < inf")


@dataclass(frozen=True)
class SoftGate(ClipRule):
    r"""SAPO's smooth ratio gate (Gao et al., arXiv 2511.20347): ℓ = −f(w)·Â with a sigmoid in place of the clip.

    f(w) = (4/τ)·σ(τ·(w − 1)), τ = τ_pos where Â > 0 and τ_neg where Â ≤ 0 (the sign that picks τ is
    the paper's, TRL's and verl's: ``advantages > 0``). Its slope is
    ∂f/∂logp = f′(w)·w = 4·σ(τ(w−1))·(1 − σ(τ(w−1)))·w: 1·w at w = 1 (so on-policy the gradient is
    exactly the policy gradient, −Â·∇logp), decaying smoothly — never cut — as w leaves 1; a larger τ
    decays faster. f(1) = 2/τ, not 1: the value is not −w·Â even on-policy, the gradient is.

    Differentiable style; ``ratio="token"`` (the paper's) or ``"sequence"`` (TRL's
    ``importance_sampling_level="sequence"``: the gate acts on GSPO's sequence ratio s). No token is
    ever clipped, so its clip codes are all 0 (verl's ``sapo`` reports a clip fraction of 0 too).

    Args:
        tau_pos: τ for Â > 0, > 0 (default 1.0, the paper's, TRL's and verl's).
        tau_neg: τ for Â ≤ 0, > 0 (default 1.05: the paper sets τ_neg > τ_pos).
    """

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    styles = ("differentiable",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau_pos", _positive("SoftGate.tau_pos", self.tau_pos))
        object.__setattr__(self, "tau_neg", _positive("SoftGate.tau_neg", self.tau_neg))

    def effective_ratio(self, w, adv_hat, ratios=None):
        tau = torch.where(adv_hat > 0, _scalar(self.tau_pos, w), _scalar(self.tau_neg, w))
        x = tau * (w - 1)
        s, s_neg = torch.sigmoid(x), torch.sigmoid(-x)
        m = s * 4 / tau
        # slope 4·σ(x)·σ(−x)·w: where w overflows σ(−x) = 0 and the limit is 0, not 0·∞
        slope = torch.where(torch.isfinite(w), 4 * s * s_neg * w, _scalar(0.0, w))
        return m, slope

    def codes(self, w, direction, ratios=None):
        return torch.zeros_like(w, dtype=torch.int8)


@dataclass(frozen=True)
class GradientPreservingClip(ClipRule):
    r"""GPPO / CE-GPPO (Su et al., arXiv 2508.07629, 2509.20712): PPO's clipped value, a bounded gradient kept.

    The value is PPO's, ℓ = −m·Â with m = min(w, 1+ε_high) for Â ≥ 0 and max(w, 1−ε_low) for Â < 0
    (no dual bound unless ``dual`` is set). Where PPO cuts the gradient of a clipped token, this rule keeps one, written
    in the papers as the bound times w/sg(w) (value at the bound, gradient through w rescaled):

    * Â ≥ 0 and w > 1+ε_high: ∂ℓ/∂logp = −β_high·(1+ε_high)·Â;
    * Â < 0 and w < 1−ε_low: ∂ℓ/∂logp = −β_low·(1−ε_low)·Â;
    * otherwise −w·Â, as PPO.

    β_low = β_high = 1 is GPPO (Klear-Reasoner): a clipped token's gradient is the one it would
    have at the bound, so the gradient is continuous in w. CE-GPPO scales the two sides by its
    β₁ (``beta_low``: negative advantages below the band) and β₂ (``beta_high``: positive
    advantages above it); β = 0 on both sides is PPO's clip. The value here stays PPO's clipped
    value for every β (CE-GPPO's sg-form writes β·bound·Â as the value; only the gradient, the same
    in both, is its update). Differentiable style, token or sequence ratio.

    ``dual`` (default ``None``, as the papers' formulas) adds PPO's dual clip for negative
    advantages: Â < 0 and w ≥ c_dual gives m = c_dual with no gradient. The authors' training code
    (verl's PPO loss with the kept gradient) always runs it, at verl's ``clip_ratio_c`` (3 by default,
    10 in the CE-GPPO scripts): ``dual=c`` reproduces that code's gradient (and its value for β = 1).

    Args:
        low: ε_low, 0 ≤ ε_low < 1 (``None``: no lower bound).
        high: ε_high ≥ 0 (``None``: no upper bound).
        beta_low: β₁ ≥ 0, the scale of a clipped negative-advantage token's gradient.
        beta_high: β₂ ≥ 0, the scale of a clipped positive-advantage token's gradient.
        dual: c_dual > 1, the dual-clip bound for negative advantages, or ``None`` (default: off).
    """

    low: float | None = 0.2
    high: float | None = 0.28
    beta_low: float = 1.0
    beta_high: float = 1.0
    dual: float | None = None

    styles = ("differentiable",)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "low", _check_bound("GradientPreservingClip.low", self.low, lambda v: 0 <= v < 1, "0 <= low < 1")
        )
        object.__setattr__(
            self,
            "high",
            _check_bound("GradientPreservingClip.high", self.high, lambda v: 0 <= v < _INF, "0 <= high < inf"),
        )
        for name in ("beta_low", "beta_high"):
            value = getattr(self, name)
            if value is None:
                raise TypeError(f"GradientPreservingClip.{name} must be a number >= 0, got None")
            ok = _check_bound(f"GradientPreservingClip.{name}", value, lambda v: 0 <= v < _INF, f"0 <= {name} < inf")
            object.__setattr__(self, name, ok)
        dual = _check_bound("GradientPreservingClip.dual", self.dual, lambda v: 1 < v < _INF, "1 < dual < inf")
        object.__setattr__(self, "dual", dual)

    def __repr__(self) -> str:
        extra = "" if self.dual is None else f", dual={self.dual!r}"
        return (
            f"GradientPreservingClip(low={self.low!r}, high={self.high!r}, beta_low={self.beta_low!r}, "
            f"beta_high={self.beta_high!r}{extra})"
        )

    def effective_ratio(self, w, adv_hat, ratios=None):
        up = adv_hat >= 0
        lo = -_INF if self.low is None else 1 - self.low
        hi = _INF if self.high is None else 1 + self.high
        m = torch.clamp(
            w, torch.where(up, _scalar(-_INF, w), _scalar(lo, w)), torch.where(up, _scalar(hi, w), _scalar(_INF, w))
        )
        cut = m != w
        kept = torch.where(up, _scalar(self.beta_high * hi, w), _scalar(self.beta_low * lo, w))
        slope = torch.where(cut, kept, w)
        if self.dual is not None:  # PPO's dual clip: the value c_dual, no gradient
            dual = ~up & (w >= self.dual)
            m = torch.where(dual, _scalar(self.dual, w), m)
            slope = torch.where(dual, _scalar(0.0, w), slope)
        return m, slope

    def codes(self, w, direction, ratios=None):
        return _band_codes(w, direction, self.low, self.high, self.dual)


@dataclass(frozen=True)
class SignedTruncate(ClipRule):
    r"""Truncated importance weights whose bounds depend on the sign of the advantage (TOPR, arXiv 2503.14286).

    REINFORCE style: the weight is w̄ = sg(clip(w, ·)) with the bounds of ``positive`` where A > 0
    and of ``negative`` where A ≤ 0 (each a [`Truncate`][rpg.clipping.Truncate], or ``None`` for w itself),
    then g = w̄·(A − β·per_w) − β·const as for [`Truncate`][rpg.clipping.Truncate]. The sign is that of the
    advantage A the call passes (not of the KL-shifted A′). TOPR is
    ``SignedTruncate(positive=Truncate.at(1.0, 1.0), negative=Truncate.at(0.0, 1.0))``: w̄ = 1
    (no importance weight) for A > 0 and min(w, 1) for A ≤ 0. Every token keeps its gradient.

    Clip codes count a token whenever its w was truncated by its branch's bounds, the branch read from
    the sign of A as the loss reads it (``codes``' ``direction`` is A; with a KL term the REINFORCE
    weight g can have the other sign, and its sign would name the wrong branch); a branch pinned at
    one value (TOPR's positives, w̄ = 1) uses no importance weight and counts nothing.
    """

    positive: Truncate | None = None
    negative: Truncate | None = None

    styles = ("reinforce",)
    ratios = ("token",)
    branch_on_advantage = True

    def __post_init__(self) -> None:
        for name in ("positive", "negative"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Truncate):
                raise TypeError(f"SignedTruncate.{name} must be rpg.Truncate or None, got {type(value).__name__}")
        if self.positive is None and self.negative is None:
            raise ValueError("SignedTruncate needs a Truncate for at least one sign (positive= or negative=)")

    def effective_ratio(self, w, adv_hat, ratios=None):
        raise ValueError("clip=rpg.SignedTruncate(...) applies to style='reinforce'")

    def reinforce_ratio(self, log_w, adv=None):
        if adv is None:
            raise ValueError("rpg.SignedTruncate needs the advantages to pick a branch")
        pos = log_w if self.positive is None else truncate(log_w, self.positive)
        neg = log_w if self.negative is None else truncate(log_w, self.negative)
        return torch.where(adv > 0, pos, neg).exp()

    def codes(self, w, direction, ratios=None):
        zero = torch.zeros_like(w, dtype=torch.int8)
        pos = zero if self.positive is None else self.positive.codes(w, direction)
        neg = zero if self.negative is None else self.negative.codes(w, direction)
        return torch.where(direction > 0, pos, neg)
