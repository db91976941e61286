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
            [`keep`][rpg.correction.RolloutCorrection.keep]). With ``False`` a rejected token
            also leaves the sequence ratios (GSPO's, GMPO's mean and length, the product W)
            and a selection rule's batch statistics, as if the mask lacked it.
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

    M2PO audited ([`rpg.testing.audit`][rpg.testing.audit], ``PolicyLoss()`` with
    ``RolloutCorrection(mode="truncate", lower=1.0, upper=1.0, m2_upper=0.04, count_rejected=False)``):
    on-policy E[r]; off-policy, per token, E[r]. With weight 1 the filter does not correct μ ≠ π_old:
    its bias under a behaviour policy is on the "Every loss, audited" page.
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


_SAFETY_BOUND = 20.0  # |log ρ| that verl's metrics clamp to before exponentiating (weight statistics, chi2_*)


def correction_metrics(
    old_logp: torch.Tensor,
    behavior_logp: torch.Tensor,
    mask: torch.Tensor,
    correction: RolloutCorrection | None = None,
) -> dict[str, torch.Tensor]:
    r"""Diagnostics of the mismatch and of the correction under verl's names, with verl's definitions.

    Each value is the one verl 0.9's ``compute_rollout_correction_and_rejection_mask`` reports under
    the same name for the verl setting that applies the same weights (the table in
    [`rpg.integrations.verl`][rpg.integrations.verl]), on the same log-probs and response mask —
    checked against verl itself in ``tests/integrations/test_verl_metrics.py`` — with one difference:
    verl divides its masked means by (count + 1e-8) and its ESS by (mean + 1e-8), rpg by the count and
    the mean (a relative difference of order 1e-8).

    With log ρ_t = log π_old − log μ over the response tokens (``mask``, before any rejection), ⟨·⟩
    the mean over the response tokens of the call, ⟨·⟩_B the mean over **all B rows** (a row without
    response tokens counts, with per-row mean 0, as in verl), Σ_b the sum over a row and
    ρ̃ = exp(clamp(log ρ, −20, 20)):

    | name (``rollout_corr/...``) | value |
    |---|---|
    | ``kl`` | ⟨−log ρ⟩: k1 estimate of KL(μ ‖ π_old) for tokens from μ |
    | ``k3_kl`` | ⟨ρ − 1 − log ρ⟩ (≥ 0) |
    | ``training_ppl``, ``rollout_ppl`` | ⟨exp(−mean_t log π_old)⟩_B, ⟨exp(−mean_t log μ)⟩_B |
    | ``ppl_ratio`` | ⟨exp(mean_t log μ − mean_t log π_old)⟩_B |
    | ``chi2_token`` | ⟨ρ̃²⟩ − 1 |
    | ``chi2_seq`` | ⟨exp(2·clamp(Σ_b log ρ, −20, 20))⟩_B − 1 |
    | ``rollout_is_mean`` | ⟨ω⟩, ω the importance weight below |
    | ``rollout_is_max`` | token level: max ω; sequence level: max over rows of exp(min(Σ_b log ρ, 20)) (before truncation) |
    | ``rollout_is_eff_sample_size`` | (Σ ω′)² / (n·Σ ω′²), ω′ = min(ω, ``upper``); 0 if every ω′ is 0 |
    | ``rollout_is_ratio_fraction_high`` | token level: ⟨[ρ̃ > upper]⟩; sequence level: ⟨[Σ_b log ρ > log upper]⟩_B |
    | ``rollout_is_ratio_fraction_low`` | the same below ``lower``, or below **1/upper** when ``lower`` is ``None`` (verl's default) |
    | ``rollout_is_oob_ratio`` | ``mode="mask"`` only: ⟨[ρ̃ (ρ̃_seq at the sequence level) outside [lower, upper]]⟩ |
    | ``rollout_rs_masked_fraction`` | ⟨[token rejected]⟩: rejected by ``mode="mask"`` or by a filter |
    | ``rollout_rs_seq_masked_fraction`` | ⟨[row has a rejected token]⟩_B |

    ω, the importance weight of verl's ``rollout_is`` stage: ρ̃ (ρ̃_seq = exp(clamp(Σ_b log ρ, ±20)) at
    ``level="sequence"``) truncated to [``lower``, ``upper``] (``mode="truncate"``) or 0 outside that band
    (``mode="mask"``); the sequence filters (``geo_*``, ``token_*``, verl's ``rollout_rs``) do not change
    it, and it is computed over all response tokens, whatever ``count_rejected``. ω equals the loss's
    weight wherever |log ρ| ≤ 20 and no filter rejects. A bound that is ``None`` is not applied (and a
    fraction against it is 0). ``correction=None`` means no bounds (ω = ρ̃, no rejection).

    Args:
        old_logp: ``[B, T]`` log π_old of the sampled tokens.
        behavior_logp: ``[B, T]`` log μ of the same tokens.
        mask: ``[B, T]`` bool, the response tokens (before rejection).
        correction: the settings, or ``None``.

    Returns:
        ``dict[str, Tensor]`` of 0-dim tensors in ``old_logp``'s dtype, all 0 when ``mask`` is empty
        (where verl raises). Detached inputs are expected (it is called under ``torch.no_grad``).
    """
    return _correction_stats(old_logp, behavior_logp, mask, correction)[0]


