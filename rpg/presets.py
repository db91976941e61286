r"""Published algorithms as configurations of one [`PolicyLoss`][rpg.losses.PolicyLoss].

Every class here is a ``PolicyLoss`` with fixed settings — the way optax builds
``adam`` from ``chain(...)`` — and the same call signature. Each class is a thin holder: its ``__init__`` maps
the preset's arguments to one [`LossConfig`][rpg.config.LossConfig] (visible in the code as
the configuration it is), its ``repr`` shows the preset's arguments and
``.config`` the framework settings. Rules that belong to a preset — GSPO's
fixed aggregation, CISPO reading a [`Clip`][rpg.clipping.Clip] as truncation bounds —
live in that mapping. Every preset also takes ``correction=`` (the rollout
correction, [`RolloutCorrection`][rpg.correction.RolloutCorrection]) and ``entropy_coef=``.

| class | per-token loss (w = π_θ/π_old, ρ = π_θ/π_ref) | gradient follows |
|---|---|---|
| ``GRPOLoss`` | −min(wA, clip(w)A) + β·k3(logp → ref) | ∇ forward KL on-policy, neither off-policy |
| ``GRPOLoss(importance_weighted_kl=True)`` | −min(wA, clip(w)A) + β·w·k3(logp → ref) | ∇ reverse KL (= URKL) off-policy |
| ``DrGRPOLoss`` | −min(wA, clip(w)A), Σ / (B·L) | E[r] (no KL) |
| ``DAPOLoss`` | −min(wA, clip(w)A), clip-higher, token-mean | E[r] (no KL) |
| ``REINFORCEPlusPlusLoss`` | −min(wA, clip(w)A) on REINFORCE++ advantages | sequence reverse KL via the reward, on-policy |
| ``GSPOLoss`` | −min(sA, clip(s)A), s = exp(mean_t log w), per sequence | E[r] on-policy, equal lengths only |
| ``CISPOLoss`` | −sg(clip(w))·A·logp | E[r], truncated IS |
| ``OnPolicyDistillationLoss`` | −sg(w(A − β log ρ))·logp, ρ = π_θ/π_teacher | ∇ KL(π_θ‖π_teacher) per token, off-policy |
| ``GMPOLoss`` | −s·A, s = exp(mean_t clip(log w)) (tokens clipped before the mean), per sequence | E[r] on-policy, equal lengths only; off-policy its geometric-mean surrogate |
| ``VESPOLoss`` | −sg(φ(W)·A)·logp, W = Π_t w, φ the Gamma kernel | E[r] on-policy; biased off-policy |
| ``ClipCovLoss`` | −min(wA, clip(w)A), 0 at random high-Cov(A, logp) tokens | PPO's minus the dropped tokens |
| ``KLCovLoss`` | −wA + coef·\|log w\| at the top-covariance tokens | E[r] on-policy; plus the penalty off-policy |
| ``RPGLoss`` | the eight RPG losses ([`rpg.losses`][rpg.losses]) | ∇ its divergence |
| ``SAPOLoss`` | −(4/τ)·σ(τ(w − 1))·A, τ = τ_pos (A > 0) or τ_neg, seq-mean-token-mean | E[r] on-policy; off-policy each IS term scaled by 4σ(1−σ) ≤ 1 |
| ``TOPRLoss`` | −A·logp (A > 0), −sg(min(w, 1))·A·logp (A ≤ 0) | E[r] on-policy; off-policy positives unweighted, negatives capped |
| ``GPPOLoss`` | PPO's clipped value; a clipped token keeps the gradient −β·bound·A (CE-GPPO: β₁, β₂) | E[r] where no bound binds |
| ``DROLoss`` | −A·logp + (β/2)(logp − log μ)², μ = ``behavior_logp`` (π_old) | E_q[A·log π − (β/2)(log π − log μ)²], q the sampler |
| ``PrimeRLLoss`` | −M·w·A + τ·(logp − log μ)², M DPPO's binary-TV mask | E[r] − τ·E_q[(log π − log μ)²] where no token is masked |

"Gradient follows" is checked by exact enumeration in ``tests/test_presets.py``
(token level) and ``tests/test_sequence.py`` (two-step sequences). Per-token KL
penalties give only a *partial* gradient of the sequence-level KL (Tang &
Munos, "On a few pitfalls in KL divergence gradient estimation for RL"): the
KL of a later token also depends on the earlier tokens, and a per-token loss
ignores that. Only a KL shaped into the reward and summed into returns-to-go
(REINFORCE++) follows ∇KL(π_θ(y)‖π_ref(y)) — exactly on-policy.
"""

from __future__ import annotations

import math
from typing import ClassVar

from ._util import check_bound as _check_bound
from .aggregation import AGG_MODES
from .clipping import Clip, ClipRule, GradientPreservingClip, SignedTruncate, SoftGate, Truncate, TrustRegion
from .config import LossConfig
from .correction import RolloutCorrection
from .losses import PolicyLoss
from .selection import CovarianceDrop, CovariancePenalty
from .sequence import Gamma

__all__ = [
    "GRPOLoss",
    "DrGRPOLoss",
    "DAPOLoss",
    "REINFORCEPlusPlusLoss",
    "GSPOLoss",
    "CISPOLoss",
    "OnPolicyDistillationLoss",
    "DPPOLoss",
    "GMPOLoss",
    "VESPOLoss",
    "ClipCovLoss",
    "KLCovLoss",
]

_EXTRA = ("correction", "entropy_coef")
_EXTRA_DEFAULTS = {"correction": None, "entropy_coef": 0.0}


class _Preset(PolicyLoss):
    """A named configuration: subclasses build their [`LossConfig`][rpg.config.LossConfig] in ``__init__``."""

    __slots__ = ()
    _arg_defaults = _EXTRA_DEFAULTS

    def _set(self, args: dict, correction, entropy_coef, **settings) -> None:
        """Hold the preset's ``args`` (for ``repr``) and its configuration ``settings``, with the two
        options every preset passes through unchanged."""
        extra = dict(correction=correction, entropy_coef=entropy_coef)
        self._init(LossConfig(**settings, **extra), {**args, **extra})


class GRPOLoss(_Preset):
    r"""GRPO (Shao et al., 2024, DeepSeekMath): PPO clip + β·k3 penalty, per-sequence token mean.

    ℓ_t = −min(w·A, clip(w, 1−ε_low, 1+ε_high)·A) + β·k3(logp → ref_logp), with
    k3 = π_ref/π_θ − log(π_ref/π_θ) − 1, unweighted: as a loss its gradient is
    ∇ **forward** KL(π_ref‖π_θ) on-policy and follows neither direction
    off-policy. ``importance_weighted_kl=True`` multiplies k3 by the
    differentiable w — the RPG / DeepSeek-V3.2 correction — which is exactly the
    URKL surrogate: its gradient is ∇ reverse KL(π_θ‖π_ref) off-policy too.

    Defaults from the paper: β = 0.04, ε = 0.2, no dual clip,
    ``agg="seq-mean-token-mean"``. Pass ``ref_logp`` (the frozen reference): GRPO's KL is to a
    fixed reference model. Called with β > 0 and no ``ref_logp``, the loss uses π_ref = π_old (RPG's
    iterative reference, the meaning of ``ref_logp=None`` for every loss) and warns once per class;
    pass ``ref_logp=old_logp`` to choose that explicitly, or ``beta=0`` for no KL term.

    Audited ([`rpg.testing.audit`][rpg.testing.audit], ``clip=None``, β > 0): on-policy ufkl; off-policy, per token, none (closest: ufkl).
    With ``importance_weighted_kl=True``: on-policy urkl; off-policy, per token, urkl.
    """

    __slots__ = ()
    _warn_without_ref = True
    _arg_names = ("beta", "clip", "importance_weighted_kl", "agg", *_EXTRA)

    def __init__(
        self,
        beta: float = 0.04,
        clip: ClipRule | None = Clip(0.2, 0.2, dual=None),
        importance_weighted_kl: bool = False,
        agg: str = "seq-mean-token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        if not isinstance(importance_weighted_kl, bool):
            raise TypeError(f"importance_weighted_kl must be a bool, got {type(importance_weighted_kl).__name__}")
        args = dict(beta=beta, clip=clip, importance_weighted_kl=importance_weighted_kl, agg=agg)
        self._set(
            args, correction, entropy_coef, kl="urkl" if importance_weighted_kl else "k3", beta=beta, clip=clip, agg=agg
        )


class DrGRPOLoss(_Preset):
    r"""Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-like training"): GRPO without its length bias.

    ℓ_t = −min(w·A, clip(w)·A), no KL (β = 0), aggregated as Σ_bt ℓ_bt / (B·L)
    with L = ``max_len`` a constant (``seq-mean-token-sum-norm``), so a token's
    weight does not depend on its response's length. ``max_len`` is required:
    falling back to the padded width would bring back the very length bias Dr.
    GRPO removes. Pair with ``rpg.advantages.grpo(..., scale="none")`` (no std scaling).

    Audited ([`rpg.testing.audit`][rpg.testing.audit], ``clip=None``): on-policy E[r]; off-policy, per token, E[r].
    """

    __slots__ = ()
    _arg_names = ("max_len", "clip", *_EXTRA)

    def __init__(
        self,
        max_len: int,
        clip: ClipRule | None = Clip(0.2, 0.2, dual=None),
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        if max_len is None:
            raise ValueError(
                "DrGRPOLoss needs max_len, the constant L of sum/(B*L) (e.g. the generation budget): "
                "the padded width would vary with padding and reintroduce the length bias"
            )
        args = dict(max_len=max_len, clip=clip)
        self._set(args, correction, entropy_coef, clip=clip, agg="seq-mean-token-sum-norm", max_len=max_len)
        self._args["max_len"] = self._config.max_len


class DAPOLoss(_Preset):
    r"""DAPO (Yu et al., 2025): PPO clip with clip-higher (ε_low = 0.2, ε_high = 0.28), token-mean, no KL.

    ℓ_t = −min(w·A, clip(w, 0.8, 1.28)·A), averaged over all tokens of the batch.
    Pair with ``rpg.advantages.dapo_overlong_penalty`` and
    ``rpg.advantages.informative_groups`` (dynamic sampling).

    Audited ([`rpg.testing.audit`][rpg.testing.audit], ``clip=None``): on-policy E[r]; off-policy, per token, E[r].
    """

    __slots__ = ()
    _arg_names = ("clip", "agg", *_EXTRA)

    def __init__(
        self,
        clip: ClipRule | None = Clip(0.2, 0.28, dual=None),
        agg: str = "token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        args = dict(clip=clip, agg=agg)
        self._set(args, correction, entropy_coef, clip=clip, agg=agg)


class REINFORCEPlusPlusLoss(_Preset):
    r"""REINFORCE++ (Hu et al., 2025): PPO clip on REINFORCE++ advantages, token-mean.

    ℓ_t = −min(w·A_t, clip(w)·A_t) with A_t from [`rpg.advantages.reinforce_pp`][rpg.advantages.reinforce_pp]:
    the KL to the reference is shaped into the reward (−β·k1 per token) and
    summed into returns-to-go, so it is not in the loss (β here is 0). With γ = 1
    and before whitening, the expected gradient is ∇(E[R] − β·KL(π_θ(y)‖π_ref(y)))
    for the *sequence* distribution, exactly on-policy; off-policy it would need
    importance weights of whole prefixes (``tests/test_sequence.py``).

    Audited ([`rpg.testing.audit`][rpg.testing.audit], ``clip=None``): on-policy E[r]; off-policy, per token, E[r]; with k1 returns
    from ``reinforce_pp`` (β > 0, γ = 1, no whitening): on-policy seq-urkl; off-policy, per token,
    none (closest: ufkl) — the shaped reward holds log π_old − log π_ref, fixed when θ moves.
    """

    __slots__ = ()
    _arg_names = ("clip", "agg", *_EXTRA)

    def __init__(
        self,
        clip: ClipRule | None = Clip(0.2, 0.2, dual=None),
        agg: str = "token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        args = dict(clip=clip, agg=agg)
        self._set(args, correction, entropy_coef, clip=clip, agg=agg)


class GSPOLoss(_Preset):
    r"""GSPO (Zheng et al., 2025, Qwen3): the ratio and the clip act on whole sequences.

    s_b = exp((1/|y_b|) Σ_t log w_bt) and, per sequence,
    ℓ_b = −min(s_b·A_b, clip(s_b, 1−ε_low, 1+ε_high)·A_b), averaged over sequences.
    ``per_token`` holds ℓ_b at each of the sequence's tokens (GSPO-token: the
    value is the sequence's, and ∂ℓ_bt/∂logp_bt = −s_b·A_bt where unclipped), and
    the aggregation is fixed to ``seq-mean-token-mean``, so ``loss`` is exactly
    the mean of ℓ_b and its gradient is GSPO's, ∇s_b = s_b·(1/|y_b|)Σ_t ∇logp_bt.
    Any other aggregation would silently re-weight sequences by length, so it is
    refused (``PolicyLoss(ratio="sequence", agg=...)`` expresses those, e.g. TRL's
    sequence-level importance sampling with its token-level loss types).
    ``[B, T]`` advantages give GSPO-token. Defaults: ε = (3e-4, 4e-4).

    Its expected gradient is ∇E[r] only on-policy and for responses of equal
    length: the 1/|y| inside s weights a short response's tokens more, and
    off-policy the geometric mean of token ratios is not an unbiased sequence
    importance weight.

    Audited ([`rpg.testing.audit`][rpg.testing.audit], ``clip=None``): on-policy E[r]; off-policy, per token, E[r].
    """

    __slots__ = ()
    _arg_names = ("clip", *_EXTRA)

    def __init__(
        self,
        clip: ClipRule | None = Clip(3e-4, 4e-4, dual=None),
        agg: str = "seq-mean-token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        if agg != "seq-mean-token-mean":
            raise ValueError(
                f"GSPOLoss aggregates per sequence: agg must be 'seq-mean-token-mean', got {agg!r} "
                f"(another of {AGG_MODES} would re-weight each sequence's loss by its length)"
            )
        args = dict(clip=clip)
        self._set(args, correction, entropy_coef, clip=clip, agg=agg, ratio="sequence")


class CISPOLoss(_Preset):
    r"""CISPO (MiniMax-M1, 2025): REINFORCE with truncated, detached importance weights.

    ℓ_t = −sg(clip(w, 1−ε_low, 1+ε_high))·A·logp: every token keeps its gradient,
    with a bounded weight (no PPO-style zeroing). ``clip`` is a
    [`Truncate`][rpg.clipping.Truncate]: ``low`` is ε_low (bound 1−ε_low; ``None`` = no lower
    bound), ``high`` is ε_high (bound 1+ε_high); ``Truncate.at(lower, upper)``
    gives absolute bounds (TRL's CISPO caps w at its ``epsilon_high`` itself). The
    default ``Truncate(None, 4.0)`` caps w at 5 with no lower bound (ScaleRL's
    setting). Peers disagree on the meaning of "eps_low = 0": in SkyRL it is
    documented as "no lower bound" yet gives the bound 1 − 0 = 1; here
    ``low=0.0`` means the bound 1 and ``None`` means none. A [`Clip`][rpg.clipping.Clip] is
    read as the same two bounds; its dual bound plays no part in truncation and
    is not used.

    Audited ([`rpg.testing.audit`][rpg.testing.audit], the default cap): on-policy E[r]; off-policy, per token, E[r].
    """

    __slots__ = ()
    _arg_names = ("clip", "agg", *_EXTRA)

    def __init__(
        self,
        clip: ClipRule | None = Truncate(None, 4.0),
        agg: str = "token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        args = dict(clip=clip, agg=agg)
        if isinstance(clip, Clip):
            clip = Truncate(clip.low, clip.high)
        self._set(args, correction, entropy_coef, style="reinforce", clip=clip, agg=agg)


class OnPolicyDistillationLoss(_Preset):
    r"""On-policy distillation: reverse KL to a teacher, importance-weighted so it holds off-policy.

    Pass the teacher's log-probs of the sampled tokens as ``ref_logp``. Per token
    ℓ = −sg(g)·logp with g = w·(A − β·log ρ), ρ = π_θ/π_teacher — the REINFORCE
    form of the URKL objective, so E_old[∇ℓ] = −∇(E[A] − β·KL(π_θ‖π_teacher))
    exactly, on- and off-policy, at the token level (each position's
    next-token distribution). ``advantages=None`` gives pure distillation;
    passing task advantages adds the reward term. The per-token reverse KL
    as advantage, without returns-to-go, is the usual on-policy distillation
    recipe; it is a partial gradient of the sequence-level KL (see module docs). Called without
    ``ref_logp`` (β > 0) it would distil toward π_old itself: it warns once per class (pass
    ``ref_logp=old_logp`` to mean that).

    Audited ([`rpg.testing.audit`][rpg.testing.audit]): on-policy urkl; off-policy, per token, urkl.
    """

    __slots__ = ()
    _warn_without_ref = True
    _arg_names = ("beta", "clip", "agg", *_EXTRA)

    def __init__(
        self,
        beta: float = 1.0,
        clip: ClipRule | None = None,
        agg: str = "token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        args = dict(beta=beta, clip=clip, agg=agg)
        self._set(args, correction, entropy_coef, kl="urkl", beta=beta, style="reinforce", clip=clip, agg=agg)


class DPPOLoss(_Preset):
    r"""DPPO (arXiv 2602.04879): REINFORCE with trust-region masking instead of a ratio clip.

    ℓ_t = −sg(min(w, C))·A·M_t·logp with M_t the [`TrustRegion`][rpg.clipping.TrustRegion] mask: a token
    loses its gradient when π_θ moved too far from π_old on it, p − q > δ_high for A > 0 or
    p − q < −δ_low for A ≤ 0 (``divergence="tv"``; the binary KL with ``"kl"``), p = π_θ(token),
    q = π_old(token). Where no token is masked and C does not bind, its expected gradient is
    ∇E[A] (the plain importance-sampled policy gradient). verl's ``dppo_tv``/``dppo_kl`` anchor
    the region on the recomputed π_old (this default); the paper and prime-rl anchor it on the
    rollout policy — pass ``old_logp = behavior_logp``. Defaults: δ = 0.15 (the paper's
    recommendation for tv; it recommends 0.05 for kl — pass ``low=0.05, high=0.05``), no cap,
    token-mean.

    Audited ([`rpg.testing.audit`][rpg.testing.audit], the default region): on-policy E[r]; off-policy, per token, none (closest: E[r]).
    """

    __slots__ = ()
    _arg_names = ("low", "high", "divergence", "cap", "agg", *_EXTRA)

    def __init__(
        self,
        low: float | None = 0.15,
        high: float | None = 0.15,
        divergence: str = "tv",
        cap: float | None = None,
        agg: str = "token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        clip = TrustRegion(low, high, divergence, cap)
        args = dict(low=clip.low, high=clip.high, divergence=divergence, cap=clip.cap, agg=agg)
        self._set(args, correction, entropy_coef, style="reinforce", clip=clip, agg=agg)


# --- token-level families: SAPO, TOPR, GPPO / CE-GPPO, DRO, prime-rl ---------------------------

__all__ += ["SAPOLoss", "TOPRLoss", "GPPOLoss", "DROLoss", "PrimeRLLoss"]


class SAPOLoss(_Preset):
    r"""SAPO (Gao et al., arXiv 2511.20347): a smooth sigmoid gate on the ratio instead of a clip.

    ℓ_t = −f(w_t)·A with f(w) = (4/τ)·σ(τ·(w − 1)), τ = τ_pos where A > 0 and τ_neg where A ≤ 0
    ([`SoftGate`][rpg.clipping.SoftGate]), averaged per sequence then over sequences
    (``seq-mean-token-mean``, the paper's, TRL's and verl's). ∂ℓ_t/∂logp_t = −4σ(1−σ)·w·A: the
    policy-gradient weight w·A times a factor ≤ 1 that is 1 at w = 1 and decays smoothly off it.

    Gradient follows: ∇E[A] exactly on-policy (w = 1); off-policy each token's importance-weighted
    gradient is scaled by 4σ(τ(w−1))(1−σ(τ(w−1))) < 1, a bias toward small steps that the tests
    compute by enumeration (not the gradient of E_θ[A]).
    Audited ([`rpg.testing.audit`][rpg.testing.audit], the default gate): on-policy E[r]; off-policy, per token, none (closest: E[r]).

    ``ratio="sequence"`` gates GSPO's sequence ratio s = exp(mean_t log w) instead (TRL's
    ``importance_sampling_level="sequence"`` for ``loss_type="sapo"``); the paper gates token ratios.
    TRL and verl compute the same token-level loss with the same defaults (τ_pos = 1, τ_neg = 1.05);
    verl clamps log w to ±20 first (no effect unless |log w| > 20) and always aggregates
    ``seq-mean-token-mean``. TRL picks τ with ``torch.where`` on Python floats, i.e. in float32
    (τ_neg = 1.05 becomes 1.0499999523…): pass that value to reproduce TRL's float64 loss to the
    last digit. With ``ratio="sequence"`` an aggregation other than ``seq-mean-token-mean``
    weights each sequence's loss by its length. Add a KL term with ``.replace(kl=..., beta=...)``.
    """

    __slots__ = ()
    _arg_names = ("tau_pos", "tau_neg", "ratio", "agg", *_EXTRA)
    _arg_defaults: ClassVar[dict] = {**_EXTRA_DEFAULTS, "ratio": "token"}

    def __init__(
        self,
        tau_pos: float = 1.0,
        tau_neg: float = 1.05,
        ratio: str = "token",
        agg: str = "seq-mean-token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        gate = SoftGate(tau_pos, tau_neg)
        args = dict(tau_pos=gate.tau_pos, tau_neg=gate.tau_neg, ratio=ratio, agg=agg)
        self._set(args, correction, entropy_coef, clip=gate, ratio=ratio, agg=agg)


class TOPRLoss(_Preset):
    r"""TOPR, Tapered Off-Policy REINFORCE (Le Roux et al., arXiv 2503.14286).

    ℓ_t = −A·logp where A > 0 (no importance weight: supervised learning on the positives) and
    ℓ_t = −sg(min(w, 1))·A·logp where A ≤ 0 (the negatives' weight truncated to [0, 1]) — a
    [`SignedTruncate`][rpg.clipping.SignedTruncate] in the REINFORCE style. Every token keeps a gradient.

    Gradient follows: ∇E[A] exactly on-policy (w = 1). Off-policy, for tokens from π_old, its
    expected gradient is −Σ π_old·(A⁺ + min(w, 1)·A⁻)·∇logp, which is not the gradient of E_θ[A]
    (the positives lack their weight w, the negatives' is capped); the tests compute it by
    enumeration. Audited ([`rpg.testing.audit`][rpg.testing.audit]): on-policy E[r]; off-policy, per token, none
    (closest: E[r]). The paper truncates the ratio of whole trajectories to the sampler μ; this is
    its token-level form, as ROLL's ``topr`` computes it (ROLL branches on the sign of the
    sequence's score, the paper on the return; here on the advantage passed). Anchor on the
    sampler with ``old_logp = behavior_logp``. Clip codes count a negative token whenever w > 1
    (its weight truncated to 1); the positives use no importance weight and are never counted.
    """

    __slots__ = ()
    _arg_names = ("agg", *_EXTRA)

    def __init__(
        self,
        agg: str = "token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        clip = SignedTruncate(positive=Truncate.at(1.0, 1.0), negative=Truncate.at(0.0, 1.0))
        self._set(dict(agg=agg), correction, entropy_coef, style="reinforce", clip=clip, agg=agg)


class GPPOLoss(_Preset):
    r"""GPPO (Klear-Reasoner, arXiv 2508.07629) and CE-GPPO (arXiv 2509.20712): PPO's clip with the gradient kept.

    ℓ_t = −m·A with PPO's clipped m (min(w, 1+ε_high) for A ≥ 0, max(w, 1−ε_low) for A < 0); where
    PPO would cut a clipped token's gradient it is instead −β_high·(1+ε_high)·A (A ≥ 0,
    w > 1+ε_high) or −β_low·(1−ε_low)·A (A < 0, w < 1−ε_low) per ∇logp
    ([`GradientPreservingClip`][rpg.clipping.GradientPreservingClip]). GPPO is β_low = β_high = 1 (the
    default: a clipped token's gradient is its gradient at the bound); CE-GPPO is the same loss with
    its β₁ = ``beta_low`` and β₂ = ``beta_high`` (the paper varies them; β = 0 is PPO; the authors'
    CE-GPPO scripts run ε = 0.2 both ways, β₁ = 0.5 or 0.75, β₂ = 1 and ``dual=10.0``). The value is
    PPO's clipped value for every β; CE-GPPO's sg-form has the value β·bound·A there (same gradient).

    Gradient follows: ∇E[A] exactly (off-policy, importance-weighted) where no bound binds, as PPO;
    where one binds, the gradient is the bound's (times β), neither PPO's 0 nor the unclipped w·A —
    computed by enumeration in the tests. Defaults: ε = (0.2, 0.28), token-mean, no dual clip (the
    papers' formulas); ``dual=3.0`` adds the dual clip of the authors' training code (verl's
    ``clip_ratio_c``), whose loss and gradient it then equals.
    Audited ([`rpg.testing.audit`][rpg.testing.audit], the default bounds): on-policy E[r]; off-policy, per token, none (closest: E[r]);
    with ``low=None, high=None`` (no bound: PPO's unclipped loss): on-policy E[r]; off-policy, per token, E[r].
    """

    __slots__ = ()
    _arg_names = ("low", "high", "beta_low", "beta_high", "agg", "dual", *_EXTRA)
    _arg_defaults: ClassVar[dict] = {**_EXTRA_DEFAULTS, "dual": None}

    def __init__(
        self,
        low: float | None = 0.2,
        high: float | None = 0.28,
        beta_low: float = 1.0,
        beta_high: float = 1.0,
        agg: str = "token-mean",
        *,
        dual: float | None = None,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        clip = GradientPreservingClip(low, high, beta_low, beta_high, dual)
        args = dict(
            low=clip.low, high=clip.high, beta_low=clip.beta_low, beta_high=clip.beta_high, agg=agg, dual=clip.dual
        )
        self._set(args, correction, entropy_coef, clip=clip, agg=agg)


class DROLoss(_Preset):
    r"""DRO / Kimi-1.5's squared penalty (Richemond et al., arXiv 2405.19107; Kimi Team, arXiv 2501.12599).

    ℓ_t = −A·logp + (β/2)·(logp − log μ)², μ the policy that sampled the tokens: the call's
    ``behavior_logp``, and π_old when it is not given (as verl's ``dro`` and ROLL's ``kimi15``,
    which anchor on ``old_log_prob``; Tinker's ``dro`` anchors on the sampling log-probs — pass
    them as ``old_logp``, or as ``behavior_logp``). The policy-gradient part has no importance
    weight (REINFORCE with w̄ = 1); the penalty is the ``k2`` term anchored on μ
    (``kl_anchor="behavior"``) and kept outside the REINFORCE weight (``separate_kl``), so value and
    gradient are exactly the formula's.

    Gradient follows, for tokens drawn from q (π_old, or μ with a correction): exactly
    ∇ of the DRO objective E_{y∼q}[A·log π_θ(y) − (β/2)(log π_θ(y) − log μ(y))²] (the expectation
    under the fixed sampler, checked by enumeration); that is ∇E_θ[A] only on-policy (π_θ = q = μ,
    where the penalty's gradient is 0). Audited ([`rpg.testing.audit`][rpg.testing.audit], β = 0.5, no ``ref_logp``):
    on-policy E[r]; off-policy, per token, none (closest: E[r]) — its own objective, under the sampler, is
    no candidate of the audit.

    With ``behavior_logp`` the rollout correction's weight and the call's ``weights`` multiply
    the whole per-token loss, penalty included (verl's ``rollout_is_weights`` do the same);
    ``weight_penalty=False`` leaves the penalty unweighted — then it is averaged under μ itself.

    Kimi-1.5 (its eq. 3) squares the log-ratio of the whole response, (β/2)(Σ_t log π_θ/μ)²; verl,
    ROLL and Tinker square each token's, as here. The sequence form is not a per-token loss (its
    gradient at one token depends on the others' log-ratios) and is not offered.
    It uses no importance weight, so no token is ever reported as clipped (``clip_frac`` is 0).

    Args:
        beta: β > 0, the penalty coefficient (verl's ``dro_beta``, ROLL's ``kimi15_tau``, Tinker's
            ``beta``); required, as in verl (the peers disagree: ROLL's ``kimi15_tau`` defaults to 0.1,
            Tinker's documentation uses 0.05).
        agg: aggregation (default ``"token-mean"``; Tinker sums).
        weight_penalty: whether the correction weight and ``weights`` multiply the penalty.
    """

    __slots__ = ()
    _arg_names = ("beta", "agg", "weight_penalty", *_EXTRA)
    _arg_defaults: ClassVar[dict] = {**_EXTRA_DEFAULTS, "weight_penalty": True}

    def __init__(
        self,
        beta: float,
        agg: str = "token-mean",
        *,
        weight_penalty: bool = True,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        if not isinstance(weight_penalty, bool):
            raise TypeError(f"weight_penalty must be a bool, got {type(weight_penalty).__name__}")
        args = dict(beta=beta, agg=agg, weight_penalty=weight_penalty)
        self._set(
            args,
            correction,
            entropy_coef,
            kl="k2",
            beta=beta,
            style="reinforce",
            clip=Truncate.at(1.0, 1.0),
            agg=agg,
            kl_anchor="behavior",
            separate_kl=True,
            weight_kl=weight_penalty,
        )
        if not self._config.beta > 0:
            raise ValueError(f"DROLoss needs beta > 0 (the squared penalty's coefficient), got {beta!r}")


class PrimeRLLoss(_Preset):
    r"""prime-rl's default loss: DPPO's binary-TV trust-region mask plus a squared penalty toward the sampler.

    ℓ_t = −M_t·w·A + τ·(logp − log μ)², w = π_θ/π_old, M_t the [`TrustRegion`][rpg.clipping.TrustRegion]
    ``"tv"`` mask (0 where p − q > δ_high for A > 0, or p − q < −δ_low for A ≤ 0, p = π_θ(token),
    q = π_old(token)), in the differentiable style, and the ``k2`` term with β = 2τ anchored on μ
    (``kl_anchor="behavior"``: ``behavior_logp``, π_old when not given) on every token, masked or not.
    prime-rl has no recomputed π_old: its ratio, mask and penalty all anchor on the sampler —
    pass ``old_logp = behavior_logp`` (bypass). Aggregation: token-mean with the global token count
    (prime-rl sums and divides by the global number of loss tokens: pass ``batch_num_tokens``).

    Gradient: equal to prime-rl's (``default_loss_fn`` with ``adv_tau = 1``). A masked token's
    value here is taken at the region's edge (rpg's trust region in the differentiable style),
    where prime-rl's is 0; the loss values differ by those tokens, the gradients do not. Gradient
    follows ∇E[A] − τ·∇E_q[(log π_θ − log μ)²] exactly where no token is masked (the penalty's
    expectation under the sampler q of the tokens). Defaults are prime-rl's: δ = 0.2 both ways,
    τ = 1e-3; ``kl_tau=0`` drops the penalty (then a ``ref_logp`` is accepted and unused, as by every loss
    with β = 0; with τ > 0 it is refused: the penalty's anchor is the sampler). Audited ([`rpg.testing.audit`][rpg.testing.audit], the defaults, no ``ref_logp``): on-policy E[r];
    off-policy, per token, none (closest: E[r]). The correction weight and ``weights`` multiply the penalty too (prime-rl's
    ``loss_weights`` do).
    """

    __slots__ = ()
    _arg_names = ("low", "high", "kl_tau", "agg", *_EXTRA)

    def __init__(
        self,
        low: float | None = 0.2,
        high: float | None = 0.2,
        kl_tau: float = 1e-3,
        agg: str = "token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        from ._util import as_real

        tau = as_real("kl_tau", kl_tau)
        if not 0 <= tau < float("inf"):
            raise ValueError(f"kl_tau must be >= 0 and finite, got {kl_tau!r}")
        clip = TrustRegion(low, high, "tv")
        args = dict(low=clip.low, high=clip.high, kl_tau=tau, agg=agg)
        self._set(args, correction, entropy_coef, kl="k2", beta=2 * tau, clip=clip, agg=agg, kl_anchor="behavior")


# --- sequence-level and selection families: GMPO, VESPO, Clip-Cov, KL-Cov ---------------------


def _log_eps(name: str, value, sign: int) -> float | None:
    """A GMPO bound ε on log w (``None``: off) as [`Clip`][rpg.clipping.Clip]'s ε on w: e^ε − 1 (upper), 1 − e^−ε (lower)."""
    value = _check_bound(f"GMPOLoss.{name}", value, lambda v: 0 <= v < math.inf, f"0 <= {name} < inf")
    if value is None:
        return None
    return math.expm1(value) if sign > 0 else -math.expm1(-value)


class GMPOLoss(_Preset):
    r"""GMPO (Zhao et al., arXiv 2507.20673): the geometric mean of the sequence's clipped token ratios.

    Per sequence, with each token's log-ratio clipped in log space before the mean, sign-aware
    (A > 0: log w ≤ ε_high; A < 0: log w ≥ −ε_low),

        s_b = exp((1/n_b)·Σ_t clip(log w_bt)),     ℓ_b = −s_b·A_b,

    averaged over sequences (``agg="seq-mean-token-mean"``, fixed: another aggregation would re-weight
    sequences by length; ``PolicyLoss(ratio="geometric", agg=...)`` expresses those). The framework's
    ``ratio="geometric"`` with ``Clip(1 − e^−ε_low, e^ε_high − 1, dual=None)`` ([`rpg.sequence`][rpg.sequence]);
    ``per_token`` holds ℓ_b at each token and the gradient of a clipped token is 0, so the loss's
    gradient is exactly ∇ of the mean of ℓ_b. ``low`` and ``high`` are ε on log w, as the paper writes
    the range (e^−ε_low, e^ε_high) and as verl's ``geo_mean`` reads ``clip_ratio_low/high``. Defaults:
    the paper's ε = 0.4 (verl's generic ``clip_ratio`` default, 0.2, is what its ``geo_mean`` gets
    when nothing is set: pass ``low=0.2, high=0.2`` for that).

    Equal to verl's ``geo_mean`` (loss and gradient, tested) for a per-sequence advantage, except that
    verl averages over all B rows of the call (an empty row counts, with loss 0) where rpg averages over
    the rows with a token (pass ``global_batch_size=B`` for verl's), and that verl multiplies a
    sequence's loss by the geometric mean of its rollout weights where rpg's ``weights`` and correction
    multiply each token's term. For a token-level A each token's sign picks its branch (A = 0: the upper
    one; verl counts an A = 0 token's log-ratio as 0).

    Its expected gradient is ∇E[r] only on-policy for responses of equal length (the 1/n_b weights a
    short response's tokens more); off-policy the geometric mean is not the sequence importance weight
    (measured by enumeration in the tests).

    Audited ([`rpg.testing.audit`][rpg.testing.audit], the default clip): on-policy E[r]; off-policy, per token, none (closest: E[r]).
    Without the clip (``low=None, high=None``): on-policy E[r]; off-policy, per token, E[r].
    """

    __slots__ = ()
    _arg_names = ("low", "high", *_EXTRA)

    def __init__(
        self,
        low: float | None = 0.4,
        high: float | None = 0.4,
        agg: str = "seq-mean-token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        if agg != "seq-mean-token-mean":
            raise ValueError(
                f"GMPOLoss aggregates per sequence: agg must be 'seq-mean-token-mean', got {agg!r} "
                f"(another of {AGG_MODES} would re-weight each sequence's loss by its length)"
            )
        clip = Clip(_log_eps("low", low, -1), _log_eps("high", high, 1), dual=None)
        args = dict(low=None if low is None else float(low), high=None if high is None else float(high))
        self._set(args, correction, entropy_coef, clip=clip, agg=agg, ratio="geometric")


class VESPOLoss(_Preset):
    r"""VESPO (arXiv 2602.10693): REINFORCE weighted by a Gamma kernel of the whole sequence's ratio.

        log W_b = Σ_t log w_bt,   φ(W) = W^k·e^{−λ(W − 1)},   ℓ_bt = −sg(φ(W_b)·A_bt)·logp_bt,

    (k, λ) = (``k_pos``, ``lambda_pos``) for A ≥ 0 and (``k_neg``, ``lambda_neg``) for A < 0, φ(1) = 1,
    evaluated in log space ([`rpg.sequence.Gamma`][rpg.sequence.Gamma]; no length normalisation, so
    long responses neither overflow nor give NaN). The framework's ``style="reinforce",
    ratio="product", kernel=Gamma(...)``. Defaults are TRL's (``loss_type="vespo"``): k = (2, 3),
    λ = (3, 2), ``agg="token-mean"`` (TRL divides by its ``num_items_in_batch``: pass it as
    ``batch_num_tokens``). Every aggregation applies (the loss is per token).

    Equal to TRL 1.16's ``_compute_loss`` with ``loss_type="vespo"`` (loss and gradient, tested) where
    TRL's clamps do not bind (see [`Gamma`][rpg.sequence.Gamma]). With a behaviour policy (``behavior_logp``)
    the [`RolloutCorrection`][rpg.correction.RolloutCorrection]'s weight enters the sequence ratio instead of
    multiplying the tokens' losses, W = Π_t w_t·ρ̄(y) (ρ̄(y) = Π_t ρ̄_t at the token level): φ of the ratio
    against the rollout engine, as TRL computes it with its token-level vLLM correction (tested for
    ``token_truncate`` and ``token_mask``).
    Its expected gradient: on-policy (W = 1, φ = 1) exactly −∇E[R(y)] under ``seq-mean-token-sum``; off
    policy the kernel biases it toward on-policy samples (measured by enumeration in the tests) —
    ``PolicyLoss(style="reinforce", ratio="product")`` (φ(W) = W) is the exact off-policy gradient.

    Audited ([`rpg.testing.audit`][rpg.testing.audit], the default kernel): on-policy E[r]; off-policy, per token, none (closest: E[r]).
    """

    __slots__ = ()
    _arg_names = ("k_pos", "lambda_pos", "k_neg", "lambda_neg", "agg", *_EXTRA)

    def __init__(
        self,
        k_pos: float = 2.0,
        lambda_pos: float = 3.0,
        k_neg: float = 3.0,
        lambda_neg: float = 2.0,
        agg: str = "token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        kernel = Gamma(k_pos, lambda_pos, k_neg, lambda_neg)
        args: dict[str, object] = dict(
            k_pos=kernel.k_pos, lambda_pos=kernel.lambda_pos, k_neg=kernel.k_neg, lambda_neg=kernel.lambda_neg, agg=agg
        )
        self._set(args, correction, entropy_coef, style="reinforce", ratio="product", kernel=kernel, agg=agg)


class ClipCovLoss(_Preset):
    r"""Clip-Cov (Cui et al., arXiv 2505.22617): the PPO clip, and a few high-covariance tokens lose their loss.

    ℓ_t = −min(w·A, clip(w, 1−ε, 1+ε)·A), times 0 at K = max(⌊fraction·N⌋, 1) tokens drawn at random
    among those not already clipped whose covariance (A_t − mean A)·(logp_t − mean logp) lies in
    (``low``, ``high``) — [`CovarianceDrop`][rpg.selection.CovarianceDrop]. The call's ``generator=`` drives the
    draw (``None``: torch's default generator). Defaults are verl's ``clip_cov`` (and the paper's):
    ε = 0.2, fraction 2e-4, band (1, 5), ``agg="token-mean"``; every aggregation applies. Equal to
    verl's ``clip_cov`` and SkyRL's (loss and gradient, same seed; tested). The selection uses the
    statistics of one call (see [`rpg.selection`][rpg.selection] for micro-batches). Its expected gradient is
    PPO's where no token is selected; selected tokens are removed from it on purpose (biased). The preset
    has no KL term; one added with ``.replace(kl=..., beta=...)`` stays on every token, the dropped ones
    included (verl adds its KL loss apart from ``clip_cov``). ``out.metrics["select_frac"]`` is the fraction
    dropped (verl's ``pg_clipfrac`` for ``clip_cov``).

    Audited ([`rpg.testing.audit`][rpg.testing.audit], the defaults, a generator seeded 0 at every call; the
    selection is made on the enumerated batch, each response once, where it drops one token): on-policy none
    (closest: E[r]); off-policy, per token, none (closest: E[r]).
    """

    __slots__ = ()
    _arg_names = ("clip", "fraction", "low", "high", "agg", *_EXTRA)

    def __init__(
        self,
        clip: ClipRule | None = Clip(0.2, 0.2, dual=None),
        fraction: float = 2e-4,
        low: float = 1.0,
        high: float = 5.0,
        agg: str = "token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        rule = CovarianceDrop(fraction, low, high)
        args = dict(clip=clip, fraction=rule.fraction, low=rule.low, high=rule.high, agg=agg)
        self._set(args, correction, entropy_coef, clip=clip, agg=agg, select=rule)


class KLCovLoss(_Preset):
    r"""KL-Cov (Cui et al., arXiv 2505.22617): −w·A, plus coef·|log w| on the top-covariance tokens.

    ℓ_t = −w·A + coef·|log π_θ − log π_old|·[t among the K = max(⌊fraction·N⌋, 1) tokens of largest
    covariance (A_t − mean A)·(logp_t − mean logp)] — [`CovariancePenalty`][rpg.selection.CovariancePenalty]; no
    clip. Defaults are verl's ``kl_cov``: fraction 2e-4, coef 1, ``agg="token-mean"`` (every aggregation
    applies). Equal to verl's and SkyRL's ``kl_cov`` (loss and gradient; tested). The selection uses the
    statistics of one call (see [`rpg.selection`][rpg.selection]). Its expected gradient is ∇E[A] (the
    importance-sampled policy gradient) plus the penalty's coef·sign(log w)·∇logp on the selected tokens,
    which is 0 on-policy and pulls π_θ back toward π_old off-policy. ``out.metrics["select_frac"]`` is the
    fraction of tokens penalised.

    Audited ([`rpg.testing.audit`][rpg.testing.audit], the defaults; the selection is made on the enumerated
    batch, each response once, where it penalises one token): on-policy E[r]; off-policy, per token, none
    (closest: E[r]).
    """

    __slots__ = ()
    _arg_names = ("fraction", "coef", "agg", *_EXTRA)

    def __init__(
        self,
        fraction: float = 2e-4,
        coef: float = 1.0,
        agg: str = "token-mean",
        *,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        rule = CovariancePenalty(fraction, coef)
        args = dict(fraction=rule.fraction, coef=rule.coef, agg=agg)
        self._set(args, correction, entropy_coef, agg=agg, select=rule)
