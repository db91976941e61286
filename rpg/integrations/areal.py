r"""An rpg loss in AReaL's actor, in place of its PPO actor loss.

AReaL's PPO actor (``areal/trainer/ppo/actor.py``, ``grpo_loss_fn``) computes each micro-batch's
policy loss with ``areal.utils.functional.ppo_actor_loss_fn(logprobs, proximal_logprobs,
old_logprobs, advantages, eps_clip, loss_mask, eps_clip_higher, c_clip, rejection_sampling,
importance_sampling_level, cu_seqlens)`` — its decoupled PPO loss, with the three policies named
differently from rpg:

| AReaL | rpg |
|---|---|
| ``logprobs`` | ``logp`` (π_θ) |
| ``proximal_logprobs`` | ``old_logp`` (π_old: the ratio and clip anchor) |
| ``old_logprobs`` (the inference engine's) | ``behavior_logp`` (μ) |
| ``eps_clip``, ``eps_clip_higher``, ``c_clip`` | ``rpg.Clip(eps_clip, eps_clip_higher or eps_clip, dual=c_clip)`` |
| ``rejection_sampling`` (``metric="ratio"``, ``level="token"``) | ``rpg.RolloutCorrection("token", "truncate"`` / ``"mask", lower, upper)`` |

AReaL has no registry for policy losses; [`actor_loss_fn`][rpg.integrations.areal.actor_loss_fn]
returns a function with ``ppo_actor_loss_fn``'s signature, so it replaces it where the actor looks
it up:

```py
import areal.trainer.ppo.actor
from rpg.integrations.areal import actor_loss_fn

areal.trainer.ppo.actor.ppo_actor_loss_fn = actor_loss_fn("urkl", style="reinforce", beta=1e-3)
```

The function reads the clip settings the actor passes (AReaL's ``actor.eps_clip`` … config) and
computes the rpg loss as a token mean over the micro-batch's ``loss_mask`` — AReaL's own reduction
(the actor then weights micro-batches by their token counts). The reference is π_ref = π_old (the
proximal policy, RPG's iterative reference). The behaviour policy enters only through
``rejection_sampling``, as in AReaL: ``action="clamp"`` is truncation of ρ = π_prox/μ to
[``lower`` (0 if unset), ``upper``], ``action="mask"`` rejects tokens outside and keeps them in the
denominator (rpg's ``count_rejected=True``, AReaL's convention). AReaL computes that weight in
float32. Sequence-level rejection (AReaL weights by the geometric mean, not rpg's product), KL
metrics for rejection, and packed 1-D inputs (``cu_seqlens``) raise ``ValueError``.

The returned ``stat`` has the keys AReaL's actor logs: ``loss`` (per token), ``importance_weight``,
``approx_kl``, ``clip_mask`` and ``dual_clip_mask`` (the PPO branch's clip by the sign of A).

Tested against the installed ``areal`` package's ``ppo_actor_loss_fn`` (``.ci/skyrl`` builds the
Python 3.12 environment it shares with SkyRL). Paper: arXiv 2505.17508.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..clipping import DUAL, HIGH, LOW, Clip
from ..correction import RolloutCorrection
from ..losses import PolicyLoss, RPGLoss
from ..objectives import DIVERGENCES

__all__ = ["actor_loss_fn", "correction_from_rejection_sampling"]


def correction_from_rejection_sampling(config) -> RolloutCorrection | None:
    """AReaL's ``RejectionSamplingConfig`` as an ``rpg.RolloutCorrection`` (``None`` for ``None``)."""
    if config is None:
        return None
    level, action, metric = config.level, config.action, config.metric
    if metric != "ratio" or level != "token":
        raise ValueError(
            f"rejection_sampling(level={level!r}, metric={metric!r}): only level='token' with metric='ratio' maps to "
            "an rpg.RolloutCorrection (AReaL's sequence level weights by the geometric mean of the ratios)"
        )
    if action == "clamp":
        lower = 0.0 if config.lower is None else config.lower
        return RolloutCorrection("token", "truncate", lower=lower or None, upper=config.upper)
    if action == "mask":
        return RolloutCorrection("token", "mask", lower=config.lower, upper=config.upper, count_rejected=True)
    raise ValueError(f"rejection_sampling.action must be 'clamp' or 'mask', got {action!r}")


def actor_loss_fn(
    divergence: str | None = "urkl", style: str = "reinforce", beta: float = 1e-4
) -> Callable[..., tuple[torch.Tensor, dict]]:
    """A drop-in for AReaL's ``ppo_actor_loss_fn`` computing ``rpg.RPGLoss(divergence, style, beta)``.

    ``divergence=None`` gives the KL-free PPO loss (``rpg.PolicyLoss``, differentiable style), AReaL's own.
    The clip comes from the call's ``eps_clip`` / ``eps_clip_higher`` / ``c_clip`` (module docs)."""
    if divergence is not None and divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES} or None, got {divergence!r}")

    def ppo_actor_loss_fn(
        logprobs: torch.Tensor,
        proximal_logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        eps_clip: float,
        loss_mask: torch.Tensor,
        eps_clip_higher: float | None = None,
        c_clip: float | None = None,
        rejection_sampling=None,
        importance_sampling_level: str = "token",
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        if cu_seqlens is not None or logprobs.dim() != 2:
            raise ValueError("the rpg AReaL loss takes padded [B, T] micro-batches (no cu_seqlens / packed 1-D input)")
        clip = Clip(eps_clip, eps_clip if eps_clip_higher is None else eps_clip_higher, dual=c_clip)
        correction = correction_from_rejection_sampling(rejection_sampling)
        ratio = {"token": "token", "sequence": "sequence"}.get(importance_sampling_level)
        if ratio is None:
            raise ValueError(
                f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}"
            )
        if divergence is None:
            loss_fn = PolicyLoss(clip=clip, ratio=ratio, correction=correction)
        else:
            loss_fn = RPGLoss(divergence, style=style, beta=beta, clip=clip, correction=correction)
            if ratio != "token":
                loss_fn = loss_fn.replace(ratio=ratio)
        mask = loss_mask.bool()
        behavior = None if correction is None else old_logprobs
        out = loss_fn(logprobs, proximal_logprobs, advantages, mask, behavior_logp=behavior)
        with torch.no_grad():
            zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
            log_w = torch.where(mask, logprobs.detach() - proximal_logprobs, zero)
            w = torch.where(mask, log_w.exp(), zero)
            adv = advantages if advantages.dim() == 2 else advantages.reshape(-1, 1).expand_as(w)
            code = clip.codes(w, adv) if ratio == "token" else None
            none = torch.zeros_like(mask)
            stat = dict(
                loss=out.per_token.detach(),
                importance_weight=w,
                approx_kl=log_w,
                clip_mask=none if code is None else ((code == LOW) | (code == HIGH)) & mask,
                dual_clip_mask=none if code is None else (code == DUAL) & mask,
            )
        return out.loss, stat

    ppo_actor_loss_fn.__qualname__ = f"rpg_areal_{divergence or 'ppo'}_{style}"
    return ppo_actor_loss_fn
