r"""The RPG losses inside verl, by name, through verl's own ``register_policy_loss``.

Importing this module registers eight policy losses:

============================  ====================================================
``loss_mode``                 loss
============================  ====================================================
``rpg_fkl`` … ``rpg_urkl``    ``rpg.RPGLoss(D, style="differentiable")`` — Algorithm 1 (dual clip)
``rpg_rf_fkl`` … ``rpg_rf_urkl``  ``rpg.RPGLoss(D, style="reinforce")`` — RPG-Style Clip (Algorithm 2)
============================  ====================================================

Each reads verl's ``ActorConfig``: ``clip_ratio_low`` / ``clip_ratio_high``
(falling back to ``clip_ratio``) and ``clip_ratio_c`` as ``rpg.Clip(low, high,
dual)``, ``kl_loss_coef`` as β, the ``loss_agg_mode`` argument, and
``global_batch_info`` (``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor``, ``dp_size``) for global normalisation — the loss is
multiplied by ``dp_size`` as verl's own ``agg_loss`` does, because FSDP averages
gradients across ranks. ``rollout_is_weights``, when given, multiply the
per-token losses before aggregation. The reference is π_old (RPG's iterative
reference: no reference model in memory). It returns ``(loss, metrics)`` with
verl's metric names (``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``,
``actor/ppo_kl``) plus every rpg metric under ``actor/rpg/``, all as local
means (verl averages policy metrics over micro-batches).

**Recipe** (the switches that matter)::

    actor_rollout_ref.actor.policy_loss.loss_mode=rpg_rf_urkl   # or rpg_urkl, rpg_rf_rkl, ...
    actor_rollout_ref.actor.kl_loss_coef=1e-4                   # β
    actor_rollout_ref.actor.use_kl_loss=False                   # the KL is in the rpg loss: do not count it twice
    algorithm.use_kl_in_reward=False                            # nor in the reward
    actor_rollout_ref.actor.clip_ratio_low=0.2
    actor_rollout_ref.actor.clip_ratio_high=0.28
    actor_rollout_ref.actor.clip_ratio_c=3.0
    actor_rollout_ref.actor.loss_agg_mode=token-mean

verl loads this module in every process by itself: rpg declares it as a
``verl.plugins`` entry point, which ``import verl`` loads (unless
``VERL_USE_EXTERNAL_PLUGINS=none``). ``import rpg.integrations.verl`` does the
same by hand.
"""

from __future__ import annotations

from typing import Any

import torch

from ..aggregation import aggregate
from ..clipping import Clip
from ..kl import DIVERGENCES
from ..losses import RPGLoss

try:
    from verl.trainer.ppo.core_algos import register_policy_loss
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("rpg.integrations.verl needs verl: pip install 'rpg-losses[verl]' "
                      "(from a clone of rpg: pip install -e '.[verl]')") from e

__all__ = ["LOSS_MODES", "loss_from_config"]

LOSS_MODES = {f"rpg_{d}": (d, "differentiable") for d in DIVERGENCES}
LOSS_MODES.update({f"rpg_rf_{d}": (d, "reinforce") for d in DIVERGENCES})


def _get(config, name: str, default=None):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def loss_from_config(loss_mode: str, config, loss_agg_mode: str = "token-mean") -> RPGLoss:
    """The :class:`rpg.RPGLoss` a verl ``ActorConfig`` (or DictConfig) asks for under ``loss_mode``."""
    divergence, style = LOSS_MODES[loss_mode]
    clip_ratio = _get(config, "clip_ratio", 0.2)
    clip = Clip(
        low=_get(config, "clip_ratio_low", clip_ratio),
        high=_get(config, "clip_ratio_high", clip_ratio),
        dual=_get(config, "clip_ratio_c", 3.0),
    )
    info = _get(config, "global_batch_info", {}) or {}
    max_len = info.get("loss_scale_factor") if loss_agg_mode == "seq-mean-token-sum-norm" else None
    return RPGLoss(divergence, style=style, beta=float(_get(config, "kl_loss_coef", 0.0)), clip=clip,
                   agg=loss_agg_mode, max_len=max_len)


def _make(loss_mode: str):
    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if config is None:
            raise ValueError(f"{loss_mode}: verl passes the ActorConfig as config=; got None")
        loss_fn = loss_from_config(loss_mode, config, loss_agg_mode)
        info = _get(config, "global_batch_info", {}) or {}
        counts = dict(batch_num_tokens=info.get("batch_num_tokens"), global_batch_size=info.get("global_batch_size"))
        mask = response_mask.bool()
        out = loss_fn(log_prob, old_log_prob, advantages, mask, **counts)
        loss = out.loss
        if rollout_is_weights is not None:
            loss = aggregate(out.per_token * rollout_is_weights.to(out.per_token.dtype), mask, loss_agg_mode,
                             max_len=loss_fn.max_len, **counts)
        loss = loss * (info.get("dp_size") or 1)
        m = out.local_metrics  # verl averages policy metrics over micro-batches itself
        with torch.no_grad():  # verl's ppo_kl: mean(old − new), KL(π_old‖π_θ), over this call's tokens
            log_w = torch.where(mask, log_prob.detach() - old_log_prob, torch.zeros((), dtype=log_prob.dtype))
            ppo_kl = (-log_w.sum() / mask.sum().clamp_min(1)).item()
        metrics = {
            "actor/pg_clipfrac": m["clip_frac/low"] + m["clip_frac/high"],
            "actor/pg_clipfrac_lower": m["clip_frac/dual"],
            "actor/ppo_kl": ppo_kl,
        }
        metrics.update({f"actor/rpg/{k}": v for k, v in m.items()})
        return loss, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{loss_mode}"
    policy_loss.__doc__ = f"verl policy loss '{loss_mode}': {LOSS_MODES[loss_mode]} — see rpg.integrations.verl."
    return policy_loss


for _mode in LOSS_MODES:
    register_policy_loss(_mode)(_make(_mode))
