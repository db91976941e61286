r"""The policy loss as one pure function: [`policy_loss`][rpg.functional.policy_loss] (as ``torch.nn.functional`` beside ``torch.nn``).

Every loss class of rpg ([`PolicyLoss`][rpg.losses.PolicyLoss], [`RPGLoss`][rpg.losses.RPGLoss], the
presets) is a thin holder of a [`LossConfig`][rpg.config.LossConfig] whose call is this
function. Per token (all ``[B, T]``):

    per_token = ω·ρ̄·ℓ(logp) − c_H·H

with ℓ the configured per-token loss (its closed-form derivative computed in the
same pass), ρ̄ the rollout correction's weight (1 without ``behavior_logp``), ω
the caller's ``weights`` (1 without), H the ``entropy`` and c_H ``entropy_coef``;
all of ω, ρ̄ are constants (no gradient), and padding is 0. (With ``ratio="product"`` ρ̄ enters
the sequence ratio instead: [`rpg.sequence`][rpg.sequence].) ``loss`` aggregates
``per_token`` with the configured mode and counts.

    out = rpg.policy_loss(logp, old_logp, advantages, mask, kl="urkl", beta=1e-3, style="reinforce")
    out = rpg.policy_loss(logp, old_logp, advantages, mask, config=rpg.RPGLoss("rkl").config_object)
"""

from __future__ import annotations

import torch

from ._kernel import per_token_loss
from ._util import check_floating, compute_dtype
from .aggregation import aggregate_masked, check_count
from .config import LossConfig
from .correction import RolloutCorrection, correction_weight
from .metrics import LossOutput, MetricInputs
from .selection import penalty
from .sequence import correction_log_weight

__all__ = ["policy_loss"]


def _check_shape(name: str, x: torch.Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but logp has shape {tuple(shape)}; they must match")


def _optional_logp(name: str, x, shape) -> None:
    if x is not None:
        check_floating(name, x)
        _check_shape(name, x, shape)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    behavior_logp: torch.Tensor | None = None,
    batch_num_tokens: int | float | torch.Tensor | None = None,
    global_batch_size: int | float | torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    config: LossConfig | None = None,
    **settings,
) -> LossOutput:
    r"""Compute a KL-regularized policy-gradient loss.

    Args:
        logp: ``[B, T]`` log π_θ of the sampled tokens; the only input with gradient
            (besides ``entropy``).
        old_logp: ``[B, T]`` log π_old, the proximal policy the ratio w = π_θ/π_old and
            the clip anchor on; detached.
        advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``; detached. ``None`` means 0 (a pure
            KL objective, e.g. distillation).
        mask: ``[B, T]`` bool or 0/1; nonzero marks response tokens. ``None``: all.
        ref_logp: ``[B, T]`` log π_ref; ``None`` means π_ref = π_old (RPG's iterative
            reference). Required where β > 0 and π_ref ≠ π_old. Refused under
            ``kl_anchor="behavior"``, where the KL term's anchor is ``behavior_logp``.
        behavior_logp: ``[B, T]`` log μ of the sampled tokens under the rollout engine
            that sampled them; detached. ``None`` means μ = π_old. When given, every
            token's loss is weighted by the configured [`RolloutCorrection`][rpg.correction.RolloutCorrection]
            (``RolloutCorrection()`` if none: token-level truncation at 2).
        batch_num_tokens: token count of the full batch (``token-mean``).
        global_batch_size: sequence count of the full batch (``seq-mean-*``).
        weights: ``[B, T]`` constant per-token multipliers of the loss before
            aggregation (never receive gradient; ignored at padding, so NaN there is
            inert; a weight of 0 makes a token's loss exactly 0 but it still counts in
            the denominators — to drop a token from them, drop it from ``mask``).
        entropy: ``[B, T]`` per-token entropy, differentiable (e.g.
            ``rpg.logprobs.from_hidden(..., return_entropy=True)``); the loss subtracts
            ``entropy_coef``·agg(entropy) with the loss's own aggregation and counts,
            unweighted. Required when ``entropy_coef > 0``; reported as ``entropy/mean``.
        generator: the ``torch.Generator`` a random selection rule draws from (Clip-Cov's
            [`CovarianceDrop`][rpg.selection.CovarianceDrop]); ``None``: torch's default generator.
            Unused by every other configuration.
        config: a [`LossConfig`][rpg.config.LossConfig]; or pass its fields as keyword ``settings``.

    Returns:
        [`LossOutput`][rpg.metrics.LossOutput]. bf16/fp16 inputs are computed in float32;
        float32/float64 in their own dtype.
    """
    if config is None:
        config = LossConfig(**settings)
    elif settings:
        raise TypeError(f"pass either config= or settings, not both (got {sorted(settings)})")
    elif not isinstance(config, LossConfig):
        raise TypeError(f"config must be rpg.LossConfig, got {type(config).__name__}")

    check_floating("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    shape = logp.shape
    check_floating("old_logp", old_logp)
    _check_shape("old_logp", old_logp, shape)
    _optional_logp("ref_logp", ref_logp, shape)
    _optional_logp("behavior_logp", behavior_logp, shape)
    if advantages is None:
        advantages = torch.zeros(shape[:1], dtype=logp.dtype, device=logp.device)
    if not isinstance(advantages, torch.Tensor) or advantages.is_complex() or advantages.dtype == torch.bool:
        raise TypeError(
            f"advantages must be a real torch.Tensor, got {getattr(advantages, 'dtype', type(advantages).__name__)}"
        )
    if advantages.shape not in (shape[:1], (shape[0], 1), shape):
        raise ValueError(
            f"advantages must have shape [B] = {tuple(shape[:1])}, [B, 1] or [B, T] = {tuple(shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=logp.device)
    elif not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    else:
        _check_shape("mask", mask, shape)
        mask = mask.bool()
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.is_complex() or weights.dtype == torch.bool:
            raise TypeError(
                f"weights must be a real torch.Tensor, got {getattr(weights, 'dtype', type(weights).__name__)}"
            )
        _check_shape("weights", weights, shape)
    if entropy is not None:
        check_floating("entropy", entropy)
        _check_shape("entropy", entropy, shape)
    elif config.entropy_coef > 0:
        raise ValueError(
            f"entropy_coef={config.entropy_coef} needs the per-token entropy: pass entropy= "
            "(e.g. rpg.logprobs.from_hidden(..., return_entropy=True))"
        )
    check_count("batch_num_tokens", batch_num_tokens)
    check_count("global_batch_size", global_batch_size)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    dtype = compute_dtype(logp.dtype)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    logp = logp.to(dtype)
    old_logp = old_logp.detach().to(dtype)
    ref_logp = None if ref_logp is None else ref_logp.detach().to(dtype)
    advantages = advantages.detach().to(dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)

    scale, agg_mask, correction, seq_log_weight = None, mask, None, None
    if behavior_logp is not None:
        behavior_logp = behavior_logp.detach().to(dtype)
        correction = config.correction if config.correction is not None else RolloutCorrection()
        scale, keep, _ = correction_weight(old_logp, behavior_logp, mask, correction)
        if not correction.count_rejected:
            agg_mask = keep
        if config.ratio == "product":  # the correction enters the sequence ratio W (rpg.sequence)
            seq_log_weight = correction_log_weight(scale, mask, correction.level)
            scale = None
    if config.kl_anchor == "behavior":  # the KL term's anchor is the sampler μ (π_old when not given)
        if ref_logp is not None:
            raise ValueError(
                "this loss's KL term is anchored on the behaviour policy (kl_anchor='behavior'): it compares "
                "logp with behavior_logp (old_logp when not given), so ref_logp would be unused; drop ref_logp "
                "or use kl_anchor='ref'"
            )
        ref_logp = behavior_logp
    if weights is not None:
        w = torch.where(mask, weights.detach().to(dtype), zero)
        scale = w if scale is None else scale * w

    penalize = None
    if config.select is not None:  # Clip-Cov / KL-Cov: tokens chosen from this call's batch statistics
        drop, penalize = config.select.select(logp.detach(), old_logp, advantages, mask, config.clip, generator)
        if drop is not None:
            scale = torch.where(drop, zero, torch.ones_like(logp) if scale is None else scale)

    per_token = per_token_loss(logp, old_logp, ref_logp, advantages, mask, scale, config, seq_log_weight)
    if penalize is not None:  # KL-Cov's coef·|log w| on the selected tokens, weighted as their loss
        extra = penalty(logp, old_logp, penalize & mask, config.select.coef)
        per_token = per_token + (extra if scale is None else torch.where(penalize, extra * scale, zero))
    if agg_mask is not mask:  # rejected tokens leave the loss entirely (also an unweighted KL term)
        per_token = torch.where(agg_mask, per_token, zero)
    if entropy is not None and config.entropy_coef > 0:
        h = torch.where(agg_mask, entropy.to(dtype), zero)
        per_token = per_token - config.entropy_coef * h
    loss = aggregate_masked(
        per_token,
        agg_mask,
        config.agg,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        max_len=config.max_len,
    )
    inputs = MetricInputs(
        logp.detach(),
        old_logp,
        ref_logp,
        advantages,
        agg_mask,
        config,
        batch_num_tokens,
        behavior_logp,
        correction,
        None if entropy is None else entropy.detach(),
        mask,
    )
    return LossOutput(loss, per_token, inputs)
