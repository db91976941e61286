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
| ``RPGLoss`` | the eight RPG losses ([`rpg.losses`][rpg.losses]) | ∇ its divergence |

"Gradient follows" is checked by exact enumeration in ``tests/test_presets.py``
(token level) and ``tests/test_sequence.py`` (two-step sequences). Per-token KL
penalties give only a *partial* gradient of the sequence-level KL (Tang &
Munos, "On a few pitfalls in KL divergence gradient estimation for RL"): the
KL of a later token also depends on the earlier tokens, and a per-token loss
ignores that. Only a KL shaped into the reward and summed into returns-to-go
(REINFORCE++) follows ∇KL(π_θ(y)‖π_ref(y)) — exactly on-policy.
"""

from __future__ import annotations

from .aggregation import AGG_MODES
from .clipping import Clip, ClipRule, Truncate, TrustRegion
from .config import LossConfig
from .correction import RolloutCorrection
from .losses import PolicyLoss

__all__ = [
    "GRPOLoss",
    "DrGRPOLoss",
    "DAPOLoss",
    "REINFORCEPlusPlusLoss",
    "GSPOLoss",
    "CISPOLoss",
    "OnPolicyDistillationLoss",
    "DPPOLoss",
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
