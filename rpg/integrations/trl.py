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
  iterative reference).

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

**Refused, with the reason** (loss built from GRPOConfig):

| setting | why |
|---|---|
| ``loss_type="sapo"`` | a smooth sigmoid gate −A·σ(τ(r−1))·4/τ, not a clip rule of rpg |
| ``loss_type="vespo"`` | a detached per-sequence gamma weight of Σ_t log r, not a clip rule of rpg |
| ``delta < 1`` | caps positive-advantage tokens at r = δ < 1; rpg's upper clip bound is ≥ 1 |
| ``loss_type="cispo"`` with ``beta != 0`` | a REINFORCE policy term beside a differentiable KL term; an rpg loss has one style |
| ``loss_type="cispo"`` with ``importance_sampling_level="sequence"`` | rpg's sequence ratio is for the differentiable style |
| ``importance_sampling_level="sequence"`` with ``beta != 0`` and ``use_bias_correction_kl`` | TRL weights each token's KL by the sequence ratio, whose gradient reaches every token of the response |
| ``importance_sampling_level="sequence"`` with ``top_entropy_quantile < 1`` or a ``token_*`` vLLM mode | a token-varying weight on a sequence-level term: TRL spreads its sequence mean over the response, rpg weights each token's own gradient |

A Mixture-of-Experts router loss is added as TRL does, and logged as ``aux_loss``.
Every entry of ``out.local_metrics`` is logged as ``rpg/<name>`` (TRL averages
logged values over micro-batches, so they are per-call means).
"""

from __future__ import annotations

import dataclasses
import math

import torch

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rpg.integrations.trl needs TRL: pip install 'rpg-losses[trl]' (from a clone of rpg: pip install -e '.[trl]')"
    ) from e

from ..aggregation import aggregate
from ..clipping import Clip, Truncate
from ..correction import RolloutCorrection
from ..losses import PolicyLoss
from . import _trl_fused

__all__ = ["RPGGRPOTrainer", "loss_from_grpo_config", "correction_from_grpo_config"]

# TRL loss_type -> the rpg aggregation that reproduces it (with the counts the trainer passes).
_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "luspo": "seq-mean-token-sum",
}
_NOT_EXPRESSIBLE = {
    "sapo": "SAPO's per-token loss −A·σ(τ(r−1))·4/τ is a smooth sigmoid gate, not a clip rule of rpg",
    "vespo": "VESPO's detached per-sequence gamma weight φ(exp Σ_t log r) is not a clip rule of rpg",
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
        # TRL: −sg(min(r, epsilon_high))·A·logp — epsilon_high is an absolute cap, no lower bound.
        if args.delta is not None:
            raise ValueError(
                "GRPOConfig.delta applies to the PPO-clip loss types; TRL's cispo does not use it: unset it"
            )
        if args.epsilon_high is not None and _changed(args, "epsilon"):
            raise ValueError(
                "GRPOConfig.epsilon (the lower PPO clip) plays no part in TRL's cispo, which caps the weight at "
                "epsilon_high only: unset epsilon"
            )
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
    # TRL: −min(min(r, δ)·A, clip(r, 1−ε, 1+ε_high)·A).
    if delta >= 1 + eps_high and delta > 1:
        # A < 0: min(max(r, 1−ε), δ); A > 0 unchanged: the dual clip with c = δ.
        return Clip(low, eps_high, dual=delta)
    if 1 <= delta < 1 + eps_high:
        # A > 0: min(r, δ); A < 0: clip(r, 1−ε, 1+ε_high): upper bound δ, dual bound 1+ε_high.
        return Clip(low, delta - 1, dual=1 + eps_high)
    raise ValueError(
        f"GRPOConfig.delta={delta!r} caps positive-advantage tokens at r = {delta!r} < 1 (TRL's min(r, delta)), "
        "below the ratio 1 of an on-policy token; rpg.Clip's upper bound 1+epsilon_high is >= 1, so this is not "
        "expressible exactly. Use delta >= 1 (delta >= 1+epsilon_high is the dual clip)"
    )


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
    | ``loss_type`` grpo / bnpo / dr_grpo / dapo / luspo | PPO clip, ``agg`` seq-mean-token-mean / token-mean / seq-mean-token-sum-norm (``max_len`` = ``max_completion_length``) / token-mean / seq-mean-token-sum |
    | ``loss_type="cispo"`` | ``style="reinforce"``, ``clip=Truncate.at(None, epsilon_high)``, token-mean |
    | ``epsilon``, ``epsilon_high`` | ``Clip(low=epsilon, high=epsilon_high)`` (``epsilon_high`` unset: ``epsilon``) |
    | ``delta`` ≥ 1+ε_high | ``Clip(..., dual=delta)`` |
    | 1 ≤ ``delta`` < 1+ε_high | ``Clip(low=ε, high=delta−1, dual=1+ε_high)`` (the same min/max algebra) |
    | ``beta``, ``use_bias_correction_kl`` | ``kl="urkl"`` (r·k3) or ``"k3"``, ``beta`` |
    | ``importance_sampling_level`` | ``ratio`` |
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


def _plan(args, loss: PolicyLoss | None = None, has_rollout_logprobs: bool = False) -> _Plan:
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
    if loss is None:
        built = _build(args, trl_correction, quantile)
        return _Plan(
            built,
            args.loss_type == "bnpo",
            trl_correction is not None,
            quantile,
            opsm,
            bonus,
            args.importance_sampling_level == "sequence",
        )
    if not isinstance(loss, PolicyLoss):
        raise TypeError(f"loss must be an rpg loss (rpg.PolicyLoss or a preset) or None, got {type(loss).__name__}")
    _check_agreement(args, loss)
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
    return _Plan(loss, bnpo, behavior, quantile, opsm, bonus, False)


def _build(args, correction: RolloutCorrection | None, quantile) -> PolicyLoss:
    lt = _check_loss_type(args)
    clip = _clip_from_config(args)
    sequence = args.importance_sampling_level == "sequence"
    beta = float(args.beta)
    kl = None if beta == 0 else ("urkl" if args.use_bias_correction_kl else "k3")
    if sequence:
        if kl == "urkl":
            raise ValueError(
                "importance_sampling_level='sequence' with beta != 0 and use_bias_correction_kl=True: TRL weights each "
                "token's KL by the sequence ratio exp(mean_t log r), whose gradient reaches every token of the "
                "response; rpg's KL terms are per token. Set use_bias_correction_kl=False (k3, exact) or beta=0"
            )
        token_weights = [
            name
            for name, on in (
                ("top_entropy_quantile < 1", quantile is not None),
                (
                    f"vllm_importance_sampling_mode={args.vllm_importance_sampling_mode!r}",
                    correction is not None and correction.level == "token",
                ),
            )
            if on
        ]
        if token_weights:
            raise ValueError(
                f"importance_sampling_level='sequence' with {' and '.join(token_weights)}: a weight that varies over "
                "the tokens of a response multiplies TRL's sequence-level term, whose gradient TRL spreads over the "
                "response as the weight's mean; rpg weights each token's own gradient. Not exactly expressible: use "
                "importance_sampling_level='token', or a sequence_* vLLM mode"
            )
    if lt == "cispo":
        if beta != 0:
            raise ValueError(
                "loss_type='cispo' with beta != 0: TRL adds a differentiable KL term to CISPO's REINFORCE policy term, "
                "and an rpg loss has one style for both; not exactly expressible. Set beta=0"
            )
        if sequence:
            raise ValueError(
                "loss_type='cispo' with importance_sampling_level='sequence': rpg's sequence ratio applies to the "
                "differentiable style, and CISPO is REINFORCE-style; not exactly expressible"
            )
        return PolicyLoss(style="reinforce", clip=clip, agg=_AGG[lt], correction=correction)
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
        ratio="sequence" if sequence else "token",
        correction=correction,
        weight_kl=False,
    )


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def _same_clip(a, b, fields) -> bool:
    if type(a) is not type(b):
        return False
    return all(_close(getattr(a, f), getattr(b, f)) for f in fields) and getattr(a, "absolute", False) == getattr(
        b, "absolute", False
    )


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
    clip_fields = [f for f in ("epsilon", "epsilon_high", "delta") if _changed(args, f)]
    if lt == "cispo" and _changed(args, "loss_type"):
        clip_fields = clip_fields or ["epsilon_high"]
    if clip_fields and lt not in _NOT_EXPRESSIBLE:
        want = _clip_from_config(args)
        if isinstance(want, Truncate):
            ok = _same_clip(loss.clip, want, ("low", "high"))
        elif "delta" in clip_fields:
            ok = _same_clip(loss.clip, want, ("low", "high", "dual"))
        else:
            ok = _same_clip(loss.clip, want, ("low", "high"))
        if not ok:
            values = ", ".join(f"{f}={getattr(args, f)!r}" for f in clip_fields)
            bad.append(f"{values} (clip {want!r}; the loss has {loss.clip!r})")
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
    or PEFT's ``modules_to_save`` copy of one): other heads, logit scaling/soft-capping, MoE router
    losses, multimodal inputs and runs on several processes are refused.
    """

    # --- fused head (rpg/integrations/_trl_fused.py): constructor argument ---
    def __init__(self, *args, loss: PolicyLoss | None = None, fused_head: bool = False, **kwargs) -> None:
        if loss is not None and not isinstance(loss, PolicyLoss):
            raise TypeError(f"loss must be an rpg loss (rpg.PolicyLoss or a preset) or None, got {type(loss).__name__}")
        if not isinstance(fused_head, bool):
            raise TypeError(f"fused_head must be a bool, got {type(fused_head).__name__}")
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

    # --- end of the fused head's constructor hook ---

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

    def _rpg_entropy_bonus(self, entropies, kept, training: bool):
        """TRL's bonus term c·Ĥ (subtract it): Ĥ = Σ H·m′ / (max(Σ m′, 1)·GA) over this micro-batch, and the
        adaptive controller's bookkeeping (GRPOTrainer's state and update, so its checkpoints load)."""
        steps = self.current_gradient_accumulation_steps if training else 1
        count = torch.count_nonzero(kept)
        mean = aggregate(entropies, kept, "token-mean", batch_num_tokens=count.clamp(min=1) * steps)
        coef = self.entropy_coef
        if self.use_adaptive_entropy and not self._last_world_entropy <= self.args.entropy_target:
            coef = 0.0  # the gate uses the previous optimizer step's entropy (inf before the first)
        if self.use_adaptive_entropy and training:
            zero = torch.zeros((), dtype=entropies.dtype, device=entropies.device)
            window = torch.stack([torch.where(kept, entropies.detach(), zero).sum(), count.to(entropies.dtype)])
            stats = self._entropy_window_stats
            self._entropy_window_stats = window if stats is None else stats + window
            if self.accelerator.sync_gradients:  # optimizer step: world mean over the window, then move the coef
                total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world = (total[0] / total[1].clamp(min=1.0)).item()
                a = self.args
                if world <= a.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                self._last_world_entropy = world
                self._entropy_window_stats = None
        if training and self.accelerator.sync_gradients:
            self._metrics["train"]["entropy_coef"].append(self.entropy_coef)
        return coef * mean

    def _compute_loss(self, model, inputs):
        if getattr(self, "_rpg_fused", False):  # fused head: rpg/integrations/_trl_fused.py
            return _trl_fused.compute_loss(self, model, inputs)
        plan = self._rpg_plan
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        need_entropy = plan.entropy_bonus or plan.entropy_quantile is not None or plan.loss.entropy_coef > 0
        extra = (
            "pixel_values",
            "image_grid_thw",
            "num_images",
            "pixel_attention_mask",
            "spatial_shapes",
            "num_tiles",
            "image_sizes",
            "token_type_ids",
            "mm_token_type_ids",
            "image_position_ids",
        )
        logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=need_entropy,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs[k] for k in extra if inputs.get(k) is not None},
        )
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        if plan.sequence_from_config and advantages.dim() == 2 and advantages.size(1) > 1:
            raise ValueError(
                "per-token advantages [B, T] with importance_sampling_level='sequence': TRL differentiates the "
                "sequence ratio through every token's term, rpg's sequence ratio is GSPO-token; not reproduced"
            )
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        behavior = None
        if plan.behavior:
            behavior = inputs.get("sampling_per_token_logps")
            if behavior is None:
                raise ValueError(
                    "the loss's rollout correction needs sampling_per_token_logps, which TRL did not provide "
                    "(use_vllm=True, or a rollout_func that returns logprobs)"
                )
            behavior = torch.where(torch.isnan(behavior), old, behavior)  # unscored token: ρ = 1, as in TRL
        weights = None
        if plan.opsm_threshold is not None:
            adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
            sampling = inputs.get("sampling_per_token_logps", old)
            keep = self.get_off_policy_mask(adv, logp, sampling, mask, plan.opsm_threshold)
            weights = keep.to(logp.dtype).expand_as(logp)
        kept = mask.bool()
        if plan.entropy_quantile is not None:
            high = self.get_high_entropy_mask(entropies, mask, 1 - plan.entropy_quantile)
            kept = kept & high
            weights = high.to(logp.dtype) if weights is None else weights * high
        training = self.model.training
        tokens, sequences = self._rpg_counts(inputs, mask, training)
        out = self.rpg_loss(
            logp,
            old,
            advantages,
            mask,
            ref_logp=inputs.get("ref_per_token_logps"),
            behavior_logp=behavior,
            batch_num_tokens=tokens,
            global_batch_size=sequences,
            weights=weights,
            entropy=entropies,
        )
        mode = "train" if training else "eval"
        for name, value in out.local_metrics.items():  # TRL averages logged values over micro-batches
            self._metrics[mode][f"rpg/{name}"].append(value)
        loss = out.loss
        if plan.entropy_bonus:
            loss = loss - self._rpg_entropy_bonus(entropies, kept, training)
        if self.aux_loss_enabled:  # MoE load balancing, scaled for accumulation as TRL does
            steps = self.current_gradient_accumulation_steps if training else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss
