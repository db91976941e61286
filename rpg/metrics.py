r"""What a loss call returns, and the diagnostics it reports.

``out.metrics`` is a ``dict[str, float]`` computed from detached tensors the
first time it is read — one host-device sync then, none before — over the
tokens where ``mask`` is 1, in float64:

* ``ratio/mean``, ``ratio/min``, ``ratio/max`` — the importance ratio
  w = π_θ/π_old; ``ratio/ess`` — its normalized effective sample size
  (Σw)² / (n·Σw²) ∈ (0, 1] (1 = on-policy).
* ``clip_frac``, ``clip_frac/low``, ``clip_frac/high``, ``clip_frac/dual`` — the
  fraction of tokens where a bound binds: under :class:`~rpg.Clip` only for the
  advantage sign it acts on (low and dual for A′ < 0, high for A′ > 0 — the
  count verl and TRL got wrong for months), under :class:`~rpg.Truncate`
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

**Global means.** When ``batch_num_tokens`` is given, every mean above is
divided by it instead of the local token count, so summing a metric over the
micro-batches / ranks of a step gives the full-batch mean. ``ratio/min``,
``ratio/max`` and ``ratio/ess`` stay local. An all-masked or empty batch gives 0.
"""

from __future__ import annotations

import torch

from ._kernel import clip_codes
from .aggregation import denominator
from .clipping import DUAL, HIGH, LOW
from .objectives import kl_term

__all__ = ["LossOutput"]


class LossOutput:
    """``loss`` (scalar tensor), ``per_token`` (``[B, T]``, differentiable, 0 at padding), ``metrics`` (lazy dict)."""

    __slots__ = ("loss", "per_token", "_metric_inputs", "_metrics", "_local")

    def __init__(self, loss: torch.Tensor, per_token: torch.Tensor, metric_inputs: tuple) -> None:
        self.loss = loss
        self.per_token = per_token
        self._metric_inputs = metric_inputs
        self._metrics: dict[str, float] | None = None
        self._local: dict[str, float] | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """The diagnostics of this call (see :mod:`rpg.metrics`), computed once on first access.

        Means are over ``batch_num_tokens`` when the call had it (they sum over micro-batches)."""
        if self._metrics is None:
            with torch.no_grad():
                self._metrics = compute_metrics(*self._metric_inputs)
        return self._metrics

    @property
    def local_metrics(self) -> dict[str, float]:
        """As :attr:`metrics` with means over this call's own tokens, whatever ``batch_num_tokens`` was —
        for frameworks that average logged values over micro-batches (TRL, verl)."""
        if self._metric_inputs[-1] is None:
            return self.metrics
        if self._local is None:
            with torch.no_grad():
                self._local = compute_metrics(*self._metric_inputs[:-1], None)
        return self._local

    def __repr__(self) -> str:
        return f"LossOutput(loss={self.loss!r}, per_token=<{tuple(self.per_token.shape)}>)"


def compute_metrics(logp, old_logp, ref_logp, advantages, mask, spec, batch_num_tokens=None) -> dict[str, float]:
    """The metrics dict from the detached inputs of a loss call (see the module docstring)."""
    code = clip_codes(logp, old_logp, ref_logp, advantages, mask, spec)  # in the loss's own dtype
    kl = spec.kl if spec.beta != 0 else None
    if logp.device.type != "mps":  # float64 where the device has it: k3 of a log-ratio of 100 is finite
        logp, old_logp = logp.double(), old_logp.double()
        ref_logp = None if ref_logp is None else ref_logp.double()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    n = mask.sum().to(logp.dtype)
    denom = denominator(batch_num_tokens, n, logp)  # the same count the loss divides by

    def total(x):
        return torch.where(mask, x, zero).sum()

    def mean(x):
        return total(x) / denom

    log_w = logp - old_logp
    w = log_w.exp()
    log_r = log_w if ref_logp is None else logp - ref_logp
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
    for prefix, lr in (("kl/old", log_w), ("kl/ref", log_r)):  # importance-weighted: KL(π_θ‖π_X)
        metrics[f"{prefix}_k1"] = mean(w * lr)
        metrics[f"{prefix}_k3"] = mean(w * (torch.expm1(-lr) + lr))
    if kl is not None:
        metrics["kl/term"] = mean(kl_term(kl, logp, old_logp, ref_logp)[0])
    values = torch.stack(list(metrics.values()))
    return dict(zip(metrics, values.tolist()))
