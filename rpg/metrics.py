r"""What a loss call returns, and the diagnostics it reports.

``out.metrics`` is a ``dict[str, float]`` computed from detached tensors the
first time it is read — one host-device sync then, none before — over the
tokens where ``mask`` is 1, in float64:

* ``ratio/mean``, ``ratio/min``, ``ratio/max`` — the importance ratio
  w = π_θ/π_old; ``ratio/ess`` — its normalized effective sample size
  (Σw)² / (n·Σw²) ∈ (0, 1] (1 = on-policy).
* ``clip_frac``, ``clip_frac/low``, ``clip_frac/high``, ``clip_frac/dual`` — the
  fraction of tokens where a bound binds: under [`Clip`][rpg.clipping.Clip] only for the
  advantage sign it acts on (low and dual for A′ < 0, high for A′ > 0 — the
  count verl and TRL got wrong for months), under [`Truncate`][rpg.clipping.Truncate]
  wherever w was truncated; 0 without a clip.
* ``kl/old_k1``, ``kl/old_k3`` and ``kl/ref_k1``, ``kl/ref_k3`` — estimates of
  KL(π_θ ‖ π_old) (the drift since sampling) and KL(π_θ ‖ π_ref), importance
  weighted so that they are unbiased for tokens drawn from π_old:
  mean(w·log r) and mean(w·k3(π_θ → π_X)) = mean(w·(1/r − 1 + log r)) with
  r = π_θ/π_X. On-policy (w = 1) ``kl/ref_k3`` is the k3 value GRPO logs.
  (verl's ``ppo_kl`` is the other direction, KL(π_old ‖ π_θ) ≈ mean(−log w);
  the verl adapter reports it under that name.)
* ``kl/term`` — the mean of the loss's own KL term, β excluded (absent when
  the loss has none).
* ``entropy/mean`` — the mean of the call's ``entropy`` (when given).
* ``rollout_corr/...`` — when the call has ``behavior_logp``: the mismatch between
  the rollout engine μ and π_old and what the correction did, under verl's names
  (``kl``, ``k3_kl``, ``ppl_ratio``, ``chi2_token``, ``rollout_is_eff_sample_size``,
  ``rollout_rs_masked_fraction``, …; [`rpg.correction.correction_metrics`][rpg.correction.correction_metrics]).

Clip fractions come from the same `clip_view` the loss kernel uses, so
they cannot disagree with the loss.

**Stale buffers.** The metrics are computed lazily from the call's own input
tensors. If one of them was modified in place after the call (a reused
``old_logp`` buffer, say), reading them raises ``RuntimeError`` instead of
returning numbers of other data (the tensors' version counters are checked, as
autograd does for saved tensors). Read ``out.metrics`` before reusing a buffer,
or pass a copy.

**Global means.** When ``batch_num_tokens`` is given, every mean above is
divided by it instead of the local token count, so summing a metric over the
micro-batches / ranks of a step gives the full-batch mean. ``ratio/min``,
``ratio/max`` and ``ratio/ess`` stay local. An all-masked or empty batch gives 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._kernel import clip_view, ratios
from .aggregation import denominator
from .clipping import DUAL, HIGH, LOW
from .config import LossConfig
from .correction import RolloutCorrection, correction_metrics
from .objectives import REGISTRY

__all__ = ["LossOutput", "MetricInputs", "compute_metrics"]


class MetricInputs(NamedTuple):
    """The detached inputs of one loss call that its metrics are computed from."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor
    mask: torch.Tensor
    config: LossConfig
    batch_num_tokens: object = None
    behavior_logp: torch.Tensor | None = None
    correction: RolloutCorrection | None = None
    entropy: torch.Tensor | None = None
    response_mask: torch.Tensor | None = None  # the call's mask, before any rejection (``mask`` is the loss's)


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        return None


