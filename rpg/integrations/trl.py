r"""Train with any rpg loss inside TRL's ``GRPOTrainer``, or with the rpg loss TRL's ``GRPOConfig`` describes.

[`RPGGRPOTrainer`][rpg.integrations.trl.RPGGRPOTrainer] is a ``trl.GRPOTrainer`` whose loss is an rpg loss.
Everything else is TRL's: generation, rewards, group advantages, the old
log-probs (``old_per_token_logps``, present when ``num_iterations > 1``,
``steps_per_generation > gradient_accumulation_steps`` or with vLLM's
correction; otherwise the batch is on-policy and π_old = sg(π_θ)), the reference
and rollout-engine log-probs, and the normalisation counts.

**Two ways to choose the loss.**

* ``RPGGRPOTrainer(args=GRPOConfig(loss_type="dapo", ...))`` — no ``loss=``: the
  trainer builds the rpg loss GRPOConfig describes ([`loss_from_grpo_config`][rpg.integrations.trl.loss_from_grpo_config])
  and reproduces TRL's own loss and gradient exactly on the same inputs:
  ``loss_type``, ``epsilon``/``epsilon_high``, ``delta``, ``beta`` with
  ``use_bias_correction_kl``, ``importance_sampling_level``, the vLLM
  importance-sampling correction, ``top_entropy_quantile``,
  ``off_policy_mask_threshold`` and the (adaptive) entropy bonus. The settings
  it cannot express exactly are refused with the reason (table below).
* ``RPGGRPOTrainer(loss=rpg.RPGLoss("urkl", style="reinforce"), args=...)`` — the
  given loss decides the per-token loss and its aggregation. GRPOConfig's loss
  fields left at their defaults do not constrain it; a field set to another value
  must agree with the loss (``loss_type`` its aggregation, ``epsilon``/
  ``epsilon_high``/``delta`` its clip, ``beta`` its β, ``use_bias_correction_kl=False``
  its ``kl="k3"``, ``importance_sampling_level="sequence"`` its ``ratio``), else
  ``ValueError`` names the fields. TRL's token and sequence masks, its vLLM
  correction and its entropy bonus act as below. With ``GRPOConfig(beta=0)`` TRL
  loads no reference model, and a loss with β > 0 uses π_ref = π_old (RPG's
  iterative reference); a loss whose KL term is anchored on the behaviour policy
  (``kl_anchor="behavior"``, e.g. ``PrimeRLLoss``) needs ``beta=0`` there.

**What the loss receives** (per micro-batch, ``[B, T]`` unless noted): ``logp`` —
TRL's per-token log-probs; ``old_logp`` — ``old_per_token_logps`` or
``logp.detach()``; ``advantages`` — ``[B]`` (or ``[B, T]``); ``mask`` —
``completion_mask`` × ``tool_mask``; ``ref_logp`` — ``ref_per_token_logps`` (or
``None``); ``behavior_logp`` — vLLM's ``sampling_per_token_logps`` when a
correction applies (a NaN, a token vLLM could not score, becomes ρ = 1 as in TRL);
``weights`` — TRL's off-policy sequence mask (OPSM) × high-entropy token mask;
``entropy`` — TRL's differentiable entropies when a setting needs them; and the
counts of the gradient-accumulation window (GA micro-batches, P processes):

| aggregation | count passed | TRL ``loss_type`` it reproduces |
|---|---|---|
| ``token-mean`` | ``batch_num_tokens`` = max(N_gen, 1)·GA/(spg·P) | dapo, cispo |
| ``token-mean`` with ``loss_type="bnpo"`` | ``batch_num_tokens`` = max(local tokens, 1)·GA | bnpo |
| ``seq-mean-*`` | ``global_batch_size`` = B·GA (empty rows count, as in TRL) | grpo, luspo, dr_grpo |

(N_gen: TRL's ``num_items_in_batch``; spg: ``steps_per_generation``; GA is 1 in
eval.) The micro-batch losses sum to the window's loss, and accelerate's mean
all-reduce gives TRL's gradient.

**TRL's multipliers, and rpg's convention.** TRL multiplies only the policy-gradient
term by its vLLM weight, OPSM and entropy masks, keeps the KL term unweighted,
and keeps rejected tokens in every denominator. The loss built from GRPOConfig
does the same (``weight_kl=False``, ``RolloutCorrection(count_rejected=True)``). A
given loss applies them by its own ``weight_kl`` — ``True`` by default, the
whole per-token loss, which keeps the KL gradient exact under the behaviour
policy; ``loss.replace(weight_kl=False)`` gives TRL's convention for a
differentiable-style loss. TRL's vLLM correction becomes the loss's
``correction``: ``vllm_importance_sampling_mode`` ``{token,sequence}_{truncate,mask}``
→ ``RolloutCorrection(level, mode, lower=clip_min, upper=clip_max)`` (the
sequence weight is the product Π_t π_old/μ over the response, TRL's and rpg's
``level="sequence"``); a loss whose own ``correction`` differs is refused.

**Entropy bonus.** TRL subtracts ``entropy_coef``·Σ H·m′ / (max(Σ m′, 1)·GA), a
token mean over this micro-batch's kept tokens m′ (the high-entropy mask applied)
whatever the ``loss_type``. rpg's own ``entropy_coef`` aggregates with the loss's
aggregation and global counts, which differs, so the trainer adds TRL's term
itself ([`rpg.aggregate`][rpg.aggregation.aggregate] with those counts) and runs TRL's adaptive
controller (``use_adaptive_entropy``) with the same behaviour: the coefficient is
applied only when the previous optimizer step's world-mean entropy was at most
``entropy_target``, and moves by ``entropy_coef_delta`` at each step. A given loss
with its own ``entropy_coef > 0`` and GRPOConfig's bonus together are refused (two
bonuses).

**Settings beyond a single rpg preset** (loss built from GRPOConfig, all reproduced exactly):

| setting | how |
|---|---|
| ``loss_type="cispo"`` with ``beta != 0`` | ``style="reinforce"`` with ``separate_kl=True``, ``weight_kl=False``: −sg(min(r, cap))·A·logp plus the differentiable KL surrogate (k3, or r·k3 = ``"urkl"``) beside it, outside the cap and TRL's multipliers |
| ``loss_type="cispo"`` with ``importance_sampling_level="sequence"`` | ``style="reinforce"``, ``ratio="sequence"``: −sg(min(s, cap))·A·logp on every token |
| ``loss_type="cispo"`` with ``epsilon`` or ``delta`` set | accepted: TRL's cispo does not read them, and a log line says so |
| ``loss_type="sapo"`` | [`rpg.SAPOLoss`][rpg.presets.SAPOLoss] with GRPOConfig's ``sapo_temperature_pos``/``_neg`` (rounded to float32, the τ TRL computes with), ``ratio`` by ``importance_sampling_level``, ``seq-mean-token-mean``, the KL term beside it; ``epsilon``, ``epsilon_high``, ``delta`` are unused (logged) |
| ``loss_type="vespo"`` | [`rpg.VESPOLoss`][rpg.presets.VESPOLoss] with GRPOConfig's ``vespo_k_*``/``vespo_lambda_*`` (λ ≥ 1e-4, as TRL): −sg(φ(W)·A)·logp, W = Π_t r_t times the vLLM weight (which enters W instead of multiplying the loss, as in TRL), the KL term beside it (``separate_kl``); ``epsilon``, ``epsilon_high``, ``delta`` are unused (logged). Equal to TRL where its clamps (log r to ±20, W to [1e-8, e^20]) do not bind |
| ``delta < 1`` | [`DeltaClip`][rpg.integrations.trl.DeltaClip]: A > 0 capped at r = δ < 1, A < 0 clipped to [1−ε, 1+ε_high] |
| ``importance_sampling_level="sequence"`` with ``top_entropy_quantile < 1`` or a ``token_*`` vLLM mode | TRL multiplies the one sequence-level term by each token's weight and sums over the response: every token gets the mean of its response's weights (the token-level vLLM weight folded in), which is exactly that |

**Refused, with the reason** (loss built from GRPOConfig), because TRL's computation is itself wrong:

| setting | why |
|---|---|
| ``importance_sampling_level="sequence"`` with ``beta != 0`` and ``use_bias_correction_kl`` | TRL weights each token's k3 by the sequence ratio s and differentiates s, so every token's KL sends gradient to every token of its response: on-policy (s = 1) its expected gradient follows neither the per-position KL nor the sequence KL (measured in the integrations docs) |

**Metrics.** Every loss metric ``GRPOTrainer`` logs, under its names and reductions:
``entropy`` and ``kl`` (token-weighted means over all processes; ``kl`` is the loss's KL term, β
excluded, toward the loss's own anchor — TRL's k3 or r·k3; vLLM's μ for a ``kl_anchor="behavior"`` loss),
``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean`` (token-weighted), ``clip_ratio/low_min``, ``clip_ratio/high_max`` (min / max
over the gathered per-sequence means) for the PPO loss types, ``cispo_clip_ratio`` for cispo,
``vespo/phi_seq_mean`` (the mean over sequences of φ(W)) for vespo,
``policy_loss`` (the rpg loss of the micro-batch before the accumulation scale and the entropy bonus;
TRL logs it only with an entropy bonus), ``entropy_coef`` and ``aux_loss``. For a loss built from
GRPOConfig the clip ratios are TRL's definitions with GRPOConfig's ε, ε_high, δ; a given loss reports
its own clip rule's clipped tokens under the same names. rpg's own metrics are logged as
``rpg/<name>`` and the rollout correction's as ``rollout_corr/<name>``: per-call means, reduced over
processes (token-weighted means; min / max for ``*min`` / ``*max``), so a multi-process step logs what
one process holding the same micro-batch logs.

A Mixture-of-Experts router loss is added as TRL does, and logged as ``aux_loss``.
(TRL averages logged values over micro-batches, so rpg's are per-call means.)
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rpg.integrations.trl needs TRL: pip install 'rpg-losses[trl]' (from a clone of rpg: pip install -e '.[trl]')"
    ) from e

from ..clipping import DUAL, HIGH, LOW, Clip, ClipRule, SoftGate, Truncate
from ..correction import RolloutCorrection
from ..losses import PolicyLoss
from ..presets import SAPOLoss, VESPOLoss
from ..sequence import Gamma
from . import _trl_fused, _trl_step

logger = logging.getLogger(__name__)

__all__ = ["RPGGRPOTrainer", "loss_from_grpo_config", "correction_from_grpo_config", "DeltaClip"]

# TRL loss_type -> the rpg aggregation that reproduces it (with the counts the trainer passes).
_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "luspo": "seq-mean-token-sum",
    "sapo": "seq-mean-token-mean",
    "vespo": "token-mean",
}
_NOT_EXPRESSIBLE: dict[str, str] = {}  # every TRL loss_type has its rpg loss
# GRPOConfig's clip fields that a loss_type does not read (TRL ignores them; the trainer logs that).
_UNUSED_CLIP_FIELDS = {
    "cispo": ("epsilon", "delta"),
    "sapo": ("epsilon", "epsilon_high", "delta"),
    "vespo": ("epsilon", "epsilon_high", "delta"),
}
_LOSS_TYPES = tuple(_AGG) + tuple(_NOT_EXPRESSIBLE)
_LEVELS = ("token", "sequence")
_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _changed(args, name: str) -> bool:
    """Whether GRPOConfig's ``name`` differs from its default (``False`` for a field this TRL lacks)."""
    fields = {f.name: f for f in dataclasses.fields(args)}  # args: a GRPOConfig (a dataclass)
    return name in fields and getattr(args, name) != fields[name].default


def _check_loss_type(args) -> str:
    lt = args.loss_type
    if lt not in _LOSS_TYPES:
        raise ValueError(f"unknown GRPOConfig.loss_type {lt!r}; TRL's are {', '.join(map(repr, _LOSS_TYPES))}")
    if lt in _NOT_EXPRESSIBLE:
        raise ValueError(
            f"RPGGRPOTrainer cannot reproduce loss_type={lt!r} exactly: {_NOT_EXPRESSIBLE[lt]}. "
            "Use TRL's GRPOTrainer for it, or another loss_type"
        )
    return lt


def _clip_from_config(args):
    """The clip rule of GRPOConfig's ``epsilon``, ``epsilon_high``, ``delta`` (and ``loss_type="cispo"``)."""
    eps_low = args.epsilon
    eps_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    if args.loss_type == "cispo":
        # TRL: −sg(min(r, epsilon_high))·A·logp — epsilon_high is an absolute cap, no lower bound; TRL's
        # cispo reads neither epsilon nor delta (the trainer logs that they are unused).
        if not eps_high > 0:
            raise ValueError(f"loss_type='cispo' caps the weight at epsilon_high, which must be > 0, got {eps_high!r}")
        return Truncate.at(None, eps_high)
    if eps_low is None or not eps_low >= 0:
        raise ValueError(f"GRPOConfig.epsilon must be >= 0, got {eps_low!r}")
    if not eps_high >= 0:
        raise ValueError(f"GRPOConfig.epsilon_high must be >= 0, got {eps_high!r}")
    low = eps_low if eps_low < 1 else None  # a bound 1 − ε ≤ 0 never binds (r > 0)
    delta = args.delta
    if delta is None:
        return Clip(low, eps_high, dual=None)
    # TRL: −min(min(r, δ)·A, clip(r, 1−ε, 1+ε_high)·A), i.e. ℓ = −m·A with
    # A > 0: m = min(r, δ, 1+ε_high); A < 0: m = min(max(r, 1−ε), max(δ, 1+ε_high)).
    if not delta > 0:
        raise ValueError(f"GRPOConfig.delta must be > 0 (an upper bound on the ratio), got {delta!r}")
    if delta >= 1 + eps_high and delta > 1:
        # A < 0: min(max(r, 1−ε), δ); A > 0 unchanged: the dual clip with c = δ.
        return Clip(low, eps_high, dual=delta)
    if 1 <= delta < 1 + eps_high:
        # A > 0: min(r, δ); A < 0: clip(r, 1−ε, 1+ε_high): upper bound δ, dual bound 1+ε_high.
        return Clip(low, delta - 1, dual=1 + eps_high)
    # δ < 1: the upper bound for A > 0 lies below 1, which rpg.Clip's ε_high ≥ 0 cannot state.
    return DeltaClip(None if low is None else 1 - low, delta, 1 + eps_high)


@dataclasses.dataclass(frozen=True)
class DeltaClip(ClipRule):
    r"""TRL's PPO clip with ``delta < 1``, as absolute bounds on the ratio (differentiable style).

    TRL's per-token loss −min(min(w, δ)·A, clip(w, 1−ε, 1+ε_high)·A) is ℓ = −m·A with

    * A ≥ 0: m = min(w, δ) — clipped (no gradient through w) when w > δ;
    * A < 0: m = min(max(w, 1−ε), 1+ε_high) — clipped below ``lower`` = 1−ε and above ``dual`` = 1+ε_high
      (the cap δ on min(w, δ)·A makes clip(w)·A the minimum there).

    With δ < 1 even an on-policy token (w = 1) with A > 0 is clipped: its value is −δ·A and its gradient 0.
    [`rpg.Clip`][rpg.clipping.Clip] holds the same rule for δ ≥ 1 (ε_high ≥ 0 there);
    ``loss_from_grpo_config`` builds this one for δ < 1. Metrics codes: 1 low, 2 high (w ≥ δ, A > 0),
    3 dual (w ≥ 1+ε_high, A < 0).

    Args:
        lower: the bound 1−ε for A < 0, or ``None`` (ε ≥ 1: never binds).
        upper: δ, 0 < δ, the bound for A ≥ 0.
        dual: 1+ε_high, the upper bound for A < 0.
    """

    lower: float | None
    upper: float
    dual: float

    styles = ("differentiable",)

    def __post_init__(self) -> None:
        if self.lower is not None and not 0 <= self.lower < math.inf:
            raise ValueError(f"DeltaClip.lower must be >= 0 or None, got {self.lower!r}")
        if not 0 < self.upper < math.inf:
            raise ValueError(f"DeltaClip.upper must be > 0, got {self.upper!r}")
        if not self.dual >= 1:
            raise ValueError(f"DeltaClip.dual must be >= 1, got {self.dual!r}")

    def _bounds(self, up: torch.Tensor, like: torch.Tensor):
        def full(v):
            return torch.full((), v, dtype=like.dtype, device=like.device)

        lower = -math.inf if self.lower is None else self.lower
        return torch.where(up, full(-math.inf), full(lower)), torch.where(up, full(self.upper), full(self.dual))

    def effective_ratio(self, w, adv_hat, ratios=None):
        m = torch.clamp(w, *self._bounds(adv_hat >= 0, w))
        return m, m != w

    def codes(self, w, direction, ratios=None):
        up, down = direction > 0, direction < 0
        code = torch.zeros_like(w, dtype=torch.int8)
        if self.lower is not None:
            code.masked_fill_(down & (w <= self.lower), LOW)
        code.masked_fill_(up & (w >= self.upper), HIGH)
        code.masked_fill_(down & (w >= self.dual), DUAL)
        return code


def _effective_bounds(clip) -> tuple:
    """What a clip rule does, as ratio values (``None``: off), so rules of different classes compare.

    PPO-style rules ([`Clip`][rpg.clipping.Clip], [`DeltaClip`][rpg.integrations.trl.DeltaClip]):
    ``("ppo", lower for A < 0, upper for A > 0, upper for A < 0)``; [`Truncate`][rpg.clipping.Truncate]:
    ``("truncate", lower, upper)``; no clip: ``("none",)``; another rule: ``("other", rule)``."""
    if clip is None:
        return ("none",)
    if isinstance(clip, Clip):
        return (
            "ppo",
            None if clip.low is None else 1 - clip.low,
            None if clip.high is None else 1 + clip.high,
            clip.dual,
        )
    if isinstance(clip, DeltaClip):
        return ("ppo", clip.lower, clip.upper, clip.dual)
    if isinstance(clip, Truncate):
        return ("truncate", *clip.ratio_bounds())
    return ("other", clip)


def correction_from_grpo_config(args) -> RolloutCorrection | None:
    r"""The [`RolloutCorrection`][rpg.correction.RolloutCorrection] of GRPOConfig's vLLM importance-sampling settings, or ``None`` when off.

    ``use_vllm=True`` with ``vllm_importance_sampling_correction=True`` (TRL's default with vLLM):
    ``vllm_importance_sampling_mode`` ``"{level}_{mode}"`` with ``level`` token or sequence (the product
    Π_t π_old/μ over the response) and ``mode`` truncate (clip the weight to [clip_min, clip_max]) or
    mask (weight 0 outside it); ``vllm_importance_sampling_clip_min``/``_clip_max`` are the absolute
    bounds (the deprecated ``_cap`` is copied into ``clip_max`` by GRPOConfig); a ``clip_min`` ≤ 0 never
    binds. Rejected tokens stay in the denominators (``count_rejected=True``), as in TRL.
    """
    if not (args.use_vllm and args.vllm_importance_sampling_correction):
        return None
    mode = args.vllm_importance_sampling_mode
    if mode not in _IS_MODES:
        raise ValueError(
            f"unknown GRPOConfig.vllm_importance_sampling_mode {mode!r}; valid: {', '.join(map(repr, _IS_MODES))}"
        )
    level, kind = mode.split("_")
    upper, lower = args.vllm_importance_sampling_clip_max, args.vllm_importance_sampling_clip_min
    cap = getattr(args, "vllm_importance_sampling_cap", None)
    if cap is not None and cap != upper:
        raise ValueError(
            f"GRPOConfig.vllm_importance_sampling_cap={cap!r} (deprecated) disagrees with "
            f"vllm_importance_sampling_clip_max={upper!r}, which TRL applies: set only clip_max"
        )
    if upper is not None and not upper > 0:
        raise ValueError(f"GRPOConfig.vllm_importance_sampling_clip_max must be > 0, got {upper!r}")
    if lower is not None and lower <= 0:
        lower = None  # ρ ≥ 0: a bound at or below 0 never truncates or rejects anything
    return RolloutCorrection(level=level, mode=kind, lower=lower, upper=upper, count_rejected=True)


def loss_from_grpo_config(args) -> PolicyLoss:
    r"""The rpg loss that reproduces TRL's GRPO loss for a ``GRPOConfig`` (loss and gradient, same inputs).

    Per token (r = π_θ/π_old; the sequence ratio exp(mean_t log r) with
    ``importance_sampling_level="sequence"``):

    | GRPOConfig | rpg |
    |---|---|
    | ``loss_type="sapo"`` | [`SAPOLoss`][rpg.presets.SAPOLoss] (the soft gate), ``seq-mean-token-mean`` |
    | ``loss_type="vespo"`` | [`VESPOLoss`][rpg.presets.VESPOLoss] (``ratio="product"``, the Gamma kernel), token-mean |
    | ``loss_type`` grpo / bnpo / dr_grpo / dapo / luspo | PPO clip, ``agg`` seq-mean-token-mean / token-mean / seq-mean-token-sum-norm (``max_len`` = ``max_completion_length``) / token-mean / seq-mean-token-sum |
    | ``loss_type="cispo"`` | ``style="reinforce"``, ``clip=Truncate.at(None, epsilon_high)``, token-mean; a KL term separate (``separate_kl=True``, ``weight_kl=False``) |
    | ``epsilon``, ``epsilon_high`` | ``Clip(low=epsilon, high=epsilon_high)`` (``epsilon_high`` unset: ``epsilon``) |
    | ``delta`` ≥ 1+ε_high | ``Clip(..., dual=delta)`` |
    | 1 ≤ ``delta`` < 1+ε_high | ``Clip(low=ε, high=delta−1, dual=1+ε_high)`` (the same min/max algebra) |
    | ``delta`` < 1 | ``DeltaClip(1−ε, delta, 1+ε_high)`` |
    | ``beta``, ``use_bias_correction_kl`` | ``kl="urkl"`` (r·k3) or ``"k3"``, ``beta`` |
    | ``importance_sampling_level`` | ``ratio`` (cispo too: ``style="reinforce"``, ``ratio="sequence"``) |
    | vLLM correction | ``correction`` ([`correction_from_grpo_config`][rpg.integrations.trl.correction_from_grpo_config]) |

    with ``weight_kl=False`` (TRL's multipliers leave the KL term). The counts and masks
    that complete TRL's loss are passed by [`RPGGRPOTrainer`][rpg.integrations.trl.RPGGRPOTrainer]. Settings that rpg
    cannot express exactly raise ``ValueError`` with the reason (see the module docs).
    """
    return _plan(args).loss


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the trainer passes besides the per-token inputs (built once from GRPOConfig and the loss)."""

    loss: PolicyLoss
    bnpo_counts: bool  # token-mean over the local micro-batch (TRL's bnpo) instead of TRL's window count
    behavior: bool  # pass vLLM's sampling_per_token_logps as behavior_logp
    entropy_quantile: float | None  # TRL's high-entropy token mask, or None
    opsm_threshold: float | None  # TRL's off-policy sequence mask, or None
    entropy_bonus: bool  # TRL's (adaptive) entropy bonus
    sequence_from_config: bool  # TRL's sequence-level ratio: [B, T] advantages are not reproduced
    # A sequence-level policy term (differentiable style, ratio="sequence") under token-varying weights:
    # TRL multiplies the one per-sequence term by each token's weight and sums over the response, so the
    # term's gradient is spread over the response with the weights' mean. Passing every token the masked
    # mean of its response's weights (and the token-level vLLM weight folded into them) is exactly that.
    mean_weights: bool = False
    trl_metrics: tuple = ()  # how TRL's own metric names are computed: see _trl_metric_spec


def _plan(args, loss: PolicyLoss | None = None, has_rollout_logprobs: bool = False, log: bool = True) -> _Plan:
    """Map GRPOConfig (and an optional rpg loss) onto what the trainer computes; refuse what is not exact."""
    quantile = args.top_entropy_quantile if args.top_entropy_quantile < 1.0 else None
    if quantile is not None and not 0 <= quantile:
        raise ValueError(f"GRPOConfig.top_entropy_quantile must be in [0, 1], got {quantile!r}")
    opsm = args.off_policy_mask_threshold
    bonus = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    if args.importance_sampling_level not in _LEVELS:
        raise ValueError(
            f"unknown GRPOConfig.importance_sampling_level {args.importance_sampling_level!r}; "
            "valid: 'token', 'sequence'"
        )
    trl_correction = correction_from_grpo_config(args)
    unused = [f for f in _UNUSED_CLIP_FIELDS.get(args.loss_type, ()) if _changed(args, f)]
    if unused and log:
        logger.warning(
            "GRPOConfig %s set under loss_type=%r, which does not use %s (TRL's %s does not read %s); ignored",
            ", ".join(f"{f}={getattr(args, f)!r}" for f in unused),
            args.loss_type,
            "them" if len(unused) > 1 else "it",
            args.loss_type,
            ", ".join(_UNUSED_CLIP_FIELDS[args.loss_type]),
        )
    if loss is None:
        built = _build(args, trl_correction, quantile)
        sequence_pg = built.ratio == "sequence" and built.style == "differentiable"
        return _Plan(
            built,
            args.loss_type == "bnpo",
            trl_correction is not None,
            quantile,
            opsm,
            bonus,
            sequence_pg,
            mean_weights=sequence_pg,
            trl_metrics=_trl_metric_spec(args, built, from_config=True),
        )
    if not isinstance(loss, PolicyLoss):
        raise TypeError(f"loss must be an rpg loss (rpg.PolicyLoss or a preset) or None, got {type(loss).__name__}")
    _check_agreement(args, loss)
    if loss.loss_config.kl_anchor == "behavior" and loss.beta != 0 and args.beta != 0:
        raise ValueError(
            f"GRPOConfig.beta={args.beta!r} makes TRL load a reference model and pass its log-probs, but the loss's "
            "KL term is anchored on the behaviour policy (kl_anchor='behavior': vLLM's μ, or π_old), so it would "
            f"refuse them at its first call: set GRPOConfig.beta=0 (the loss keeps its own beta={loss.beta!r})"
        )
    if trl_correction is not None:
        if loss.correction is not None and loss.correction != trl_correction:
            raise ValueError(
                f"the loss's correction={loss.correction!r} disagrees with GRPOConfig's vLLM importance sampling "
                f"({args.vllm_importance_sampling_mode!r}, clip_min={args.vllm_importance_sampling_clip_min!r}, "
                f"clip_max={args.vllm_importance_sampling_clip_max!r}) = {trl_correction!r}: make them agree, or "
                "set vllm_importance_sampling_correction=False to use the loss's own"
            )
        loss = loss.replace(correction=trl_correction) if loss.correction is None else loss
        behavior = True
    elif loss.correction is not None:
        if args.use_vllm and not args.vllm_importance_sampling_correction:
            raise ValueError(
                f"the loss has correction={loss.correction!r} but GRPOConfig sets "
                "vllm_importance_sampling_correction=False: drop one of the two"
            )
        if not (args.use_vllm or has_rollout_logprobs):
            raise ValueError(
                f"the loss has correction={loss.correction!r}, which needs the rollout engine's log-probs: TRL "
                "provides them (sampling_per_token_logps) with use_vllm=True or a rollout_func that returns logprobs"
            )
        behavior = True
    else:
        behavior = False
    if behavior and not loss.correction.count_rejected:
        raise ValueError(
            "the loss's correction has count_rejected=False, which needs the count of kept tokens over the whole "
            "gradient-accumulation window; TRL's counts (num_items_in_batch, the window's rows) include every "
            "completion token, so rejected tokens would stay in the denominators: use count_rejected=True (TRL's own "
            "convention)"
        )
    if bonus and loss.entropy_coef > 0:
        raise ValueError(
            f"both GRPOConfig (entropy_coef={args.entropy_coef!r}, use_adaptive_entropy={args.use_adaptive_entropy!r}) "
            f"and the loss (entropy_coef={loss.entropy_coef!r}) set an entropy bonus: keep one"
        )
    bnpo = args.loss_type == "bnpo" and loss.agg == "token-mean"
    return _Plan(
        loss, bnpo, behavior, quantile, opsm, bonus, False, trl_metrics=_trl_metric_spec(args, loss, from_config=False)
    )


def _trl_metric_spec(args, loss: PolicyLoss, from_config: bool) -> tuple:
    """Which of TRL's loss metrics to log and how: ``("ppo", ε_low, ε_high, δ)`` (clip_ratio/*),
    ``("cispo", cap)`` (cispo_clip_ratio), ``(kind, "codes")`` (a given loss's own rule, through its clip
    codes), ``(kind, "none")`` (a given loss without a clip: nothing clipped), ``("vespo",)``
    (vespo/phi_seq_mean) or ``("unclipped",)`` (sapo: TRL logs no clip metric).

    For a loss built from GRPOConfig these are TRL's own definitions with GRPOConfig's values; a given
    loss reports its own clip rule's bounds under the names of GRPOConfig's loss_type."""
    eps_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    if args.loss_type == "sapo":
        return ("unclipped",)  # TRL logs no clip ratio for sapo (nothing is clipped)
    if args.loss_type == "vespo":
        return ("vespo",) if loss.loss_config.kernel is not None else ("unclipped",)  # vespo/phi_seq_mean
    if from_config:
        if args.loss_type == "cispo":
            return ("cispo", eps_high)
        return ("ppo", args.epsilon, eps_high, args.delta)
    kind = "cispo" if args.loss_type == "cispo" else "ppo"
    bounds = _effective_bounds(loss.clip)
    if bounds[0] == "none":
        return (kind, "none")
    if kind == "cispo" and bounds[0] == "truncate":
        return ("cispo", math.inf if bounds[2] is None else bounds[2])
    return (kind, "codes")


_SEQUENCE_URKL = (
    "importance_sampling_level='sequence' with beta != 0 and use_bias_correction_kl=True: TRL multiplies each "
    "token's k3 by the sequence ratio s = exp(mean_t log r) and differentiates s too, so every token's KL sends "
    "gradient to every token of its response. The expected gradient of that term is neither the KL's nor any "
    "per-token KL's (it follows no objective; the docs give its measured bias). Set use_bias_correction_kl=False "
    "(TRL's k3, reproduced exactly), or importance_sampling_level='token' (r·k3, the reverse-KL gradient)"
)


def _sapo_taus(args) -> tuple[float, float]:
    """SAPO's (τ_pos, τ_neg) as TRL computes with them: it picks τ with ``torch.where`` on Python floats, a
    float32 tensor, so its τ is the float32 rounding of the setting (1.05 → 1.0499999523…)."""
    pos, neg = (
        float(torch.tensor(t, dtype=torch.float32)) for t in (args.sapo_temperature_pos, args.sapo_temperature_neg)
    )
    return pos, neg


def _vespo_params(args) -> tuple[float, float, float, float]:
    """VESPO's (k_pos, λ_pos, k_neg, λ_neg) from GRPOConfig (TRL clamps λ ≥ 1e-4: so does this)."""
    return (
        float(args.vespo_k_pos),
        max(float(args.vespo_lambda_pos), 1e-4),
        float(args.vespo_k_neg),
        max(float(args.vespo_lambda_neg), 1e-4),
    )


