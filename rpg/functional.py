r"""The policy loss as one pure function: [`policy_loss`][rpg.functional.policy_loss] (as ``torch.nn.functional`` beside ``torch.nn``).

Every loss class of rpg ([`PolicyLoss`][rpg.losses.PolicyLoss], [`RPGLoss`][rpg.losses.RPGLoss], the
presets) is a thin holder of a [`LossConfig`][rpg.config.LossConfig] whose call is this
function. Per token (all ``[B, T]``):

    per_token = ω·ρ̄·ℓ(logp) − c_H·H

with ℓ the configured per-token loss (its closed-form derivative computed in the
same pass), ρ̄ the rollout correction's weight (1 without ``behavior_logp``), ω
the caller's ``weights`` (1 without), H the ``entropy`` and c_H ``entropy_coef``;
all of ω, ρ̄ are constants (no gradient), and padding is 0. (With ``ratio="product"`` ρ̄ enters
the sequence ratio instead, and multiplies only a KL term: [`rpg.sequence`][rpg.sequence].) ``loss`` aggregates
``per_token`` with the configured mode and counts.

    out = rpg.policy_loss(logp, old_logp, advantages, mask, kl="urkl", beta=1e-3, style="reinforce")
    out = rpg.policy_loss(logp, old_logp, advantages, mask, config=rpg.RPGLoss("rkl").loss_config)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ._kernel import per_token_loss
from ._util import (
    accept_unnormalized,
    check_finite,
    check_floating,
    check_logprob,
    check_mask_values,
    compute_dtype,
)
from .aggregation import aggregate_masked, check_count
from .config import LossConfig
from .correction import RolloutCorrection, correction_weight
from .metrics import LossOutput, MetricInputs
from .selection import penalty
from .sequence import correction_log_weight

__all__ = ["policy_loss", "unnormalized_policies"]


def _check_shape(name: str, x: torch.Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        hint = ""
        if x.dim() == 2 and tuple(x.shape) == tuple(shape)[::-1]:
            hint = f" (is logp transposed? every [B, T] input must have logp's layout, {name}'s is {tuple(x.shape)})"
        raise ValueError(f"{name} has shape {tuple(x.shape)} but logp has shape {tuple(shape)}; they must match{hint}")


def _optional_logp(name: str, x, shape) -> None:
    if x is not None:
        check_floating(name, x)
        _check_shape(name, x, shape)


@contextlib.contextmanager
def unnormalized_policies() -> Iterator[None]:
    r"""Inside this block, log-prob inputs may lie above 0: log-measures of *unnormalized* policies.

    The unnormalized divergences (``ufkl``, ``urkl``: UKL(p‖q) = Σ p log(p/q) + Σ (q − p), paper §3)
    are defined for measures π(a) = exp(θ_a) whose mass is not 1, and ``rpg.testing``'s exact
    oracles with ``normalized=False`` evaluate the losses there (the mass term is what tells ``rkl``
    from ``urkl``). Outside this block a log-prob above 0 at a response token is refused as logits
    or probabilities; inside it, only NaN, +∞ and meaningless −∞ are. Not for training: a language
    model's log-probs are normalized. Thread-local; nests.

    ```python
    import torch, rpg

    theta = torch.tensor([[0.5, -0.2]], requires_grad=True)  # log-measures of the sampled tokens
    with rpg.unnormalized_policies():
        out = rpg.RPGLoss("urkl", clip=None)(theta, torch.zeros(1, 2), torch.ones(1))
    ```
    """
    with accept_unnormalized():
        yield


def check_logprobs(logp, old_logp, ref_logp, behavior_logp, mask, sequence_ratio: bool = False) -> None:
    r"""The value rules of the log-prob inputs at response tokens (``mask``, bool, or ``None``: all),
    padding never read (``logp=None``: not checked).

    | input | refused (``ValueError`` naming it) | accepted |
    |---|---|---|
    | ``logp`` | NaN; a value > 0 beyond rounding (logits or probabilities) | −∞ (a token π_θ cannot emit: every term takes its limit) |
    | ``old_logp`` | NaN, ±∞ (the tokens were sampled where π_old > 0), a value > 0 | −∞ only with ``behavior_logp`` (π_old = 0 where μ sampled: ρ = π_old/μ = 0) and a token ratio (``sequence_ratio=False``: a sequence ratio multiplies every token's π_θ/π_old, so one π_old = 0 makes it infinite) |
    | ``ref_logp`` | NaN, +∞, a value > 0 | −∞ (π_ref = 0: each KL term takes its true, often infinite, value; where ``logp`` is −∞ too, log(π_θ/π_ref) is taken as 0) |
    | ``behavior_logp`` | NaN, ±∞ (μ sampled the token, so μ > 0), a value > 0 | — |

    Inside [`unnormalized_policies`][rpg.functional.unnormalized_policies] (``rpg.unnormalized_policies()``)
    values above 0 are accepted: log-measures of unnormalized policies, as in ``rpg.testing``'s
    ``normalized=False`` oracles.

    "> 0 beyond rounding" is > 1e-4 for float32/float64 inputs and > 1e-2 for bf16/fp16. On a CPU
    the checks raise eagerly (a few passes over the inputs, no sync: the data is on the host); on an
    accelerator they are asynchronous device assertions (no host-device sync); under
    ``torch.compile`` and ``torch.func`` transforms, where no data-dependent check can run, they
    are skipped.
    """
    if logp is not None:
        check_logprob("logp", logp, mask, neg_inf=True)
    with_mu = behavior_logp is not None
    if not with_mu:
        hint = " (the tokens were sampled from π_old, so π_old > 0 there; mask such a token out)"
    elif sequence_ratio:
        hint = (
            " (the loss's sequence ratio multiplies every token's π_θ/π_old, so one π_old = 0 makes it "
            "infinite; mask such a token out)"
        )
    else:
        hint = ""
    check_logprob("old_logp", old_logp, mask, neg_inf=with_mu and not sequence_ratio, hint=hint)
    if ref_logp is not None:
        check_logprob("ref_logp", ref_logp, mask, neg_inf=True)
    if with_mu:
        check_logprob(
            "behavior_logp",
            behavior_logp,
            mask,
            neg_inf=False,
            hint=" (the rollout engine μ sampled these tokens, so μ > 0 there; mask such a token out)",
        )


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
        advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``; detached; finite at response tokens
            (NaN or ±∞ there raise ``ValueError``). ``None`` means 0 (a pure KL objective, e.g.
            distillation).
        mask: ``[B, T]`` bool or 0/1; nonzero marks response tokens. ``None``: all.
        ref_logp: ``[B, T]`` log π_ref; ``None`` means π_ref = π_old (RPG's iterative
            reference). Required where β > 0 and π_ref ≠ π_old. Refused under
            ``kl_anchor="behavior"`` with β > 0, where the KL term's anchor is ``behavior_logp``
            (with β = 0 there is no KL term: accepted and unused by the loss, as by every loss).
        behavior_logp: ``[B, T]`` log μ of the sampled tokens under the rollout engine
            that sampled them; detached. ``None`` means μ = π_old. When given, every
            token's loss is weighted by the configured [`RolloutCorrection`][rpg.correction.RolloutCorrection]
            (``RolloutCorrection()`` if none: token-level truncation at 2).
        batch_num_tokens: token count of the full batch (``token-mean``).
        global_batch_size: sequence count of the full batch (``seq-mean-*``).
        weights: ``[B, T]`` constant per-token multipliers of the loss before
            aggregation (never receive gradient; finite at response tokens, ignored at
            padding, so NaN there is inert; a weight of 0 makes a token's loss exactly 0 but it still counts in
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

    Raises:
        ValueError: naming the argument, for a shape that is not ``logp``'s (``logp`` itself is
            checked first), a non-bool ``mask`` with a value other than 0/1 (soft weights go in
            ``weights``), and the log-prob values ``check_logprobs`` refuses at response tokens:
            a value above 0 (logits or probabilities), NaN, +∞, and −∞ where it has no meaning; NaN
            or ±∞ in ``advantages`` or ``weights`` at a response token (a per-sequence advantage counts at
            its row's tokens; padding is never read). Checked as the log-probs are: eagerly on a CPU,
            as an asynchronous device assertion on an accelerator, skipped under ``torch.compile``.
        TypeError: for an input of the wrong type.
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
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        _check_shape("mask", mask, shape)
    _optional_logp("ref_logp", ref_logp, shape)
    _optional_logp("behavior_logp", behavior_logp, shape)
    check_advantages = advantages is not None  # (None: zeros, nothing to check)
    if advantages is None:
        advantages = torch.zeros(shape[:1], dtype=logp.dtype, device=logp.device)
    if not isinstance(advantages, torch.Tensor) or advantages.is_complex() or advantages.dtype == torch.bool:
        raise TypeError(
            f"advantages must be a real torch.Tensor, got {getattr(advantages, 'dtype', type(advantages).__name__)}"
        )
    if advantages.shape not in (shape[:1], (shape[0], 1), shape):
        hint = ""
        if advantages.dim() >= 1 and advantages.shape[0] == shape[1] != shape[0]:
            hint = f"; is logp transposed? logp must be [B, T] with B = len(advantages) = {advantages.shape[0]}"
        raise ValueError(
            f"advantages must have shape [B] = {tuple(shape[:1])}, [B, 1] or [B, T] = {tuple(shape)} "
            f"for logp of shape [B, T] = {tuple(shape)}, got {tuple(advantages.shape)}{hint}"
        )
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=logp.device)
    else:
        check_mask_values(mask)
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
    check_logprobs(logp, old_logp, ref_logp, behavior_logp, mask, sequence_ratio=config.ratio != "token")
    # checked as the loss reads them, in the compute dtype: a float64 1e39 is finite, its float32 cast is not
    if check_advantages:
        check_finite("advantages", advantages, mask, compute_dtype(logp.dtype))
    if weights is not None:
        check_finite("weights", weights, mask, compute_dtype(logp.dtype))
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

    scale, agg_mask, correction, seq_log_weight, kl_scale = None, mask, None, None, None
    if behavior_logp is not None:
        behavior_logp = behavior_logp.detach().to(dtype)
        correction = config.correction if config.correction is not None else RolloutCorrection()
        scale, keep, _ = correction_weight(old_logp, behavior_logp, mask, correction)
        if not correction.count_rejected:
            agg_mask = keep
        if config.ratio == "product":  # the correction enters the sequence ratio W (rpg.sequence)
            seq_log_weight = correction_log_weight(scale, agg_mask, correction.level)
            if config.has_kl and config.weight_kl:  # the per-token KL term keeps each token's weight
                kl_scale = scale
            scale = None
    if config.kl_anchor == "behavior":  # the KL term's anchor is the sampler μ (π_old when not given)
        if ref_logp is not None and config.has_kl:
            raise ValueError(
                "this loss's KL term is anchored on the behaviour policy (kl_anchor='behavior'): it compares "
                "logp with behavior_logp (old_logp when not given), so ref_logp would be unused; drop ref_logp "
                "or use kl_anchor='ref'"
            )
        if ref_logp is None:  # (β = 0: no KL term, so a ref_logp is accepted and unused, as by any loss)
            ref_logp = behavior_logp
    if weights is not None:
        w = torch.where(mask, weights.detach().to(dtype), zero)
        scale = w if scale is None else scale * w

    penalize, drop = None, None
    if config.select is not None:  # Clip-Cov / KL-Cov: tokens chosen from this call's batch statistics
        drop, penalize = config.select.select(logp.detach(), old_logp, advantages, agg_mask, config.clip, generator)
    # Clip-Cov drops the policy-gradient term of its tokens only: a KL term covers every response token
    # (verl adds its KL loss over the whole response mask, apart from the clip_cov policy loss).
    pg_keep = None if drop is None else ~drop

    # Rejected tokens that leave the mask (count_rejected=False) leave the sequence ratios and the selection's
    # statistics too: the response is the kept tokens, as in verl, whose rejection shrinks the response mask.
    per_token = per_token_loss(
        logp, old_logp, ref_logp, advantages, agg_mask, scale, config, seq_log_weight, kl_scale, pg_keep
    )
    if (
        penalize is not None and config.select is not None
    ):  # KL-Cov's coef·|log w| on the selected tokens, weighted as their loss
        extra = penalty(logp, old_logp, penalize & agg_mask, config.select.coef)
        if scale is not None:  # a weight of 0 gives exactly 0, even where the penalty is infinite
            extra = torch.where(penalize & (scale != 0), extra * scale, zero)
        per_token = per_token + extra
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
        None if config.select is None else (drop if drop is not None else penalize),
    )
    return LossOutput(loss, per_token, inputs)