class LossOutput:
    """``loss`` (scalar tensor), ``per_token`` (``[B, T]``, differentiable, 0 at padding), ``metrics`` (lazy dict)."""

    __slots__ = ("_inputs", "_local", "_metrics", "_versions", "loss", "per_token")

    def __init__(self, loss: torch.Tensor, per_token: torch.Tensor, inputs: MetricInputs) -> None:
        self.loss = loss
        self.per_token = per_token
        tensors = [(i, t) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
        snap = {i: t.clone() for i, t in tensors if _version(t) is None}  # untracked: snapshot
        if snap:
            inputs = inputs._replace(**{inputs._fields[i]: t for i, t in snap.items()})
        self._inputs = inputs
        self._versions = tuple((i, t, _version(t)) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor))
        self._metrics: dict[str, float] | None = None
        self._local: dict[str, float] | None = None

    def _check_fresh(self) -> None:
        for i, t, v in self._versions:
            if _version(t) != v:
                raise RuntimeError(
                    f"rpg: the {self._inputs._fields[i]} tensor of this loss call was modified in place after the "
                    "call, so its metrics would describe other data; read out.metrics before reusing the buffer "
                    "(or pass a copy)"
                )

    @property
    def metrics(self) -> dict[str, float]:
        """The diagnostics of this call (see [`rpg.metrics`][rpg.metrics]), computed once on first access.

        Means are over ``batch_num_tokens`` when the call had it (they sum over micro-batches)."""
        if self._metrics is None:
            self._check_fresh()
            with torch.no_grad():
                self._metrics = compute_metrics(self._inputs)
        return self._metrics

    @property
    def local_metrics(self) -> dict[str, float]:
        """As [`metrics`][rpg.metrics] with means over this call's own tokens, whatever ``batch_num_tokens`` was —
        for frameworks that average logged values over micro-batches (TRL, verl)."""
        if self._inputs.batch_num_tokens is None:
            return self.metrics
        if self._local is None:
            self._check_fresh()
            with torch.no_grad():
                self._local = compute_metrics(self._inputs._replace(batch_num_tokens=None))
        return self._local

    def __repr__(self) -> str:
        return f"LossOutput(loss={self.loss!r}, per_token=<{tuple(self.per_token.shape)}>)"


def compute_metrics(inputs: MetricInputs) -> dict[str, float]:
    """The metrics dict from the detached inputs of a loss call (see the module docstring)."""
    logp, old_logp, ref_logp, advantages, mask, cfg, batch_num_tokens, behavior_logp, correction, entropy, response = (
        inputs
    )
    r = ratios(logp, old_logp, ref_logp)
    code = None
    if cfg.clip is not None:  # the same view of the ratio and sign as the loss kernel
        code = cfg.clip.codes(*clip_view(r, advantages, mask, cfg))  # (ratio, direction, anchor)
    if logp.device.type != "mps":  # float64 where the device has it: k3 of a log-ratio of 100 is finite
        logp, old_logp = logp.double(), old_logp.double()
        ref_logp = None if ref_logp is None else ref_logp.double()
        behavior_logp = None if behavior_logp is None else behavior_logp.double()
        entropy = None if entropy is None else entropy.double()
    r = ratios(logp, old_logp, ref_logp)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    n = mask.sum().to(logp.dtype)
    denom = denominator(batch_num_tokens, n, logp)  # the same count the loss divides by

    def total(x):
        return torch.where(mask, x, zero).sum()

    def mean(x):
        return total(x) / denom

    w = r.w
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    has = n > 0
    if w.numel():
        w_min = torch.where(has, torch.where(mask, w, inf).min(), zero)
        w_max = torch.where(has, torch.where(mask, w, -inf).max(), zero)
    else:  # an empty [0, T] or [B, 0] batch
        w_min = w_max = zero
    sum_w, sum_w2 = total(w), total(w * w)
    ess = torch.where(has, sum_w * sum_w / (n * sum_w2).clamp_min(torch.finfo(w.dtype).tiny), zero)
    metrics = {"ratio/mean": mean(w), "ratio/min": w_min, "ratio/max": w_max, "ratio/ess": ess}
    for bound, name in ((LOW, "low"), (HIGH, "high"), (DUAL, "dual")):
        metrics[f"clip_frac/{name}"] = zero if code is None else mean((code == bound).to(w.dtype))
    metrics["clip_frac"] = metrics["clip_frac/low"] + metrics["clip_frac/high"] + metrics["clip_frac/dual"]
    # KL(π_θ‖π_X) estimated as E_old[w·log r] and E_old[w·k3] = the rkl and urkl surrogates' values
    # (their limits hold at a −∞ log-prob), times the exact ρ = π_old/μ when the tokens came from μ.
    rho = None if behavior_logp is None else torch.where(mask, old_logp - behavior_logp, zero).exp()
    for prefix, rr in (("kl/old", ratios(logp, old_logp, None)), ("kl/ref", r)):
        for est, term in (("k1", "rkl"), ("k3", "urkl")):
            value = torch.zeros_like(w)
            REGISTRY[term].accumulate(value, torch.zeros_like(w), 1.0, rr)
            metrics[f"{prefix}_{est}"] = mean(value if rho is None else value * rho)
    if cfg.has_kl:
        value = torch.zeros_like(w)
        REGISTRY[cfg.kl].accumulate(value, torch.zeros_like(w), 1.0, r)
        metrics["kl/term"] = mean(value)
    if entropy is not None:
        metrics["entropy/mean"] = mean(entropy)
    if behavior_logp is not None:  # over every response token, rejected or not
        response = mask if response is None else response
        same = response is mask
        corr_denom = denom if same else denominator(None, response.sum().to(logp.dtype), logp)
        metrics.update(correction_metrics(old_logp, behavior_logp, response, correction, corr_denom))
    values = torch.stack([torch.as_tensor(v, dtype=logp.dtype, device=logp.device) for v in metrics.values()])
    return dict(zip(metrics, values.tolist(), strict=False))
