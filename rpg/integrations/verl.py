r"""The RPG losses inside verl, by name, through verl's own ``register_policy_loss``.

Importing this module registers fifteen policy losses:

| ``loss_mode`` | loss |
|---|---|
| ``rpg_fkl`` … ``rpg_urkl`` | ``rpg.RPGLoss(D, style="differentiable")`` — Algorithm 1 (dual clip) |
| ``rpg_rf_fkl`` … ``rpg_rf_urkl`` | ``rpg.RPGLoss(D, style="reinforce")`` — RPG-Style Clip (Algorithm 2) |
| ``rpg_dppo_tv``, ``rpg_dppo_kl`` | ``rpg.DPPOLoss(δ_low, δ_high, "tv"/"kl", cap=C)`` — verl's ``dppo_*`` |
| ``rpg_gmpo``, ``rpg_clip_cov``, ``rpg_kl_cov`` | ``rpg.GMPOLoss``, ``rpg.ClipCovLoss``, ``rpg.KLCovLoss`` — verl's ``geo_mean``, ``clip_cov``, ``kl_cov`` (see [`family_loss_from_config`][rpg.integrations.verl.family_loss_from_config]) |
| ``rpg_sapo`` | ``rpg.SAPOLoss(tau_pos, tau_neg, agg=loss_agg_mode)`` — verl's ``sapo`` |
| ``rpg_dro`` | ``rpg.DROLoss(policy_loss.dro_beta, agg=loss_agg_mode)`` — verl's ``dro`` |

``rpg_sapo`` and ``rpg_dro`` read the fields verl's ``sapo`` and ``dro`` read (``tau_pos`` /
``tau_neg``; ``policy_loss.dro_beta``) and give their loss and gradient (tested on the same
inputs); the rollout correction's ``rollout_is_weights`` multiply the whole per-token loss, as in
verl (for ``rpg_dro`` the squared penalty too). Two differences: verl's ``sapo`` always aggregates
``seq-mean-token-mean`` whatever ``loss_agg_mode`` says, ``rpg_sapo`` uses ``loss_agg_mode`` (set it
to ``seq-mean-token-mean``, SAPO's); and verl clamps log(π_θ/π_old) to ±20 before the gate (no
effect unless |log w| > 20). The penalty of ``rpg_dro`` anchors on π_old, as verl's.

**Settings.** The RPG losses read verl's ``ActorConfig``: ``clip_ratio_low`` /
``clip_ratio_high`` (falling back to ``clip_ratio``) and ``clip_ratio_c`` as
``rpg.Clip(low, high, dual)``, ``kl_loss_coef`` as β, the ``loss_agg_mode``
argument. The reference is π_old (RPG's iterative reference: no reference model
in memory). The DPPO losses read the same fields as verl's own: ``clip_ratio_low``
/ ``clip_ratio_high`` are the divergence thresholds δ_low / δ_high and
``clip_ratio_c`` the cap C of the detached weight: ``rpg.DPPOLoss(δ_low, δ_high,
divergence, cap=C)``, the REINFORCE style with ``rpg.TrustRegion`` and no KL term (verl adds
its ``use_kl_loss`` term outside the policy loss, as for its own ``dppo_*``). verl's
DPPO multiplies a masked token's loss by 0, while rpg's rule keeps its value (detached;
the gradient, 0, is the same), so the adapter passes the rule's own mask, evaluated at
the current θ, in ``weights=``: loss, gradient and metrics are then verl's ``dppo_tv`` /
``dppo_kl`` (tested on the same inputs). The only differences left: verl clamps
log(π_θ/π_old) to ±20 in the weight (so they differ where π_θ/π_old < e^−20, both
weights then below 2.1e-9) and adds 1e-8 inside the binary KL's log(1 − p) (rpg:
``log1p``, exact), which can move the ``dppo_kl`` mask only for a token within about
1e-8 of its threshold.

**Global counts.** ``global_batch_info`` (``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``, ``dp_size``) gives the global
normalisation, and the loss is multiplied by ``dp_size`` as verl's own
``agg_loss`` does, because FSDP averages gradients across ranks. With
``dp_size > 1`` and no global count for the aggregation mode (``batch_num_tokens``
for ``token-mean``, ``global_batch_size`` for the ``seq-mean-*`` modes) the call
raises ``ValueError`` with ``agg_loss``'s condition and message: a local count
times ``dp_size`` would silently scale the loss.

**Rollout correction weights.** verl's ``rollout_is_weights`` (decoupled mode of
its ``algorithm.rollout_correction``) reach the rpg loss as its ``weights=``
argument: a constant per-token multiplier of the whole per-token loss before
aggregation, never differentiated, inert at padding (the loss masks them with
``torch.where``, so NaN/inf there never reach the loss or the gradient). As in
verl's own losses, they multiply the policy loss, not the entropy bonus or a
``use_kl_loss`` term; with an RPG loss the policy loss includes rpg's KL term, so
the weights multiply it too (the KL gradient stays exact under the rollout
engine's sampling). A weight of 0 keeps the token in the denominators (verl's
IcePop convention); tokens verl *rejects* (``rollout_rs``) arrive already removed
from ``response_mask`` and from verl's global counts.

**Metrics.** ``(loss, metrics)`` carries verl's names (``actor/pg_clipfrac``,
``actor/pg_clipfrac_lower``, ``actor/ppo_kl``) and rpg's metrics under
``actor/rpg/``, all means over this call's tokens. verl averages a policy loss's
metrics over micro-batches and data-parallel ranks (``losses.py`` wraps them as
``Metric(aggregation="mean")``), so a per-call extreme would be logged as an
average of extremes: ``ratio/min`` and ``ratio/max`` are therefore left out of the
verl log. ``actor/rpg/ratio/ess`` is the effective sample size of each micro-batch's
ratios, averaged over micro-batches (not the ESS of the whole batch).
For DPPO, ``actor/pg_clipfrac`` is the fraction of masked tokens and
``actor/pg_clipfrac_lower`` the fraction of kept tokens whose weight reached C,
and ``actor/ppo_kl`` is taken of log w clamped to [−20, 20], as verl's ``dppo_*`` log them
(``rpg_sapo``'s ``ppo_kl`` too, as verl's ``sapo``; ``rpg_dro`` logs ``actor/ppo_kl`` alone,
as verl's ``dro``); for ``rpg_gmpo``, ``rpg_clip_cov`` and ``rpg_kl_cov``
they carry the definitions of verl's ``geo_mean`` (a token whose log w leaves
[−ε_low, ε_high], counted in ``pg_clipfrac`` where A > 0 and ``pg_clipfrac_lower`` where
A < 0), ``clip_cov`` (``pg_clipfrac``: the share of tokens whose gradient it dropped,
rpg's ``select_frac``) and ``kl_cov`` (``ppo_kl``: the mean |log w|, no clip fraction).

**Recipe** (the switches that matter):

```text
actor_rollout_ref.actor.policy_loss.loss_mode=rpg_rf_urkl   # or rpg_urkl, rpg_rf_rkl, ...
actor_rollout_ref.actor.kl_loss_coef=1e-4                   # β
actor_rollout_ref.actor.use_kl_loss=False                   # the KL is in the rpg loss: do not count it twice
algorithm.use_kl_in_reward=False                            # nor in the reward
actor_rollout_ref.actor.clip_ratio_low=0.2
actor_rollout_ref.actor.clip_ratio_high=0.28
actor_rollout_ref.actor.clip_ratio_c=3.0
actor_rollout_ref.actor.loss_agg_mode=token-mean
# training-inference mismatch: verl computes the weights, the rpg loss applies them
algorithm.rollout_correction.rollout_is=token               # or sequence
algorithm.rollout_correction.rollout_is_threshold=2.0
```

* Configure the mismatch correction in verl (``algorithm.rollout_correction``,
  decoupled mode, the default): verl computes ``rollout_is_weights`` and the
  rejection mask from π_old and the engine's log-probs, and the rpg loss receives
  them as ``weights=`` and ``response_mask``. Do **not** also configure an
  [`rpg.RolloutCorrection`][rpg.correction.RolloutCorrection] (the adapter never sees the engine's log-probs,
  and a second weight would correct twice).
* ``bypass_mode=True`` replaces ``policy_loss.loss_mode`` with verl's own bypass
  loss (``apply_bypass_mode``), so an rpg ``loss_mode`` is not used there. rpg's
  bypass is ``old_logp = behavior_logp`` in a loop of your own.
* ``rpg_rf_*`` (REINFORCE style) return the surrogate −sg(g)·logp, whose value is
  what verl logs as ``actor/pg_loss``: it is not comparable with the value of
  verl's vanilla PPO loss (−w·A); the gradient is what matters. ``rpg_*``
  (differentiable) log values of the form of verl's ``vanilla`` (−m·A plus β times the
  KL surrogate); ``rpg_dppo_*`` log the value verl's ``dppo_*`` do (itself a
  surrogate: −A·sg(min(w, C))·logp on the tokens the trust region keeps, 0 elsewhere).

**verl's RolloutCorrectionConfig and rpg's RolloutCorrection.** Both weight each
token's loss by a function of ρ = π_old/μ (μ the rollout engine). rpg's bounds are
plain **absolute bounds on ρ** (on Π_t ρ_t at ``level="sequence"``; on the geometric
mean or the worst token for the filters). For the same tokens and log-probs (checked
against verl 0.9.1 in ``tests/integrations/test_verl_correction.py``):

| verl | rpg ``RolloutCorrection(...)`` |
|---|---|
| ``rollout_is=token``, threshold ``U`` (TIS) | ``level="token", mode="truncate", upper=U`` |
| ``rollout_is=sequence``, ``U`` | ``level="sequence", mode="truncate", upper=U`` |
| ``rollout_is=token``, ``"L_U"`` (IcePop) | ``level="token", mode="mask", lower=L, upper=U`` |
| ``rollout_is=sequence``, ``"L_U"`` | ``level="sequence", mode="mask", lower=L, upper=U`` |
| ``rollout_rs=seq_mean_k1``, ``"L_U"`` | ``geo_lower=1/U, geo_upper=1/L`` (inverted!) |
| ``rollout_rs=seq_max_k2``, ``U`` | ``token_lower=exp(−√(2U)), token_upper=exp(√(2U))`` |
| ``rollout_rs=seq_max_k3``, ``U`` | ``token_lower=eᵃ, token_upper=eᵇ``, a < 0 < b the roots of eˣ−1−x = U |
| ``rollout_rs`` with ``rollout_is=null`` | weight 1 and the filter: ``mode="truncate", lower=1.0, upper=1.0`` |
| ``bypass_mode=True`` | ``old_logp = behavior_logp`` (ρ = 1; the ratio anchors on μ) |

IcePop zeroes weights in place, so its tokens stay in the denominators (``count_rejected=True``, rpg's
default); ``rollout_rs`` removes rejected tokens from ``response_mask`` and from the token count
(``count_rejected=False``; pass ``batch_num_tokens`` = ``keep(...).sum()``).

verl's k1 criteria compare the statistic log(μ/π_old) = −log ρ with [log L, log U],
so a k1 threshold ``"L_U"`` keeps **1/U ≤ ρ ≤ 1/L** (the geometric mean for
``seq_mean_k1``, Π_t ρ_t for ``seq_sum_k1``), not L ≤ ρ ≤ U as verl's documentation
reads; a single number U (L = 1/U) is symmetric and the two agree. rpg's bounds
mean what they say. One rpg correction has one ``count_rejected``, so IcePop together
with ``rollout_rs`` (two conventions in verl) is not one rpg correction. Also not expressible
by one rpg correction: token-level rejection (``token_k1/k2/k3``) other than with the
untruncated weight (the IcePop row), ``seq_sum_k1`` other than with the untruncated
sequence weight, ``seq_sum_k2/k3``, ``seq_mean_k2/k3`` and ``rollout_is_batch_normalize``.
verl clamps log ρ to ±20 before exponentiating (its weight is e^−20 where
ρ < e^−20); rpg does not.

verl loads this module in every process by itself: rpg declares it as a
``verl.plugins`` entry point, which ``import verl`` loads (unless
``VERL_USE_EXTERNAL_PLUGINS=none``). ``import rpg.integrations.verl`` does the
same by hand.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._util import as_int, compute_dtype
from ..clipping import Clip, TrustRegion
from ..kl import DIVERGENCES
from ..losses import PolicyLoss, RPGLoss
from ..objectives import Ratios
from ..presets import ClipCovLoss, DPPOLoss, DROLoss, GMPOLoss, KLCovLoss, SAPOLoss

try:
    from verl.trainer.ppo.core_algos import register_policy_loss
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rpg.integrations.verl needs verl: pip install 'rpg-losses[verl]' "
        "(from a clone of rpg: pip install -e '.[verl]')"
    ) from e

__all__ = [
    "LOSS_MODES",
    "DPPO_MODES",
    "TOKEN_MODES",
    "FAMILY_MODES",
    "DROPPED_METRICS",
    "loss_from_config",
    "family_loss_from_config",
]

LOSS_MODES = {f"rpg_{d}": (d, "differentiable") for d in DIVERGENCES}
LOSS_MODES.update({f"rpg_rf_{d}": (d, "reinforce") for d in DIVERGENCES})
DPPO_MODES = {"rpg_dppo_tv": "tv", "rpg_dppo_kl": "kl"}
DROPPED_METRICS = ("ratio/min", "ratio/max")  # extremes: verl would average them over micro-batches

# verl's agg_loss: the global count each mode needs when dp_size > 1, and its message.
_GLOBAL_COUNT = {
    "token-mean": ("batch_num_tokens", "(global) batch_num_tokens is required when dp_size > 1"),
    "seq-mean-token-sum": ("global_batch_size", "global_batch_size is required when dp_size > 1"),
    "seq-mean-token-sum-norm": ("global_batch_size", "global_batch_size is required when dp_size > 1"),
    "seq-mean-token-mean": ("global_batch_size", "global_batch_size is required when dp_size > 1"),
}


def _get(config, name: str, default=None):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def _thresholds(config) -> tuple[float, float]:
    clip_ratio = _get(config, "clip_ratio", 0.2)
    return _get(config, "clip_ratio_low", clip_ratio), _get(config, "clip_ratio_high", clip_ratio)


def loss_from_config(loss_mode: str, config, loss_agg_mode: str = "token-mean") -> PolicyLoss:
    """The rpg loss a verl ``ActorConfig`` (or DictConfig) asks for under ``loss_mode``.

    [`rpg.RPGLoss`][rpg.losses.RPGLoss] for the ``rpg_*`` / ``rpg_rf_*`` modes; for ``rpg_dppo_tv`` /
    ``rpg_dppo_kl``, ``rpg.DPPOLoss(δ_low, δ_high, divergence, cap=clip_ratio_c)`` — the REINFORCE
    style with an [`rpg.TrustRegion`][rpg.clipping.TrustRegion] and no KL term (C falls back to 20.0 as in verl's ``dppo_*``)."""
    if loss_mode in TOKEN_MODES:
        return TOKEN_MODES[loss_mode](config, loss_agg_mode)
    if loss_mode not in LOSS_MODES and loss_mode not in DPPO_MODES:
        valid = ", ".join([*LOSS_MODES, *DPPO_MODES, *TOKEN_MODES])
        raise ValueError(f"unknown rpg loss_mode {loss_mode!r}; valid: {valid}")
    info = _get(config, "global_batch_info", {}) or {}
    max_len = info.get("loss_scale_factor") if loss_agg_mode == "seq-mean-token-sum-norm" else None
    low, high = _thresholds(config)
    if loss_mode in DPPO_MODES:
        loss = DPPOLoss(low, high, DPPO_MODES[loss_mode], cap=_get(config, "clip_ratio_c", 20.0), agg=loss_agg_mode)
        return loss if max_len is None else loss.replace(max_len=max_len)
    divergence, style = LOSS_MODES[loss_mode]
    clip = Clip(low=low, high=high, dual=_get(config, "clip_ratio_c", 3.0))
    return RPGLoss(
        divergence,
        style=style,
        beta=float(_get(config, "kl_loss_coef", 0.0)),
        clip=clip,
        agg=loss_agg_mode,
        max_len=max_len,
    )


def _global_counts(info: dict, loss_agg_mode: str, loss_mode: str) -> tuple[int, dict]:
    """``(dp_size, counts)`` from verl's ``global_batch_info``; raises where verl's ``agg_loss`` does."""
    dp_size = info.get("dp_size")
    dp_size = 1 if dp_size is None else as_int("global_batch_info['dp_size']", dp_size)
    if dp_size < 1:
        raise ValueError(f"{loss_mode}: global_batch_info['dp_size'] must be >= 1, got {dp_size}")
    counts = dict(batch_num_tokens=info.get("batch_num_tokens"), global_batch_size=info.get("global_batch_size"))
    need = _GLOBAL_COUNT.get(loss_agg_mode)
    if dp_size > 1 and need is not None and counts[need[0]] is None:
        raise ValueError(f"{loss_mode}: {need[1]} (loss_agg_mode={loss_agg_mode!r}, dp_size={dp_size})")
    return dp_size, counts


def _verl_loss(loss_mode: str, build, prepare, describe: str, verl_metrics=None):
    """verl's policy-loss signature around an rpg loss.

    ``build(config, loss_agg_mode)`` makes the loss; ``prepare(loss_fn, info, loss_agg_mode, log_prob,
    old_log_prob, advantages, response_mask, rollout_is_weights)`` returns ``(dp_size, counts, weights,
    metrics)``: the global counts, the ``weights=`` and any verl metric the mode defines itself. The loss
    is multiplied by ``dp_size`` (verl's ``agg_loss``). Metrics are per-call means (verl averages them over
    micro-batches): verl's own ``actor/*`` names with verl's definitions for the mode —
    ``verl_metrics(loss, rpg_metrics, log_w, advantages, mask)`` where given, else ``actor/ppo_kl`` and, when the
    loss clips and ``prepare`` gave none, the clip fractions (PPO's ``pg_clipfrac`` and the dual clip's
    ``pg_clipfrac_lower``) — and rpg's own under ``actor/rpg/``.
    """

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
        loss_fn = build(config, loss_agg_mode)
        info = _get(config, "global_batch_info", {}) or {}
        mask = response_mask.bool()
        dp_size, counts, weights, metrics = prepare(
            loss_fn, info, loss_agg_mode, log_prob, old_log_prob, advantages, response_mask, rollout_is_weights
        )
        out = loss_fn(log_prob, old_log_prob, advantages, mask, weights=weights, **counts)
        m = out.metrics
        with torch.no_grad():
            log_w = torch.where(mask, log_prob.detach() - old_log_prob, torch.zeros((), dtype=log_prob.dtype))
            if verl_metrics is not None:
                metrics.update(verl_metrics(loss_fn, m, log_w, advantages, mask))
            else:
                if not metrics and "clip_frac/low" in m:
                    metrics["actor/pg_clipfrac"] = m["clip_frac/low"] + m["clip_frac/high"]
                    metrics["actor/pg_clipfrac_lower"] = m["clip_frac/dual"]
                metrics["actor/ppo_kl"] = _masked_mean(-log_w, mask)  # mean(old − new): KL(π_old‖π_θ) by k1
        metrics.update({f"actor/rpg/{k}": v for k, v in m.items() if k not in DROPPED_METRICS})
        return out.loss * dp_size, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{loss_mode}"
    policy_loss.__doc__ = f"verl policy loss '{loss_mode}': {describe} — see rpg.integrations.verl."
    return policy_loss


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return (torch.where(mask, x, torch.zeros((), dtype=x.dtype)).sum() / mask.sum().clamp_min(1)).item()


def _make(loss_mode: str):
    def prepare(loss_fn, info, loss_agg_mode, log_prob, old_log_prob, advantages, response_mask, weights):
        dp_size, counts = _global_counts(info, loss_agg_mode, loss_mode)
        metrics: dict[str, Any] = {}
        if loss_mode in DPPO_MODES:
            mask = response_mask.bool()
            weights, metrics = _dppo_mask(loss_fn.clip, log_prob, old_log_prob, advantages, mask, weights)
        return dp_size, counts, weights, metrics

    what = LOSS_MODES.get(loss_mode) or (
        f"TrustRegion({DPPO_MODES[loss_mode]!r})" if loss_mode in DPPO_MODES else loss_mode.removeprefix("rpg_")
    )
    return _verl_loss(
        loss_mode,
        lambda config, agg: loss_from_config(loss_mode, config, agg),
        prepare,
        str(what),
        _TOKEN_METRICS.get(loss_mode),
    )


def _clamped_ppo_kl(log_w: torch.Tensor, mask: torch.Tensor) -> float:
    """verl's ``ppo_kl`` for ``sapo`` and ``dppo_*``: mean(−log w) with log w clamped to [−20, 20] first."""
    return _masked_mean(-log_w.clamp(-20.0, 20.0), mask)


def _dppo_metrics(loss_fn, m, log_w, advantages, mask):
    """verl's ``dppo_*``: ``ppo_kl`` of the clamped log w (the clip fractions come from ``_dppo_mask``)."""
    return {"actor/ppo_kl": _clamped_ppo_kl(log_w, mask)}


def _sapo_metrics(loss_fn, m, log_w, advantages, mask):
    """verl's ``sapo``: ``ppo_kl`` of the clamped log w; the clip fractions are the gate's (0, as verl's)."""
    return {
        "actor/pg_clipfrac": m["clip_frac/low"] + m["clip_frac/high"],
        "actor/ppo_kl": _clamped_ppo_kl(log_w, mask),
        "actor/pg_clipfrac_lower": m["clip_frac/dual"],
    }


def _dro_metrics(loss_fn, m, log_w, advantages, mask):
    """verl's ``dro``: ``ppo_kl`` = mean(−log w) alone (it has no clip, so no clip fraction)."""
    return {"actor/ppo_kl": _masked_mean(-log_w, mask)}


_TOKEN_METRICS = {
    "rpg_dppo_tv": _dppo_metrics,
    "rpg_dppo_kl": _dppo_metrics,
    "rpg_sapo": _sapo_metrics,
    "rpg_dro": _dro_metrics,
}


def _dppo_mask(region: TrustRegion, log_prob, old_log_prob, advantages, mask, rollout_is_weights):
    """verl's DPPO multiplies a token's whole loss by its trust-region mask M, so a masked token's value
    is 0; rpg's rule keeps that value (detached). The gradient is the same (0); the mask, evaluated by the
    rule itself at the current θ and branching on sign(A) as verl does, becomes part of ``weights=``
    so that the loss value is verl's too. Also returns verl's clip fractions for DPPO."""
    with torch.no_grad():
        dtype = compute_dtype(log_prob.dtype)
        logp = log_prob.detach().to(dtype).clamp_min(torch.finfo(dtype).min)
        old = old_log_prob.detach().to(dtype)
        adv = advantages.detach().to(dtype)
        adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
        r = Ratios(logp, old)
        w = r.w
        outside = region.reinforce_clipped(w, adv.expand_as(w), r)
        zero = torch.zeros((), dtype=dtype, device=w.device)
        if rollout_is_weights is None:
            weights = (~outside).to(dtype)
        else:
            weights = torch.where(outside, zero, rollout_is_weights.detach().to(dtype))
        n = mask.sum().clamp_min(1).to(dtype)
        capped = torch.zeros_like(outside) if region.cap is None else w > region.cap
        clipfrac = torch.where(mask, outside.to(dtype), zero).sum() / n
        lower = torch.where(mask & capped & ~outside, torch.ones((), dtype=dtype, device=w.device), zero).sum() / n
        metrics = {"actor/pg_clipfrac": clipfrac.item(), "actor/pg_clipfrac_lower": lower.item()}
    return weights, metrics


for _mode in [*LOSS_MODES, *DPPO_MODES]:
    register_policy_loss(_mode)(_make(_mode))


# --- token-level families verl also ships: SAPO (``sapo``) and DRO (``dro``) ---------------------------


def _sapo(config, loss_agg_mode: str) -> PolicyLoss:
    info = _get(config, "global_batch_info", {}) or {}
    max_len = info.get("loss_scale_factor") if loss_agg_mode == "seq-mean-token-sum-norm" else None
    loss = SAPOLoss(_get(config, "tau_pos", 1.0), _get(config, "tau_neg", 1.05), agg=loss_agg_mode)
    return loss if max_len is None else loss.replace(max_len=max_len)


def _dro(config, loss_agg_mode: str) -> PolicyLoss:
    beta = _get(_get(config, "policy_loss", {}) or {}, "dro_beta")
    if beta is None:
        raise ValueError("rpg_dro: policy_loss.dro_beta must be a positive value (the squared penalty's β)")
    info = _get(config, "global_batch_info", {}) or {}
    max_len = info.get("loss_scale_factor") if loss_agg_mode == "seq-mean-token-sum-norm" else None
    loss = DROLoss(float(beta), agg=loss_agg_mode)
    return loss if max_len is None else loss.replace(max_len=max_len)


TOKEN_MODES = {"rpg_sapo": _sapo, "rpg_dro": _dro}

for _mode in TOKEN_MODES:
    register_policy_loss(_mode)(_make(_mode))


# --- GMPO, Clip-Cov and KL-Cov under their own names (verl: geo_mean, clip_cov, kl_cov) ---------------

FAMILY_MODES = {"rpg_gmpo": "geo_mean", "rpg_clip_cov": "clip_cov", "rpg_kl_cov": "kl_cov"}


def family_loss_from_config(loss_mode: str, config, loss_agg_mode: str = "token-mean") -> PolicyLoss:
    r"""The rpg loss for ``rpg_gmpo`` / ``rpg_clip_cov`` / ``rpg_kl_cov``, read from verl's ``ActorConfig``
    as verl's ``geo_mean`` / ``clip_cov`` / ``kl_cov`` read it.

    * ``rpg_gmpo``: [`rpg.GMPOLoss`][rpg.presets.GMPOLoss] with ``clip_ratio_low`` / ``clip_ratio_high``
      (falling back to ``clip_ratio``) as ε on log w; its aggregation is per sequence whatever
      ``loss_agg_mode`` says (verl's ``geo_mean`` ignores it too).
    * ``rpg_clip_cov``: [`rpg.ClipCovLoss`][rpg.presets.ClipCovLoss] with ``Clip(low, high, dual=None)`` and
      ``policy_loss.clip_cov_ratio`` / ``clip_cov_lb`` / ``clip_cov_ub`` (defaults 2e-4, 1, 5).
    * ``rpg_kl_cov``: [`rpg.KLCovLoss`][rpg.presets.KLCovLoss] with ``policy_loss.kl_cov_ratio`` /
      ``ppo_kl_coef`` (defaults 2e-4, 1).
    """
    if loss_mode not in FAMILY_MODES:
        raise ValueError(f"unknown rpg loss_mode {loss_mode!r}; valid: {', '.join(FAMILY_MODES)}")
    low, high = _thresholds(config)
    policy = _get(config, "policy_loss", {}) or {}
    if loss_mode == "rpg_gmpo":
        return GMPOLoss(low, high)
    if loss_mode == "rpg_clip_cov":
        return ClipCovLoss(
            Clip(low, high, dual=None),
            fraction=_get(policy, "clip_cov_ratio", 2e-4),
            low=_get(policy, "clip_cov_lb", 1.0),
            high=_get(policy, "clip_cov_ub", 5.0),
            agg=loss_agg_mode,
        )
    return KLCovLoss(_get(policy, "kl_cov_ratio", 2e-4), _get(policy, "ppo_kl_coef", 1.0), agg=loss_agg_mode)


def _make_family(loss_mode: str):
    def prepare(loss_fn, info, loss_agg_mode, log_prob, old_log_prob, advantages, response_mask, weights):
        if loss_mode != "rpg_gmpo":
            dp_size, counts = _global_counts(info, loss_agg_mode, loss_mode)
            return dp_size, counts, weights, {}
        # geo_mean: a mean over the call's B rows, and each row's rollout weight the geometric mean of
        # its tokens' (verl's, with its 1e-10); given global counts, rpg's global mean instead.
        dp_size, counts = _global_counts(info, "seq-mean-token-mean", loss_mode)
        if counts["global_batch_size"] is None:
            counts["global_batch_size"] = log_prob.shape[0]
        counts["batch_num_tokens"] = None
        if weights is not None:  # verl's formula: its float mask, its 1e-10 and 1e-8
            n = response_mask.sum(-1, keepdim=True)
            zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
            log_w = torch.where(response_mask.bool(), torch.log(weights.detach() + 1e-10) * response_mask, zero)
            weights = torch.exp(log_w.sum(-1, keepdim=True) / (n + 1e-8)).expand_as(weights)
        return dp_size, counts, weights, {}

    return _verl_loss(
        loss_mode,
        lambda config, agg: family_loss_from_config(loss_mode, config, agg),
        prepare,
        f"rpg's {FAMILY_MODES[loss_mode]}",
        _FAMILY_METRICS[loss_mode],
    )


def _gmpo_metrics(loss_fn, m, log_w, advantages, mask):
    """verl's ``geo_mean``: a token is clipped where log w leaves [−ε_low, ε_high] (either sign of A), counted
    in ``pg_clipfrac`` where A > 0 and in ``pg_clipfrac_lower`` where A < 0; ``ppo_kl`` = mean(−log w)."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    clip = loss_fn.clip  # Clip(1 − e^−ε_low, e^ε_high − 1): log w outside [log(1 − low), log(1 + high)]
    clipped = mask & ((log_w < math.log1p(-clip.low)) | (log_w > math.log1p(clip.high)))
    return {
        "actor/pg_clipfrac": _masked_mean((clipped & (adv > 0)).to(log_w.dtype), mask),
        "actor/ppo_kl": _masked_mean(-log_w, mask),
        "actor/pg_clipfrac_lower": _masked_mean((clipped & (adv < 0)).to(log_w.dtype), mask),
    }


def _kl_cov_metrics(loss_fn, m, log_w, advantages, mask):
    """verl's ``kl_cov``: ``ppo_kl`` is the mean |log w| (its penalty's), and no clip fraction."""
    return {"actor/ppo_kl": _masked_mean(log_w.abs(), mask)}


def _clip_cov_metrics(loss_fn, m, log_w, advantages, mask):
    """verl's ``clip_cov``: ``pg_clipfrac`` is the share of tokens whose gradient it dropped (rpg's
    ``select_frac``), not PPO's clip fraction; ``ppo_kl`` = mean(−log w)."""
    return {"actor/pg_clipfrac": m["select_frac"], "actor/ppo_kl": _masked_mean(-log_w, mask)}


_FAMILY_METRICS = {"rpg_gmpo": _gmpo_metrics, "rpg_clip_cov": _clip_cov_metrics, "rpg_kl_cov": _kl_cov_metrics}


for _mode in FAMILY_MODES:
    register_policy_loss(_mode)(_make_family(_mode))
