r"""The RPG losses inside SkyRL, by name, through SkyRL's own ``PolicyLossRegistry``.

Importing this module registers these policy losses (``trainer.algorithm.policy_loss_type``):

| ``policy_loss_type`` | loss |
|---|---|
| ``rpg_fkl`` … ``rpg_urkl`` | ``rpg.RPGLoss(D, style="differentiable")`` — Algorithm 1 (dual clip) |
| ``rpg_rf_fkl`` … ``rpg_rf_urkl`` | ``rpg.RPGLoss(D, style="reinforce")`` — RPG-Style Clip (Algorithm 2) |
| ``rpg_distill`` | ``rpg.OnPolicyDistillationLoss(β)`` — reverse KL to a teacher (``reference="model"``) |

and [`register`][rpg.integrations.skyrl.register] puts any other rpg loss under a name of your choice.

**Settings.** The named losses read SkyRL's ``AlgorithmConfig``: ``eps_clip_low`` /
``eps_clip_high`` and ``clip_ratio_c`` as ``rpg.Clip(low, high, dual)`` and ``kl_loss_coef`` as
β. A loss passed to ``register`` keeps its own settings (SkyRL's clip fields and
``kl_loss_coef`` are not read for it). SkyRL adds its own KL term outside the policy loss when
``use_kl_loss=True``; an rpg loss with β > 0 holds its KL term itself, so the call raises
``ValueError`` if SkyRL would add a second one (``use_kl_loss=True`` with ``kl_loss_coef > 0``).

**SkyRL's reduction.** A SkyRL policy loss returns a masked **sum**: the trainer has already
multiplied each token's advantage by the factor s_bt of ``loss_reduction`` over the mini-batch
(``apply_loss_reduction_to_advantages_minibatch``: 1/N for ``token_mean``, 1/(B·n_b) for
``sequence_mean``, 1/(B·L) for ``seq_mean_token_sum_norm``, per prompt for ``prompt_mean``), and
the worker sums micro-batch losses (times ``dp_size``, because the data-parallel all-reduce
averages gradients). The adapter therefore evaluates the rpg loss with ``agg="token-sum"`` and
``weights = loss_mask``: with β = 0 this is exactly SkyRL's convention on the advantages it is
given. A KL term must be scaled by the same s_bt as the advantages (the REINFORCE-style clip even
branches on A − β·(…), so the two must be on one scale), and SkyRL does not pass s_bt to the
loss. With β > 0 the call therefore needs ``advantage_scale`` from
[`batch_inputs`][rpg.integrations.skyrl.batch_inputs]; the loss is then evaluated on the
unscaled advantages A = A_s/s with ``weights = s·loss_mask`` — the same per-token loss times
s_bt, term by term (s > 0), so micro-batch and data-parallel sums are the mini-batch loss of
``loss_reduction`` exactly. Without it the call raises ``ValueError`` (it never drops β).

**Reference.** SkyRL's worker does not pass the reference model's log-probs
(``base_action_log_probs``) to a policy loss. The ``rpg_*`` losses use RPG's iterative reference
π_ref = π_old (no reference model); a loss registered with ``reference="model"`` (``rpg_distill``:
the teacher) reads ``ref_logp`` from [`batch_inputs`][rpg.integrations.skyrl.batch_inputs] and
raises ``ValueError`` without it.

**Behaviour policy.** ``rollout_logprobs`` (the inference engine's log-probs, μ) reach the rpg loss
as ``behavior_logp`` when a correction is configured: SkyRL's ``off_policy_correction`` with
``tis_ratio_type="token"`` / ``"sequence"`` becomes ``rpg.RolloutCorrection(level, "truncate",
upper=token_tis_ratio_clip_high / sequence_tis_ratio_clip_high)`` — the same weight, applied to the
whole per-token loss — or a loss's own ``correction=``. SkyRL's masks (``sequence_mask_metric``,
outlier and token masks) are refused with ``ValueError`` (not expressible as one rpg correction with
SkyRL's mask semantics), as is a correction configured in both places or together with
``anchor="rollout"`` (the ratio then anchors on μ already).

**Old log-probs that are the current ones.** In SkyRL's fully asynchronous trainer no π_old is
recomputed and ``old_log_probs`` can be the very tensor ``log_probs``: the ratio is then 1, the clip
never binds, and the engine's lag goes uncorrected. When ``old_log_probs`` shares storage with
``log_probs`` and ``rollout_logprobs`` is given (an off-policy setting) the call raises
``ValueError``; ``register(..., allow_old_is_current=True)`` allows it. Anchor on the engine instead
(``old_logp = behavior_logp``, a loss registered with ``anchor="rollout"``).

**Metrics.** ``clip_ratio`` (SkyRL's name: the fraction of response tokens a clip rule acted on)
and rpg's metrics under ``rpg/``, means over the call's tokens; extremes are named ``…_min`` /
``…_max`` so that SkyRL reduces them over micro-batches with min / max.

Entropy bonus: SkyRL adds its own (``use_entropy_loss``) outside the policy loss; a registered rpg
loss must have ``entropy_coef=0``.

Paper: Zhang et al., "On the Design of KL-Regularized Policy Gradient Algorithms for LLM
Reasoning", ICLR 2026 (arXiv 2505.17508).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..clipping import Clip
from ..correction import RolloutCorrection
from ..losses import PolicyLoss, RPGLoss
from ..objectives import DIVERGENCES
from ..presets import OnPolicyDistillationLoss

try:
    from skyrl.backends.skyrl_train.utils.ppo_utils import (
        PolicyLossRegistry,
        apply_loss_reduction_to_advantages_minibatch,
    )
except ImportError as e:  # pragma: no cover - exercised only without SkyRL
    raise ImportError(
        "rpg.integrations.skyrl needs SkyRL (Python >= 3.12): pip install --no-deps 'skyrl==0.4.0' "
        "plus the modules its policy-loss code imports (see the integrations page)"
    ) from e

__all__ = [
    "LOSS_TYPES",
    "BatchInputs",
    "batch_inputs",
    "advantage_scale",
    "correction_from_config",
    "loss_from_config",
    "register",
]

LOSS_TYPES = {f"rpg_{d}": (d, "differentiable") for d in DIVERGENCES}
LOSS_TYPES.update({f"rpg_rf_{d}": (d, "reinforce") for d in DIVERGENCES})
REFERENCES = ("old", "model")
ANCHORS = ("old", "rollout")


@dataclass(frozen=True)
class BatchInputs:
    """What a SkyRL policy-loss call does not receive, for the micro-batch being computed.

    Attributes:
        ref_logp: ``[B, T]`` log π_ref of the micro-batch (SkyRL's ``base_action_log_probs``), for
            losses registered with ``reference="model"``.
        advantage_scale: ``[B, T]`` (or ``[B, 1]``) factor s_bt > 0 that SkyRL's trainer folded
            into the micro-batch's advantages (see [`advantage_scale`][rpg.integrations.skyrl.advantage_scale]);
            needed when β > 0.
    """

    ref_logp: torch.Tensor | None = None
    advantage_scale: torch.Tensor | None = None


_INPUTS: contextvars.ContextVar[BatchInputs | None] = contextvars.ContextVar("rpg_skyrl_inputs", default=None)


@contextmanager
def batch_inputs(
    *, ref_logp: torch.Tensor | None = None, advantage_scale: torch.Tensor | None = None
) -> Iterator[BatchInputs]:
    """Make ``ref_logp`` and ``advantage_scale`` visible to the rpg policy losses called inside the block.

    SkyRL calls a policy loss as ``fn(log_probs, old_log_probs, advantages, config, loss_mask,
    rollout_logprobs)``; this is the hook for the two streams that call does not carry. Enter it
    around the policy-loss call of each micro-batch (e.g. in a subclass of SkyRL's policy worker,
    with ``experience.base_action_log_probs`` and the rows of
    [`advantage_scale`][rpg.integrations.skyrl.advantage_scale] for the micro-batch). The values
    are per context (``contextvars``), restored on exit.
    """
    for name, x in (("ref_logp", ref_logp), ("advantage_scale", advantage_scale)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    inputs = BatchInputs(ref_logp, advantage_scale)
    token = _INPUTS.set(inputs)
    try:
        yield inputs
    finally:
        _INPUTS.reset(token)


def advantage_scale(
    loss_mask: torch.Tensor,
    loss_reduction: str,
    micro_batch_size: int = 1,
    max_seq_len: int | None = None,
    prompt_boundaries: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """The per-token factor s_bt SkyRL's trainer multiplies a **mini-batch**'s advantages by.

    Computed by SkyRL's own ``apply_loss_reduction_to_advantages_minibatch`` on advantages of 1
    (the function is linear in the advantages, token by token), so it follows SkyRL's convention
    for every ``loss_reduction`` it has. ``loss_mask`` is the whole mini-batch's ``[B, T]`` mask;
    slice the result to each micro-batch's rows for [`batch_inputs`][rpg.integrations.skyrl.batch_inputs].
    """
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be a [B, T] tensor, got {getattr(loss_mask, 'shape', type(loss_mask))}")
    dtype = loss_mask.dtype if loss_mask.is_floating_point() else torch.float64
    ones = torch.ones(loss_mask.shape, dtype=dtype, device=loss_mask.device)
    return apply_loss_reduction_to_advantages_minibatch(
        advantages=ones,
        loss_mask=loss_mask.to(dtype),
        loss_reduction=loss_reduction,
        micro_batch_size=micro_batch_size,
        max_seq_len=max_seq_len,
        prompt_boundaries=prompt_boundaries,
    )


def _get(config, name: str, default=None):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def loss_from_config(loss_type: str, config) -> PolicyLoss:
    """The rpg loss a SkyRL ``AlgorithmConfig`` asks for under ``policy_loss_type = loss_type``.

    ``rpg_<D>`` / ``rpg_rf_<D>``: ``rpg.RPGLoss(D, style, beta=kl_loss_coef,
    clip=rpg.Clip(eps_clip_low, eps_clip_high, dual=clip_ratio_c))``; ``rpg_distill``:
    ``rpg.OnPolicyDistillationLoss(beta=kl_loss_coef)``."""
    beta = float(_get(config, "kl_loss_coef", 0.0))
    if loss_type == "rpg_distill":
        return OnPolicyDistillationLoss(beta=beta)
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"unknown rpg policy_loss_type {loss_type!r}; valid: {', '.join([*LOSS_TYPES, 'rpg_distill'])}"
        )
    divergence, style = LOSS_TYPES[loss_type]
    clip = Clip(
        low=_get(config, "eps_clip_low", 0.2),
        high=_get(config, "eps_clip_high", 0.2),
        dual=_get(config, "clip_ratio_c"),
    )
    return RPGLoss(divergence, style=style, beta=beta, clip=clip)


def correction_from_config(config) -> RolloutCorrection | None:
    """SkyRL's ``off_policy_correction`` as an ``rpg.RolloutCorrection`` (``None`` when it is off).

    ``tis_ratio_type="token"``: ``RolloutCorrection("token", "truncate", upper=token_tis_ratio_clip_high)``;
    ``"sequence"``: ``RolloutCorrection("sequence", "truncate", upper=sequence_tis_ratio_clip_high)``.
    SkyRL's masks raise ``ValueError``."""
    opc = _get(config, "off_policy_correction")
    if opc is None:
        return None
    masks = {
        "sequence_mask_metric": _get(opc, "sequence_mask_metric"),
        "outlier_token_is_threshold_low": _get(opc, "outlier_token_is_threshold_low"),
        "outlier_token_is_threshold_high": _get(opc, "outlier_token_is_threshold_high"),
        "token_mask_is_threshold_low": _get(opc, "token_mask_is_threshold_low"),
        "token_mask_is_threshold_high": _get(opc, "token_mask_is_threshold_high"),
    }
    set_masks = {k: v for k, v in masks.items() if v is not None}
    if set_masks:
        raise ValueError(
            f"off_policy_correction masks {sorted(set_masks)} are not supported with an rpg policy loss; "
            "use tis_ratio_type='token'/'sequence' or an rpg.RolloutCorrection on the loss (register(..., loss))"
        )
    tis = _get(opc, "tis_ratio_type")
    if tis is None:
        return None
    if tis == "token":
        return RolloutCorrection("token", "truncate", upper=float(_get(opc, "token_tis_ratio_clip_high")))
    if tis == "sequence":
        return RolloutCorrection("sequence", "truncate", upper=float(_get(opc, "sequence_tis_ratio_clip_high")))
    raise ValueError(f"off_policy_correction.tis_ratio_type must be None, 'token' or 'sequence', got {tis!r}")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride())


_RENAME = {"/min": "_min", "/max": "_max"}


def _skyrl_metrics(out) -> dict[str, float]:
    m = out.local_metrics
    metrics = {"clip_ratio": m.get("clip_frac", 0.0)}
    for k, v in m.items():
        for suffix, new in _RENAME.items():
            if k.endswith(suffix):
                k = k[: -len(suffix)] + new
        metrics[f"rpg/{k}"] = v
    return metrics


def _make(
    name: str,
    loss: PolicyLoss | Callable[[Any], PolicyLoss],
    reference: str,
    anchor: str,
    allow_old_is_current: bool,
):
    def policy_loss(
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        config=None,
        loss_mask: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if config is None:
            raise ValueError(f"{name}: SkyRL passes its AlgorithmConfig as config=; got None")
        loss_fn = loss if isinstance(loss, PolicyLoss) else loss(config)
        if loss_fn.entropy_coef != 0:
            raise ValueError(f"{name}: SkyRL adds the entropy bonus itself (use_entropy_loss); use entropy_coef=0")
        beta = loss_fn.beta if loss_fn.kl is not None else 0.0
        if beta > 0 and _get(config, "use_kl_loss", False) and float(_get(config, "kl_loss_coef", 0.0)) > 0:
            raise ValueError(
                f"{name}: the rpg loss holds its KL term (beta={beta}); SkyRL would add a second one: "
                "set trainer.algorithm.use_kl_loss=False (or kl_loss_coef=0 when the loss carries its own beta)"
            )
        inputs = _INPUTS.get() or BatchInputs()
        if (
            rollout_logprobs is not None
            and anchor == "old"
            and _same_storage(old_log_probs, log_probs)
            and not allow_old_is_current
        ):
            raise ValueError(
                f"{name}: old_log_probs is the tensor log_probs itself while rollout_logprobs are given "
                "(SkyRL's fully asynchronous mode): the ratio is 1 and the clip never binds. Register the loss with "
                "anchor='rollout' (old_logp = rollout_logprobs) or allow_old_is_current=True"
            )
        if anchor == "rollout":
            if rollout_logprobs is None:
                raise ValueError(f"{name}: anchor='rollout' needs rollout_logprobs (generator.sampling logprobs on)")
            old_log_probs = rollout_logprobs
        if loss_mask is None:
            loss_mask = torch.ones_like(log_probs)
        mask = loss_mask != 0

        # the behaviour policy: SkyRL's TIS config or the loss's own correction, never both
        skyrl_corr = correction_from_config(config)
        if skyrl_corr is not None and loss_fn.correction is not None:
            raise ValueError(
                f"{name}: a rollout correction is configured both in SkyRL (off_policy_correction) and on the rpg "
                "loss (correction=); keep one"
            )
        if anchor == "rollout" and (skyrl_corr or loss_fn.correction) is not None:
            raise ValueError(
                f"{name}: anchor='rollout' already anchors the ratio on the engine's log-probs; a rollout correction "
                "(off_policy_correction.tis_ratio_type or correction=) would correct for it twice"
            )
        behavior = None
        if anchor == "old" and rollout_logprobs is not None and (skyrl_corr or loss_fn.correction) is not None:
            behavior = rollout_logprobs
            if skyrl_corr is not None:
                loss_fn = loss_fn.replace(correction=skyrl_corr)
        loss_fn = loss_fn.replace(agg="token-sum")

        ref = None
        if reference == "model" and beta > 0:
            if inputs.ref_logp is None:
                raise ValueError(
                    f"{name}: reference='model' needs the reference log-probs, which SkyRL's worker does not pass to "
                    "a policy loss: enter rpg.integrations.skyrl.batch_inputs(ref_logp=...) around the call"
                )
            ref = inputs.ref_logp
        weights = loss_mask
        if beta > 0:
            scale = inputs.advantage_scale
            if scale is None:
                raise ValueError(
                    f"{name}: beta={beta} > 0 needs the factor SkyRL folded into the advantages (loss_reduction), "
                    "which a policy loss does not receive: enter rpg.integrations.skyrl.batch_inputs("
                    "advantage_scale=advantage_scale(...)) around the call, or set the KL coefficient to 0"
                )
            scale = scale.to(log_probs.device).expand_as(log_probs)
            if bool(((scale <= 0) & mask).any()):
                raise ValueError(f"{name}: advantage_scale must be > 0 at every response token")
            adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1).expand_as(log_probs)
            one = torch.ones((), dtype=scale.dtype, device=scale.device)
            advantages = adv / torch.where(mask, scale, one)
            weights = loss_mask * scale
        out = loss_fn(log_probs, old_log_probs, advantages, mask, ref_logp=ref, behavior_logp=behavior, weights=weights)
        return out.loss, _skyrl_metrics(out)

    policy_loss.__name__ = policy_loss.__qualname__ = f"rpg_skyrl_{name}"
    policy_loss.__doc__ = f"SkyRL policy loss {name!r} (rpg): see rpg.integrations.skyrl."
    return policy_loss


def register(
    name: str,
    loss: PolicyLoss | Callable[[Any], PolicyLoss],
    *,
    reference: str = "old",
    anchor: str = "old",
    allow_old_is_current: bool = False,
    replace: bool = False,
) -> Callable:
    """Register an rpg loss in SkyRL's ``PolicyLossRegistry`` under ``name``; returns the SkyRL function.

    Args:
        name: the ``trainer.algorithm.policy_loss_type`` that selects it.
        loss: an rpg loss ([`PolicyLoss`][rpg.losses.PolicyLoss] or a preset), used with its own settings
            (``agg`` is replaced by SkyRL's folded reduction), or a function of SkyRL's ``AlgorithmConfig``
            returning one (built at each call).
        reference: ``"old"`` — π_ref = π_old (RPG's iterative reference; no reference model);
            ``"model"`` — ``ref_logp`` from [`batch_inputs`][rpg.integrations.skyrl.batch_inputs] (required when β > 0).
        anchor: ``"old"`` — the ratio anchors on SkyRL's ``old_log_probs``; ``"rollout"`` — on
            ``rollout_logprobs`` (bypass: ``old_logp = behavior_logp``, no correction weight).
        allow_old_is_current: allow ``old_log_probs`` to be the tensor ``log_probs`` while
            ``rollout_logprobs`` are given (else ``ValueError``).
        replace: replace a loss already registered under ``name`` (else SkyRL raises ``ValueError``).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not isinstance(loss, PolicyLoss) and not callable(loss):
        raise TypeError(f"loss must be an rpg PolicyLoss or a function of SkyRL's config, got {type(loss).__name__}")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    if isinstance(loss, PolicyLoss) and loss.entropy_coef != 0:
        raise ValueError("SkyRL adds the entropy bonus itself (use_entropy_loss): register a loss with entropy_coef=0")
    fn = _make(name, loss, reference, anchor, bool(allow_old_is_current))
    if replace and name in PolicyLossRegistry.list_available():
        PolicyLossRegistry.unregister(name)
    PolicyLossRegistry.register(name, fn)
    return fn


def _register_named() -> None:
    available = set(PolicyLossRegistry.list_available())
    for loss_type in LOSS_TYPES:
        if loss_type not in available:
            register(loss_type, functools.partial(loss_from_config, loss_type))
    if "rpg_distill" not in available:
        register("rpg_distill", lambda cfg: loss_from_config("rpg_distill", cfg), reference="model")


_register_named()