def _correction_stats(old_logp, behavior_logp, mask, correction):
    """``(metrics, sums)``: ``correction_metrics``, and for each of its means over response tokens
    the sum over this call's response tokens whose mean it is (``chi2_token``: of ρ̃² − 1)."""
    c = RolloutCorrection(upper=None) if correction is None else correction
    dt, dev = old_logp.dtype, old_logp.device
    zero = torch.zeros((), dtype=dt, device=dev)
    log_rho, log_seq, n_b = log_ratios(old_logp, behavior_logp, mask)
    log_seq, n_b = log_seq.squeeze(-1), n_b.squeeze(-1).to(dt)
    n = n_b.sum()
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    rows = mask.shape[0]

    def total(x):  # Σ over the response tokens
        return torch.where(mask, x, zero).sum()

    def row_mean(x):  # [B], 0 on an empty row (verl: 0 / (0 + 1e-8))
        return torch.where(mask, x, zero).sum(-1) / n_b.clamp_min(1)

    def over_rows(x):  # mean over all B rows
        return x.sum() / rows if rows else zero

    def flag(b):
        return b.to(dt)

    sums = {
        "rollout_corr/kl": total(-log_rho),
        "rollout_corr/k3_kl": total(torch.expm1(log_rho) - log_rho),
    }
    m = {
        "rollout_corr/training_ppl": over_rows(torch.exp(-row_mean(old_logp))),
        "rollout_corr/rollout_ppl": over_rows(torch.exp(-row_mean(behavior_logp))),
        "rollout_corr/ppl_ratio": over_rows(torch.exp(row_mean(behavior_logp) - row_mean(old_logp))),
    }
    sums["rollout_corr/chi2_token"] = total(torch.expm1(2 * log_rho.clamp(-_SAFETY_BOUND, _SAFETY_BOUND)))
    m["rollout_corr/chi2_seq"] = over_rows(torch.expm1(2 * log_seq.clamp(-_SAFETY_BOUND, _SAFETY_BOUND)))

    # verl's rollout_is stage: the (clamped) raw weight, truncated or masked to [lower, upper]
    seq = c.level == "sequence"
    log_raw = (log_seq[:, None].expand_as(log_rho) if seq else log_rho).clamp(-_SAFETY_BOUND, _SAFETY_BOUND)
    raw = torch.where(mask, log_raw.exp(), zero)
    if c.mode == "truncate":
        omega = torch.where(mask, _log_clamp(log_raw, c.lower, c.upper).exp(), zero)
        oob = None
    else:
        oob = mask & _outside(log_raw, c.lower, c.upper)
        omega = torch.where(oob, zero, raw)
    sums["rollout_corr/rollout_is_mean"] = total(omega)
    low_bound = c.lower if c.lower is not None else (None if c.upper is None else 1.0 / c.upper)
    if seq:
        log_max = log_seq.max() if rows else zero
        m["rollout_corr/rollout_is_max"] = log_max.clamp(max=_SAFETY_BOUND).exp()
        m["rollout_corr/rollout_is_ratio_fraction_high"] = over_rows(flag(_outside(log_seq, None, c.upper)))
        m["rollout_corr/rollout_is_ratio_fraction_low"] = over_rows(flag(_outside(log_seq, low_bound, None)))
    else:
        m["rollout_corr/rollout_is_max"] = torch.where(mask, omega, -_INF).max() if omega.numel() else zero
        sums["rollout_corr/rollout_is_ratio_fraction_high"] = total(flag(_outside(log_raw, None, c.upper)))
        sums["rollout_corr/rollout_is_ratio_fraction_low"] = total(flag(_outside(log_raw, low_bound, None)))
    w = omega if c.upper is None else omega.clamp(max=c.upper)
    sw, sw2 = w.sum(), (w * w).sum()
    m["rollout_corr/rollout_is_eff_sample_size"] = torch.where(
        sw2 > 0, sw * sw / (safe_n * sw2.clamp_min(torch.finfo(dt).tiny)), zero
    )
    if oob is not None:
        sums["rollout_corr/rollout_is_oob_ratio"] = total(flag(oob))
    rejected = correction_weight(old_logp, behavior_logp, mask, c)[2]  # by mode="mask" or a filter
    sums["rollout_corr/rollout_rs_masked_fraction"] = total(flag(rejected))
    m["rollout_corr/rollout_rs_seq_masked_fraction"] = over_rows(flag(rejected.any(-1)))
    has = n > 0
    m = {k: torch.where(has, v, zero) for k, v in m.items()}
    means = {k: torch.where(has, s / safe_n, zero) for k, s in sums.items()}  # ⟨ρ̃² − 1⟩ = ⟨ρ̃²⟩ − 1
    merged = {**means, **m}
    return {k: merged[k] for k in _ORDER if k in merged}, sums


_ORDER = tuple(
    "rollout_corr/" + k
    for k in (
        "kl",
        "k3_kl",
        "training_ppl",
        "rollout_ppl",
        "ppl_ratio",
        "chi2_token",
        "chi2_seq",
        "rollout_is_mean",
        "rollout_is_max",
        "rollout_is_eff_sample_size",
        "rollout_is_ratio_fraction_high",
        "rollout_is_ratio_fraction_low",
        "rollout_is_oob_ratio",
        "rollout_rs_masked_fraction",
        "rollout_rs_seq_masked_fraction",
    )
)
