r"""[`RPGGRPOTrainer`][rpg.integrations.trl.RPGGRPOTrainer]'s micro-batch step: what the rpg loss receives, and what is logged.

One preparation and one set of metrics serve both ways the trainer computes the policy's log-probs —
from the model's logits, or with ``fused_head=True`` from the last hidden states and the LM head
(``_trl_fused``):

* ``prepare`` turns TRL's batch into the loss's inputs (a ``Step``): the mask (× ``tool_mask``), the
  old, reference and behaviour log-probs (a token vLLM could not score, NaN, gets ρ = 1), TRL's
  off-policy sequence mask and high-entropy token mask as ``weights``, the window's counts, and for a
  sequence-level term the weights' mean over each response with a token-level vLLM weight folded in.
  The two masks need the policy's log-probs and entropies before the loss: the logits path passes its
  own, the fused path those of a pass without gradient (``needs_policy_values``).
* ``bonus`` is TRL's entropy bonus c·Σ H·m′ / (max(Σ m′, 1)·GA), ``entropy_controller`` its adaptive
  coefficient.
* ``log_metrics`` logs GRPOTrainer's metric names with its reductions (``entropy``, ``kl``,
  ``clip_ratio/*``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``policy_loss``), rpg's own as
  ``rpg/<name>`` and the rollout correction's as ``rollout_corr/<name>``.

``trainer`` is the ``RPGGRPOTrainer`` (its ``_rpg_plan``, counts, accelerator and ``_metrics``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..aggregation import aggregate
from ..clipping import HIGH, LOW
from ..correction import RolloutCorrection, correction_metrics
from ..objectives import REGISTRY, Ratios
from ..sequence import correction_log_weight

# Batch keys of multimodal models, passed on to the model's forward.
MULTIMODAL = (
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


@dataclasses.dataclass
class Step:
    """The rpg loss's inputs for one micro-batch, besides the policy's ``logp`` and ``entropy`` (``[B, T]``).

    ``old`` is ``None`` on-policy (π_old = sg(π_θ): the caller passes ``logp.detach()``). ``behavior`` has
    NaN replaced (ρ = 1), and is ``None`` when its token-level weight went into ``weights`` (``folded``
    holds ``(old, behavior)`` for its ``rollout_corr/`` metrics). ``kept`` is m′, the entropy bonus's
    tokens (``mask`` × the high-entropy mask); ``bonus_coef`` TRL's coefficient for this micro-batch
    (``None``: no bonus); ``policy_scale`` turns the loss into TRL's ``policy_loss`` (before the
    accumulation scale).
    """

    mask: torch.Tensor
    advantages: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    behavior: torch.Tensor | None
    weights: torch.Tensor | None
    kept: torch.Tensor
    tokens: torch.Tensor
    sequences: int
    training: bool
    steps: int
    bonus_coef: float | None
    policy_scale: int
    folded: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def mode(self) -> str:
        return "train" if self.training else "eval"

    def loss_kwargs(self) -> dict:
        """The keyword arguments of the rpg loss (and of ``FusedLinearLoss``) besides ``entropy``."""
        return dict(
            ref_logp=self.ref,
            behavior_logp=self.behavior,
            weights=self.weights,
            batch_num_tokens=self.tokens,
            global_batch_size=self.sequences,
        )


def completion_mask(inputs) -> torch.Tensor:
    """``completion_mask`` × ``tool_mask``: the tokens the loss counts."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


def needs_policy_values(plan, inputs) -> bool:
    """Whether ``prepare`` reads the policy's log-probs or entropies:
    TRL's off-policy sequence mask, its high-entropy mask, or an on-policy batch (π_old = π_θ) with a
    rollout correction (ρ = 1 at an unscored token, and a token-level weight folded into the weights)."""
    on_policy_correction = plan.behavior and inputs.get("old_per_token_logps") is None
    return plan.opsm_threshold is not None or plan.entropy_quantile is not None or on_policy_correction


def prepare(trainer, inputs, logp: torch.Tensor | None, entropy: torch.Tensor | None) -> Step:
    """The loss's inputs from TRL's batch (see the module docstring).

    ``logp``, ``entropy``: the policy's values ``[B, T]`` without gradient, or ``None`` where
    ``needs_policy_values`` is false.
    """
    plan = trainer._rpg_plan
    mask, advantages = completion_mask(inputs), inputs["advantages"]
    if plan.sequence_from_config and advantages.dim() == 2 and advantages.size(1) > 1:
        raise ValueError(
            "per-token advantages [B, T] with importance_sampling_level='sequence': TRL differentiates the "
            "sequence ratio through every token's term, rpg's sequence ratio is GSPO-token; not reproduced"
        )
    given_old = inputs.get("old_per_token_logps")
    old = logp if given_old is None else given_old
    behavior = _behavior(plan, inputs, old)
    weights, kept = _token_masks(trainer, inputs, mask, advantages, logp, entropy, old)
    training = trainer.model.training
    steps = trainer.current_gradient_accumulation_steps if training else 1
    tokens, sequences = trainer._rpg_counts(inputs, mask, training)
    folded = None
    if plan.mean_weights and behavior is not None and old is not None and plan.loss.correction.level == "token":
        # A token-level vLLM weight on a sequence-level term: folded into the weights (averaged below).
        rho = plan.loss.correction.weight(old.detach(), behavior.detach(), mask.bool())
        weights = rho if weights is None else weights * rho
        folded, behavior = (old, behavior), None
    if plan.mean_weights and weights is not None:
        weights = _response_mean(weights, mask)
    window = plan.loss.agg == "token-mean" and not plan.bnpo_counts and inputs.get("num_items_in_batch") is not None
    return Step(
        mask=mask,
        advantages=advantages,
        old=given_old,
        ref=inputs.get("ref_per_token_logps"),
        behavior=behavior,
        weights=weights,
        kept=kept,
        tokens=tokens,
        sequences=sequences,
        training=training,
        steps=steps,
        bonus_coef=bonus_coef(trainer) if plan.entropy_bonus else None,
        policy_scale=1 if window else steps,
        folded=folded,
    )


def _behavior(plan, inputs, old) -> torch.Tensor | None:
    """vLLM's ``sampling_per_token_logps`` when the loss corrects for it, a NaN (a token vLLM could not
    score) replaced by the old log-prob: ρ = 1 there, as in TRL."""
    if not plan.behavior:
        return None
    if old is None:  # pragma: no cover - needs_policy_values asks the caller for them
        raise RuntimeError("an on-policy batch with a rollout correction needs the policy's log-probs")
    behavior = inputs.get("sampling_per_token_logps")
    if behavior is None:
        raise ValueError(
            "the loss's rollout correction needs sampling_per_token_logps, which TRL did not provide "
            "(use_vllm=True, or a rollout_func that returns logprobs)"
        )
    return torch.where(torch.isnan(behavior), old, behavior)


def _token_masks(trainer, inputs, mask, advantages, logp, entropy, old):
    """``(weights, kept)``: TRL's off-policy sequence mask × high-entropy token mask (``None``: neither),
    and the bonus's tokens m′ (``mask`` × the high-entropy mask)."""
    plan = trainer._rpg_plan
    weights = None
    if plan.opsm_threshold is not None:
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        sampling = inputs.get("sampling_per_token_logps", old)
        keep = trainer.get_off_policy_mask(adv, logp, sampling, mask, plan.opsm_threshold)
        weights = keep.to(logp.dtype).expand_as(logp)
    kept = mask.bool()
    if plan.entropy_quantile is not None:
        high = trainer.get_high_entropy_mask(entropy, mask, 1 - plan.entropy_quantile)
        kept = kept & high
        weights = high.to(entropy.dtype) if weights is None else weights * high
    return weights, kept


def _response_mean(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: every token's weight replaced by the masked mean of its response's weights."""
    m = mask.to(weights.dtype)
    mean = (weights * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return mean.expand_as(weights)


def bonus_coef(trainer) -> float:
    """TRL's entropy coefficient for this micro-batch: 0 while the adaptive controller's gate is shut (the
    previous optimizer step's world-mean entropy above ``entropy_target``; inf before the first step)."""
    if trainer.use_adaptive_entropy and not trainer._last_world_entropy <= trainer.args.entropy_target:
        return 0.0
    return trainer.entropy_coef


def bonus(coef: float, entropy: torch.Tensor, kept: torch.Tensor, count: torch.Tensor, steps: int) -> torch.Tensor:
    """TRL's bonus term c·Σ H·m′ / (max(Σ m′, 1)·GA) (subtract it): ``kept`` the m′ of the rows given,
    ``count`` Σ m′ over the whole micro-batch, ``steps`` GA; differentiable in ``entropy``."""
    return coef * aggregate(entropy, kept, "token-mean", batch_num_tokens=count.clamp(min=1) * steps)


def entropy_controller(trainer, step: Step, entropy: torch.Tensor) -> None:
    """TRL's adaptive entropy coefficient on this micro-batch's entropies (GRPOTrainer's state and update,
    so its checkpoints load), and the ``entropy_coef`` metric at each optimizer step."""
    if trainer.use_adaptive_entropy and step.training:
        kept = step.kept
        count = torch.count_nonzero(kept).to(entropy.dtype)
        zero = torch.zeros((), dtype=entropy.dtype, device=entropy.device)
        window = torch.stack([torch.where(kept, entropy.detach(), zero).sum(), count])
        stats = trainer._entropy_window_stats
        trainer._entropy_window_stats = window if stats is None else stats + window
        if trainer.accelerator.sync_gradients:  # optimizer step: world mean over the window, then move the coef
            total = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
            world = (total[0] / total[1].clamp(min=1.0)).item()
            a = trainer.args
            if world <= a.entropy_target:
                trainer.entropy_coef = min(trainer.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
            else:
                trainer.entropy_coef = max(trainer.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
            trainer._last_world_entropy = world
            trainer._entropy_window_stats = None
    if step.training and trainer.accelerator.sync_gradients:
        trainer._metrics["train"]["entropy_coef"].append(trainer.entropy_coef)


def log_metrics(trainer, step: Step, out, logp, old, entropy, policy_loss) -> None:
    """Log the micro-batch's metrics: ``out.metrics`` (the rpg loss's per-call means; TRL averages logged
    values over micro-batches) as ``rpg/<name>`` or ``rollout_corr/<name>``, GRPOTrainer's names, and
    ``policy_loss`` (the rpg loss before the entropy bonus and the accumulation scale)."""
    metrics = trainer._metrics[step.mode]
    values = dict(out.metrics)
    if step.folded is not None:  # the correction's metrics where the trainer applied its weight itself
        f_old, f_behavior = (x.detach().double() for x in step.folded)
        folded = correction_metrics(f_old, f_behavior, step.mask.bool(), trainer.rpg_loss.correction)
        values.update({name: float(value) for name, value in folded.items()})
    for name, value in _across_processes(trainer.accelerator, values, step.mask).items():
        metrics[name if name.startswith("rollout_corr/") else f"rpg/{name}"].append(value)
    with torch.no_grad():
        _trl_metrics(trainer, step, logp.detach(), old.detach(), entropy.detach())
    value = policy_loss.detach() * step.policy_scale
    metrics["policy_loss"].append(trainer.accelerator.gather(value).nanmean().item())


def _across_processes(accelerator, metrics: dict[str, float], mask: torch.Tensor) -> dict[str, float]:
    """One call's rpg metrics (per-call means) reduced over processes as TRL reduces its own.

    ``*min`` / ``*max``: the min / max over processes with tokens; the rest: the processes' values weighted
    by their token counts (Σ_p n_p·x_p / Σ_p n_p, n_p the call's ``mask`` count), the token mean over all
    processes' tokens for every token-mean metric, so a multi-process step logs what one process holding
    the same batch logs. ``ratio/ess`` is recombined from each process's Σw and Σw² (a token-weighted mean
    if a weight is infinite); the per-sequence ``rollout_corr/`` values do not add up: they are
    token-weighted means of the processes' values. One process: the values unchanged.
    """
    names = list(metrics)
    if accelerator.num_processes == 1 or not names:
        return metrics
    dtype = torch.float32 if mask.device.type == "mps" else torch.float64  # MPS has no float64
    values = torch.tensor([metrics[k] for k in names], dtype=dtype, device=mask.device)
    count = torch.count_nonzero(mask).to(dtype).reshape(1)
    rows = accelerator.gather(torch.cat([values, count]).unsqueeze(0))  # [P, K + 1]
    values, counts = rows[:, :-1], rows[:, -1:]
    weighted = (values * counts).sum(0) / counts.sum().clamp(min=1.0)
    seen = counts > 0  # a process without tokens has no min/max (its call logs 0)
    inf = torch.tensor(math.inf, dtype=values.dtype, device=values.device)
    low = torch.where(seen, values, inf).min(0).values
    high = torch.where(seen, values, -inf).max(0).values
    zero = torch.zeros_like(weighted)
    low, high = torch.where(seen.any(), low, zero), torch.where(seen.any(), high, zero)
    reduced = [
        low[i] if k.endswith("min") else high[i] if k.endswith("max") else weighted[i] for i, k in enumerate(names)
    ]
    if "ratio/ess" in names and "ratio/mean" in names:  # (Σw)² / (n·Σw²) from each process's Σw, Σw²
        i, j = names.index("ratio/ess"), names.index("ratio/mean")
        n, ess = counts[:, 0], values[:, i]
        sum_w = values[:, j] * n
        ok = (n == 0) | (torch.isfinite(sum_w) & (ess > 0))
        if seen.any() and bool(ok.all()):  # else (an infinite weight) the token-weighted mean above
            tiny = torch.finfo(dtype).tiny
            sum_w2 = torch.where(n > 0, sum_w * sum_w / (n * ess).clamp(min=tiny), 0.0)
            reduced[i] = sum_w.sum() ** 2 / (n.sum() * sum_w2.sum()).clamp(min=tiny)
    return dict(zip(names, torch.stack(reduced).tolist(), strict=True))


def _trl_metrics(trainer, step: Step, logp, old, entropy) -> None:
    """GRPOTrainer's loss metrics under its names and reductions (token-weighted means reduced over
    processes; per-sequence min/max gathered): ``entropy``, ``kl``, ``clip_ratio/*``, ``cispo_clip_ratio``
    or ``vespo/phi_seq_mean``."""
    plan, loss, mask = trainer._rpg_plan, trainer._rpg_plan.loss, step.mask
    adv = step.advantages.unsqueeze(1) if step.advantages.dim() == 1 else step.advantages
    adv = adv.to(logp.dtype)

    # TRL's reductions, dtypes included (indicators in float32, counts as mask.sum().float()), so
    # the logged numbers are TRL's to the last bit on the same inputs; tokens outside the mask are
    # dropped with torch.where (TRL's x·mask turns an infinite value there, e.g. r·k3 at a tool token
    # whose old log-prob is far below the policy's, into a NaN mean).
    def global_mean(x):  # a [B, 1] value counts once per sequence, a [B, T] one per token
        if x.size(1) == 1:
            part = torch.stack([x.sum(), torch.tensor(float(x.size(0)), device=x.device)])
        else:
            part = torch.stack([torch.where(mask.bool(), x, x.new_zeros(())).sum(), mask.sum().float()])
        total = trainer.accelerator.reduce(part, reduction="sum")
        return (total[0] / total[1].clamp(min=1.0)).item()

    def seq_mean(x):
        return x.squeeze(1) if x.size(1) == 1 else (x * mask).sum(-1) / mask.sum(-1)

    metrics = trainer._metrics[step.mode]
    metrics["entropy"].append(global_mean(entropy))
    # The KL term's anchor as the loss sees it: ref_logp, or behavior_logp for a behaviour-anchored loss
    # (kl_anchor="behavior"; π_old where the trainer passes none).
    anchor = step.behavior if loss.loss_config.kl_anchor == "behavior" else step.ref
    r = Ratios(logp, old, None if anchor is None else anchor.detach())
    if loss.kl is not None and loss.beta != 0:  # the loss's KL term, β excluded (TRL's per_token_kl)
        value = torch.zeros_like(r.log_w)
        REGISTRY[loss.kl].accumulate(value, torch.zeros_like(value), 1.0, r)
        metrics["kl"].append(global_mean(value))
    log_w = r.log_w
    if loss.ratio == "sequence":
        log_w = (log_w * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    coef = torch.exp(log_w)
    spec = plan.trl_metrics
    if spec[0] == "unclipped":
        return
    if spec[0] == "vespo":  # φ(W) per sequence, TRL's "vespo/phi_seq_mean" (one value per row)
        metrics["vespo/phi_seq_mean"].append(global_mean(_vespo_phi(loss, r, adv, mask, step.behavior)))
        return
    if spec[0] == "cispo":
        cap = math.inf if spec[1] == "none" else spec[1]
        if spec[1] == "codes":
            clipped = _codes(loss, r, adv, mask) == HIGH
        else:
            clipped = (coef > cap) & (adv > 0)
        metrics["cispo_clip_ratio"].append(global_mean(clipped.float()))
        return
    if spec[1] == "codes":
        code = _codes(loss, r, adv, mask)
        low, high = code == LOW, code == HIGH
    elif spec[1] == "none":
        low = high = torch.zeros_like(coef, dtype=torch.bool)
    else:
        eps_low, eps_high, delta = spec[1:]
        if delta is not None:  # TRL counts with min(r, δ)
            coef = torch.clamp(coef, max=delta)
        low = (coef < 1 - eps_low) & (adv < 0)
        high = (coef > 1 + eps_high) & (adv > 0)
    low, high = low.float(), high.float()
    metrics["clip_ratio/low_mean"].append(global_mean(low))
    metrics["clip_ratio/high_mean"].append(global_mean(high))
    metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
    metrics["clip_ratio/low_min"].append(_nanmin(trainer.accelerator.gather(seq_mean(low))))
    metrics["clip_ratio/high_max"].append(_nanmax(trainer.accelerator.gather(seq_mean(high))))


def _vespo_phi(loss, r, adv, mask, behavior):
    """``[B, 1]`` φ(W) of the loss's kernel, W = Π_t r_t (times the correction's weight, as the loss)."""
    cfg = loss.loss_config
    m = mask.bool()
    log_big_w = torch.where(m, r.log_w, torch.zeros((), dtype=r.log_w.dtype)).sum(-1, keepdim=True)
    if behavior is not None:
        correction = cfg.correction if cfg.correction is not None else RolloutCorrection()
        weight = correction.weight(r.old_logp, behavior.detach().to(r.old_logp.dtype), m)
        log_big_w = log_big_w + correction_log_weight(weight, m, correction.level)
    up = adv[:, :1] >= 0 if adv.size(1) > 1 else adv >= 0
    return cfg.kernel.log_phi(log_big_w, up).exp()


def _codes(loss, r, adv, mask):
    """A given loss's own clip codes (rpg's view of the ratio and the sign, A's for TOPR), for TRL's clip
    metric names: the codes of the loss's own ``clip_frac``."""
    from .._kernel import clip_codes

    return clip_codes(r, adv, mask.bool(), loss.loss_config)


def _nanmin(x: torch.Tensor) -> float:
    """min ignoring NaN (NaN if all are), as TRL's ``nanmin``."""
    x = x[~torch.isnan(x)]
    return x.min().item() if x.numel() else float("nan")


def _nanmax(x: torch.Tensor) -> float:
    """max ignoring NaN (NaN if all are), as TRL's ``nanmax``."""
    x = x[~torch.isnan(x)]
    return x.max().item() if x.numel() else float("nan")
