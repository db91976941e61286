r"""The behaviour policy μ of the rollout engine, and the correction of its mismatch with π_old.

In production the tokens are sampled by an inference engine (vLLM, SGLang) whose
distribution μ differs from the trainer's recomputed π_old: other kernels and
precision, top-k / top-p, stale weights in asynchronous RL. Four policies play a
part in one update:

| policy | role | input |
|---|---|---|
| μ (behaviour) | sampled the tokens | ``behavior_logp`` |
| π_old (proximal) | anchors the ratio w = π_θ/π_old and the clip | ``old_logp`` |
| π_ref (reference) | the KL target | ``ref_logp`` |
| π_θ (current) | is trained | ``logp`` |

Per token, ρ_t = π_old/μ = exp(old_logp − behavior_logp), a constant. Every loss
of rpg satisfies E_{π_old}[∇ℓ_t] = −∇J_t per token given its prefix, so the
weighted loss ℓ′_t = sg(ρ_t)·ℓ_t has E_μ[∇ℓ′_t] = E_{π_old}[∇ℓ_t]: **the token
weight is exact at the token level**. For an objective on whole responses (an
outcome reward), the prefix is drawn from μ too, and only the product over the
response, ρ_seq = Π_t ρ_t, is exact (``level="sequence"``); the token weight is
biased there. Truncating (min(ρ, upper)), masking (ρ outside [lower, upper] → 0)
and the sequence filters trade that exactness for variance; their bias is
measured with the oracle of [`rpg.testing`][rpg.testing] (docs: "Training–inference
mismatch").

The weight multiplies the whole per-token loss — policy-gradient and KL term —
as a constant before aggregation, and never receives gradient. ``behavior_logp``
of ``None`` means μ = π_old (ρ = 1): every loss is then exactly what it was
without it. *Bypass mode* (no recompute of π_old by the trainer) is
``old_logp = behavior_logp``: ρ = 1 and the ratio and clip anchor on μ itself.

Paper: the framework is Zhang et al., ICLR 2026 (arXiv 2505.17508); truncated
importance sampling for rollout mismatch follows Yao et al., "Your efficient RL
framework secretly brings you off-policy RL training" (2025), and the
geometric-mean filter IcePop / verl's ``seq_mean`` rejection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._util import check_bound as _check_bound
from ._util import check_choice

__all__ = ["RolloutCorrection", "LEVELS", "MODES", "correction_weight", "correction_metrics", "m2_rejected"]

LEVELS = ("token", "sequence")
MODES = ("truncate", "mask")
_INF = float("inf")


def _pair(cls: str, lo_name: str, hi_name: str, lo, hi):
    lo = _check_bound(f"{cls}.{lo_name}", lo, lambda v: 0 <= v < _INF, f"0 <= {lo_name} < inf")
    hi = _check_bound(f"{cls}.{hi_name}", hi, lambda v: 0 < v < _INF, f"0 < {hi_name} < inf")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{cls}.{lo_name} = {lo} must be <= {cls}.{hi_name} = {hi}")
    return lo, hi


@dataclass(frozen=True)
class RolloutCorrection:
    r"""How a loss corrects for the behaviour policy μ ≠ π_old: a constant weight per token.

    ρ_t = π_old/μ = exp(old_logp − behavior_logp). The weight multiplies each
    token's whole loss before aggregation, never receives gradient, and is 1
    when the call has no ``behavior_logp``.

    Args:
        level: ``"token"`` — weight ρ_t (exact per token); ``"sequence"`` — weight
            ρ_seq = Π_t ρ_t over the response's tokens at every one of them
            (exact for an outcome reward on whole responses).
        mode: ``"truncate"`` — weight clip(ρ, lower, upper) (TIS); ``"mask"`` —
            weight ρ where lower ≤ ρ ≤ upper, else the token (sequence level: the
            whole sequence) is rejected with weight 0 (MIS).
        lower: the **absolute** lower bound on ρ (not an ε offset as in
            [`Clip`][rpg.clipping.Clip]); ``None`` turns it off.
        upper: the absolute upper bound on ρ; ``None`` turns it off. ``upper=None,
            lower=None`` is the untruncated, exact weight. Default: token-level
            truncation at 2.0.
        geo_lower: lower bound of a sequence filter on the geometric mean of ρ over the
            response, exp(mean_t log ρ_t) (length-normalised; IcePop / verl's
            ``seq_mean`` criteria): a sequence outside the band is rejected.
        geo_upper: its upper bound.
        token_lower: lower bound of a sequence filter on the worst token: a sequence
            with any token whose ρ_t is outside the band is rejected.
        token_upper: its upper bound.
        count_rejected: whether rejected tokens still count in the aggregation's
            denominators (``True``, the default: the correction is purely a weight,
            so micro-batch invariance holds with global counts; AReaL's and TRL's
            convention) or leave them (``False``: the mask shrinks; verl's and
            slime's convention — pass global counts computed after rejection, see
            [`keep`][rpg.correction.RolloutCorrection.keep]).
        m2_upper: τ > 0 of M2PO's second-moment filter (Zheng et al., arXiv 2510.01161; AReaL's
            ``m2_threshold``), or ``None``. Over the call's response tokens, the tokens with the
            largest (log ρ_t)² = (log π_old − log μ)² are rejected, largest first, until the mean of
            (log ρ)² over the tokens kept is below τ (strictly, as AReaL; if no such set exists only
            the token of smallest (log ρ)² is kept). A batch statistic: each call (micro-batch)
            filters its own tokens, as AReaL does, so shards do not add up to the full batch's
            filter. AReaL removes the rejected tokens from its loss mask: ``count_rejected=False``.
            Combine with any weight (``mode``); M2PO alone is ``mode="truncate", lower=1.0,
            upper=1.0`` (weight 1).

    With ``behavior_logp`` given and no ``correction=`` on the loss, the loss uses
    ``RolloutCorrection()``. Invalid settings raise ``ValueError`` / ``TypeError``.
    """

    level: str = "token"
    mode: str = "truncate"
    lower: float | None = None
    upper: float | None = 2.0
    geo_lower: float | None = None
    geo_upper: float | None = None
    token_lower: float | None = None
    token_upper: float | None = None
    count_rejected: bool = True
    m2_upper: float | None = None

    def __post_init__(self) -> None:
        check_choice("RolloutCorrection.level", self.level, LEVELS)
        check_choice("RolloutCorrection.mode", self.mode, MODES)
        if not isinstance(self.count_rejected, bool):
            raise TypeError(
                f"RolloutCorrection.count_rejected must be a bool, got {type(self.count_rejected).__name__}"
            )
        for lo, hi in (("lower", "upper"), ("geo_lower", "geo_upper"), ("token_lower", "token_upper")):
            a, b = _pair("RolloutCorrection", lo, hi, getattr(self, lo), getattr(self, hi))
            object.__setattr__(self, lo, a)
            object.__setattr__(self, hi, b)
        m2 = _check_bound("RolloutCorrection.m2_upper", self.m2_upper, lambda v: 0 < v < _INF, "0 < m2_upper < inf")
        object.__setattr__(self, "m2_upper", m2)

    @property
    def rejects(self) -> bool:
        """Whether this correction can reject tokens (mask mode with a bound, or a filter)."""
        return (self.mode == "mask" and (self.lower is not None or self.upper is not None)) or any(
            v is not None for v in (self.geo_lower, self.geo_upper, self.token_lower, self.token_upper, self.m2_upper)
        )

    def weight(self, old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The ``[B, T]`` weight of every token (0 where rejected or masked); see [`correction_weight`][rpg.correction.correction_weight]."""
        return correction_weight(old_logp, behavior_logp, mask, self)[0]

    def keep(self, old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, T]``: ``mask`` without the rejected tokens — count it for global counts when
        ``count_rejected=False`` (e.g. ``keep.sum()`` as ``batch_num_tokens``)."""
        return correction_weight(old_logp, behavior_logp, mask, self)[1]


def _log_clamp(x: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    lo = None if lo is None else (math.log(lo) if lo > 0 else -_INF)
    hi = None if hi is None else math.log(hi)
    return x.clamp(min=lo, max=hi) if (lo is not None or hi is not None) else x


def _outside(log_x: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    """Bool: x < lo or x > hi, compared in log space (bounds inclusive inside)."""
    out = torch.zeros_like(log_x, dtype=torch.bool)
    if lo is not None:
        out |= log_x < (math.log(lo) if lo > 0 else -_INF)
    if hi is not None:
        out |= log_x > math.log(hi)
    return out


def m2_rejected(log_rho: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    r"""M2PO's filter: bool ``[B, T]``, the response tokens rejected so that mean (log ρ)² of the rest < τ.

    Sort the response tokens by (log ρ)² descending; reject the first k, k the smallest index whose
    suffix mean (the mean over the tokens not rejected) is below ``threshold``; if none is, keep only
    the last (smallest). Computed without a host-device sync (sort, cumulative sums, ``argmax``)."""
    flat_mask = mask.reshape(-1)
    m2 = (log_rho * log_rho).reshape(-1)
    neg_inf = torch.full((), -_INF, dtype=m2.dtype, device=m2.device)
    _, order = torch.sort(torch.where(flat_mask, m2, neg_inf), descending=True)
    valid = flat_mask[order]
    vals = torch.where(valid, m2[order], torch.zeros((), dtype=m2.dtype, device=m2.device))
    suffix = vals.flip(0).cumsum(0).flip(0)
    n_suffix = valid.flip(0).to(m2.dtype).cumsum(0).flip(0)
    ok = valid & (suffix / n_suffix.clamp_min(1) < threshold)
    n_valid = valid.sum()
    first = torch.where(ok.any(), torch.argmax(ok.to(torch.uint8)), (n_valid - 1).clamp_min(0))
    rejected_sorted = valid & (torch.arange(m2.numel(), device=m2.device) < first)
    rejected = torch.zeros_like(flat_mask)
    rejected[order] = rejected_sorted
    return rejected.view_as(mask)


def log_ratios(old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor):
    """Per-token log ρ = old_logp − behavior_logp, 0 at padding (``torch.where``), and per-sequence
    Σ_t log ρ_t ``[B, 1]`` and token counts ``[B, 1]``."""
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    log_rho = torch.where(mask, old_logp - behavior_logp, zero)
    return log_rho, log_rho.sum(-1, keepdim=True), mask.sum(-1, keepdim=True)


def correction_weight(
    old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor, correction: RolloutCorrection
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The correction weight of every token, the kept tokens, and the rejected ones.

    Args:
        old_logp: ``[B, T]`` log π_old of the sampled tokens (detached).
        behavior_logp: ``[B, T]`` log μ of the same tokens (detached).
        mask: ``[B, T]`` bool, the response tokens.
        correction: the settings.

    Returns:
        ``(weight, keep, rejected)``, all ``[B, T]``: ``weight`` ≥ 0 (0 at padding and at
        rejected tokens; a value, no gradient), ``keep`` = ``mask`` without the rejected
        tokens, ``rejected`` the rejected response tokens. Computed in log space, so a
        large mismatch gives an inf weight only where the untruncated math does.
    """
    c = correction
    log_rho, log_seq, n = log_ratios(old_logp, behavior_logp, mask)
    rejected = torch.zeros_like(mask)
    if c.level == "token":
        if c.mode == "truncate":
            log_weight = _log_clamp(log_rho, c.lower, c.upper)
        else:
            log_weight = log_rho
            rejected |= _outside(log_rho, c.lower, c.upper)
    else:
        log_weight = log_seq if c.mode == "mask" else _log_clamp(log_seq, c.lower, c.upper)
        if c.mode == "mask":
            rejected |= _outside(log_seq, c.lower, c.upper)
    if c.geo_lower is not None or c.geo_upper is not None:
        rejected |= _outside(log_seq / n.clamp_min(1), c.geo_lower, c.geo_upper)
    if c.token_lower is not None or c.token_upper is not None:
        bad = _outside(log_rho, c.token_lower, c.token_upper) & mask
        rejected |= bad.any(-1, keepdim=True)
    if c.m2_upper is not None:
        rejected |= m2_rejected(log_rho, mask, c.m2_upper)
    rejected = rejected & mask
    keep = mask & ~rejected
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    weight = torch.where(keep, log_weight.exp(), zero)
    return weight, keep, rejected


def correction_metrics(old_logp, behavior_logp, mask, correction: RolloutCorrection | None, denom) -> dict:
    r"""Diagnostics of the mismatch and of the correction, as 0-dim tensors, under verl's names.

    Over the response tokens (tokens from μ), with log ρ = log π_old − log μ, ``denom`` the token
    count the loss divides by (token means), and per-sequence means over the sequences with a token:

    | name (``rollout_corr/...``) | value |
    |---|---|
    | ``kl`` | mean(−log ρ): k1 estimate of the mismatch KL(μ ‖ π_old) (unbiased for tokens from μ) |
    | ``k3_kl`` | mean(ρ − 1 − log ρ): k3 estimate of the same KL (≥ 0) |
    | ``training_ppl``, ``rollout_ppl`` | mean over sequences of exp(−mean_t log π_old), of exp(−mean_t log μ) |
    | ``ppl_ratio`` | mean over sequences of exp(mean_t log μ − mean_t log π_old) |
    | ``chi2_token`` | mean(ρ²) − 1, a χ²(π_old ‖ μ) estimate: the variance of the exact token weights |
    | ``chi2_seq`` | mean over sequences of ρ_seq² − 1, the same for the sequence product |
    | ``rollout_is_mean``, ``rollout_is_max`` | mean and max of the applied weights ω (0 where rejected) |
    | ``rollout_is_eff_sample_size`` | (Σ ω)² / (n·Σ ω²) ∈ (0, 1], the normalised effective sample size |
    | ``rollout_is_ratio_fraction_high``, ``..._low`` | tokens whose exact weight (ρ, or ρ_seq at the sequence level) is above ``upper`` / below ``lower``: truncated or rejected |
    | ``rollout_rs_masked_fraction`` | tokens rejected (mask mode or a filter) |
    | ``rollout_rs_seq_masked_fraction`` | sequences with a rejected token |
    """
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    one = torch.ones((), dtype=old_logp.dtype, device=old_logp.device)
    log_rho, log_seq, n_b = log_ratios(old_logp, behavior_logp, mask)
    n = mask.sum().to(old_logp.dtype)
    has = n > 0
    safe_n = torch.where(has, n, one)

    def mean(x):
        return torch.where(mask, x, zero).sum() / denom

    seqs = n_b.squeeze(-1) > 0
    n_seq = seqs.sum().to(old_logp.dtype)

    def seq_mean(x):  # x: [B]
        return torch.where(n_seq > 0, torch.where(seqs, x, zero).sum() / n_seq.clamp_min(1), zero)

    def tok_mean(x):  # per sequence, [B]
        return torch.where(mask, x, zero).sum(-1) / n_b.squeeze(-1).clamp_min(1)

    rho = log_rho.exp()
    m = {
        "rollout_corr/kl": mean(-log_rho),
        "rollout_corr/k3_kl": mean(torch.expm1(log_rho) - log_rho),
        "rollout_corr/training_ppl": seq_mean(torch.exp(-tok_mean(old_logp))),
        "rollout_corr/rollout_ppl": seq_mean(torch.exp(-tok_mean(behavior_logp))),
        "rollout_corr/ppl_ratio": seq_mean(torch.exp(tok_mean(behavior_logp) - tok_mean(old_logp))),
        "rollout_corr/chi2_token": mean(rho * rho - 1),
        "rollout_corr/chi2_seq": seq_mean(torch.expm1(2 * log_seq.squeeze(-1))),
    }
    if correction is None:
        weight, rejected = torch.where(mask, rho, zero), torch.zeros_like(mask)
        high = low = torch.zeros_like(mask)
    else:
        weight, _, rejected = correction_weight(old_logp, behavior_logp, mask, correction)
        exact = log_rho if correction.level == "token" else log_seq.expand_as(log_rho)
        high = mask & (exact > math.log(correction.upper)) if correction.upper is not None else torch.zeros_like(mask)
        low = (
            mask & (exact < (math.log(correction.lower) if correction.lower > 0 else -_INF))
            if correction.lower is not None
            else torch.zeros_like(mask)
        )
    sw, sw2 = weight.sum(), (weight * weight).sum()
    m["rollout_corr/rollout_is_mean"] = mean(weight)
    m["rollout_corr/rollout_is_max"] = torch.where(has, weight.max() if weight.numel() else zero, zero)
    m["rollout_corr/rollout_is_eff_sample_size"] = torch.where(
        has & (sw2 > 0), sw * sw / (safe_n * sw2.clamp_min(torch.finfo(sw.dtype).tiny)), zero
    )
    m["rollout_corr/rollout_is_ratio_fraction_high"] = mean(high.to(old_logp.dtype))
    m["rollout_corr/rollout_is_ratio_fraction_low"] = mean(low.to(old_logp.dtype))
    m["rollout_corr/rollout_rs_masked_fraction"] = mean(rejected.to(old_logp.dtype))
    m["rollout_corr/rollout_rs_seq_masked_fraction"] = seq_mean(rejected.any(-1).to(old_logp.dtype))
    return m