def _build(args, correction: RolloutCorrection | None, quantile) -> PolicyLoss:
    lt = _check_loss_type(args)
    clip = _clip_from_config(args)
    sequence = args.importance_sampling_level == "sequence"
    beta = float(args.beta)
    kl = None if beta == 0 else ("urkl" if args.use_bias_correction_kl else "k3")
    if sequence and kl == "urkl":
        raise ValueError(_SEQUENCE_URKL)  # every loss_type: TRL's KL term is the same
    ratio = "sequence" if sequence else "token"
    if lt == "sapo":
        # −(4/τ)·σ(τ(r − 1))·A (r or s), τ by the sign of A; the KL term beside it, as for the PPO types.
        sapo = SAPOLoss(*_sapo_taus(args), ratio, correction=correction)
        return sapo if kl is None else sapo.replace(kl=kl, beta=beta, weight_kl=False)
    if lt == "vespo":
        # −sg(φ(W)·A)·logp, W = Π_t r_t times the token-level vLLM weights (the correction enters W, as
        # TRL's get_gamma_weights adds their logs); the KL term beside it, unweighted.
        vespo = VESPOLoss(*_vespo_params(args), correction=correction)
        if kl is None:
            return vespo
        return vespo.replace(kl=kl, beta=beta, separate_kl=True, weight_kl=False)
    if lt == "cispo":
        # −sg(min(r or s, cap))·A·logp, the KL term its own differentiable surrogate beside it
        # (separate_kl), unweighted by TRL's multipliers (weight_kl=False).
        if kl is None:
            return PolicyLoss(style="reinforce", clip=clip, agg=_AGG[lt], ratio=ratio, correction=correction)
        return PolicyLoss(
            kl=kl,
            beta=beta,
            style="reinforce",
            clip=clip,
            agg=_AGG[lt],
            ratio=ratio,
            correction=correction,
            weight_kl=False,
            separate_kl=True,
        )
    max_len = None
    if lt == "dr_grpo":
        max_len = args.max_completion_length
        if max_len is None:
            raise ValueError(
                "loss_type='dr_grpo' divides by max_completion_length: set GRPOConfig.max_completion_length"
            )
    return PolicyLoss(
        kl=kl,
        beta=beta,
        clip=clip,
        agg=_AGG[lt],
        max_len=max_len,
        ratio=ratio,
        correction=correction,
        weight_kl=False,
    )


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def _check_agreement(args, loss: PolicyLoss) -> None:
    """GRPOConfig loss fields set to non-default values must agree with the given rpg loss."""
    bad = []
    lt = args.loss_type
    if _changed(args, "loss_type"):
        if lt not in _LOSS_TYPES:
            raise ValueError(f"unknown GRPOConfig.loss_type {lt!r}; TRL's are {', '.join(map(repr, _LOSS_TYPES))}")
        if lt in _NOT_EXPRESSIBLE:
            bad.append(f"loss_type={lt!r} ({_NOT_EXPRESSIBLE[lt]})")
        elif loss.agg != _AGG[lt]:
            bad.append(f"loss_type={lt!r} (aggregation {_AGG[lt]!r}; the loss has {loss.agg!r})")
        elif lt == "dr_grpo" and loss.max_len != args.max_completion_length:
            bad.append(
                f"loss_type='dr_grpo' with max_completion_length={args.max_completion_length!r} "
                f"(the loss has max_len={loss.max_len!r})"
            )
        elif lt == "cispo" and loss.style != "reinforce":
            bad.append("loss_type='cispo' (a REINFORCE-style loss; the loss is differentiable-style)")
    if lt == "sapo" and (
        _changed(args, "loss_type") or _changed(args, "sapo_temperature_pos") or _changed(args, "sapo_temperature_neg")
    ):
        want_gate = SoftGate(args.sapo_temperature_pos, args.sapo_temperature_neg)
        if loss.clip not in (want_gate, SoftGate(*_sapo_taus(args))):  # the setting, or TRL's float32 τ
            bad.append(f"loss_type='sapo' with the gate {want_gate!r} (the loss has clip={loss.clip!r})")
    clip_fields = [f for f in ("epsilon", "epsilon_high", "delta") if _changed(args, f)]
    if lt in ("sapo", "vespo"):  # TRL's sapo and vespo read no clip field (logged as unused)
        clip_fields = []
    vespo_fields = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
    if lt == "vespo" and (_changed(args, "loss_type") or any(_changed(args, f) for f in vespo_fields)):
        want_kernel = Gamma(*_vespo_params(args))
        cfg = loss.loss_config
        if cfg.ratio != "product" or cfg.kernel != want_kernel or loss.style != "reinforce":
            bad.append(
                f"loss_type='vespo' (ratio='product' with the kernel {want_kernel!r}; the loss has "
                f"ratio={cfg.ratio!r}, kernel={cfg.kernel!r})"
            )
    if lt == "cispo":  # TRL's cispo reads epsilon_high only (epsilon and delta: logged as unused)
        clip_fields = ["epsilon_high"] if _changed(args, "loss_type") or "epsilon_high" in clip_fields else []
    if clip_fields and lt not in _NOT_EXPRESSIBLE:
        # Compare what the rules do (their bounds as ratio values), not their fields: Truncate(None, 4.0)
        # and Truncate.at(None, 5.0) are the same cap.
        want_clip = _clip_from_config(args)
        want, have = _effective_bounds(want_clip), _effective_bounds(loss.clip)
        if want[0] == "ppo" and "delta" not in clip_fields:
            want, have = want[:3], have[:3]  # GRPOConfig without delta leaves A < 0's upper bound to the loss
        ok = (
            want[0] == have[0]
            and len(want) == len(have)
            and all(_close(a, b) for a, b in zip(want[1:], have[1:], strict=True))
        )
        if not ok:
            values = ", ".join(f"{f}={getattr(args, f)!r}" for f in clip_fields)
            bad.append(f"{values} (clip {want_clip!r}; the loss has {loss.clip!r})")
    if _changed(args, "beta") and not _close(float(args.beta), loss.beta):
        bad.append(f"beta={args.beta!r} (the loss has beta={loss.beta!r})")
    if _changed(args, "use_bias_correction_kl") and args.beta != 0 and loss.kl != "k3":
        bad.append(f"use_bias_correction_kl=False (TRL's unweighted k3; the loss has kl={loss.kl!r})")
    if _changed(args, "importance_sampling_level") and loss.ratio != args.importance_sampling_level:
        bad.append(f"importance_sampling_level={args.importance_sampling_level!r} (the loss has ratio={loss.ratio!r})")
    if bad:
        raise ValueError(
            f"GRPOConfig sets loss fields that {loss!r} does not reproduce: {'; '.join(bad)}. Make them agree, or "
            "omit loss= and RPGGRPOTrainer builds the rpg loss from GRPOConfig"
        )


class RPGGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with an rpg policy loss: ``RPGGRPOTrainer(loss=rpg.RPGLoss(...), model=..., ...)``.

    ``loss=None`` builds the loss from ``args`` ([`loss_from_grpo_config`][rpg.integrations.trl.loss_from_grpo_config]), reproducing TRL's own.
    All other arguments are ``GRPOTrainer``'s. See the module docstring for what the loss
    receives, how it is normalised, and which GRPOConfig settings are refused.

    ``fused_head=True`` computes the training step's log-probs, entropies, loss and head gradients
    from the backbone's last hidden states and the LM head through
    [`FusedLinearLoss`][rpg.fused.FusedLinearLoss], without the logits (old and reference log-probs:
    [`from_hidden`][rpg.logprobs.from_hidden]); same loss and gradients, for every setting the trainer
    accepts. The head must be a linear map (``torch.nn.Linear``, tied or not, with or without a bias,
    or PEFT's ``modules_to_save`` copy of one): other heads, PEFT prompt-learning adapters, logit
    scaling/soft-capping, MoE router losses, multimodal inputs and runs on several processes are refused.
    """

    args: GRPOConfig  # Trainer annotates TrainingArguments; GRPOTrainer is given a GRPOConfig

    def __init__(self, *args, loss: PolicyLoss | None = None, fused_head: bool = False, **kwargs) -> None:
        if loss is not None and not isinstance(loss, PolicyLoss):
            raise TypeError(f"loss must be an rpg loss (rpg.PolicyLoss or a preset) or None, got {type(loss).__name__}")
        if not isinstance(fused_head, bool):
            raise TypeError(f"fused_head must be a bool, got {type(fused_head).__name__}")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # refuse before TRL loads the models (a reference model with beta != 0)
            _plan(config, loss, has_rollout_logprobs=kwargs.get("rollout_func") is not None, log=False)
        super().__init__(*args, **kwargs)
        plan = _plan(self.args, loss, has_rollout_logprobs=getattr(self, "rollout_func", None) is not None)
        self._rpg_plan = plan
        self.rpg_loss = plan.loss
        self._rpg_fused = fused_head
        self._rpg_fused_chunk_size = None  # FusedLinearLoss's default chunk
        if fused_head:
            _trl_fused.check_trainer(self)
            _trl_fused.check_model(self.model)
            if self.ref_model is not None:
                _trl_fused.check_model(self.ref_model)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if getattr(self, "_rpg_fused", False):  # old/reference log-probs through from_hidden
            return _trl_fused.per_token_logps_and_entropies(self, model, *args, **kwargs)
        return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _rpg_counts(self, inputs, mask: torch.Tensor, training: bool):
        """``(batch_num_tokens, global_batch_size)`` of this process's gradient-accumulation window."""
        steps = self.current_gradient_accumulation_steps if training else 1
        sequences = mask.size(0) * steps
        if self._rpg_plan.bnpo_counts:  # TRL's bnpo: the local micro-batch's tokens
            return torch.count_nonzero(mask).clamp(min=1).to(torch.float32) * steps, sequences
        n_items = inputs.get("num_items_in_batch")
        if n_items is None:
            return torch.count_nonzero(mask).to(torch.float32) * steps, sequences
        tokens = torch.as_tensor(n_items, dtype=torch.float32, device=mask.device).clamp(min=1.0)
        tokens = tokens / self.accelerator.num_processes
        if training:
            tokens = tokens * steps / self.args.steps_per_generation
        return tokens, sequences

    def _compute_loss(self, model, inputs):
        if getattr(self, "_rpg_fused", False):  # fused head: rpg/integrations/_trl_fused.py
            return _trl_fused.compute_loss(self, model, inputs)
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        # Entropies always, as TRL: its "entropy" metric is logged for every config.
        logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs[k] for k in _trl_step.MULTIMODAL if inputs.get(k) is not None},
        )
        step = _trl_step.prepare(self, inputs, logp.detach(), entropies.detach())
        old = logp.detach() if step.old is None else step.old
        out = self.rpg_loss(logp, old, step.advantages, step.mask, entropy=entropies, **step.loss_kwargs())
        _trl_step.log_metrics(self, step, out, logp, old, entropies, out.loss)
        loss = out.loss
        if step.bonus_coef is not None:
            count = torch.count_nonzero(step.kept)
            loss = loss - _trl_step.bonus(step.bonus_coef, entropies, step.kept, count, step.steps)
            _trl_step.entropy_controller(self, step, entropies)
        if self.aux_loss_enabled:  # MoE load balancing, scaled for accumulation as TRL does
            loss = loss + self.router_aux_loss_coef * aux_loss / step.steps
            self._metrics[step.mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss
