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
* ``select_frac`` — with a selection rule ([`rpg.selection`][rpg.selection]): the fraction of tokens it
  took, dropped from the policy-gradient term by Clip-Cov (verl logs this as its ``pg_clipfrac``) or
  penalised by KL-Cov; absent otherwise.
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
  the rollout engine μ and π_old and what the correction did, under verl's names and
  with verl's definitions (``kl``, ``k3_kl``, ``ppl_ratio``, ``chi2_token``, ``rollout_is_eff_sample_size``,
  ``rollout_rs_masked_fraction``, …; [`rpg.correction.correction_metrics`][rpg.correction.correction_metrics]).

Clip fractions come from the same `clip_view` the loss kernel uses (a rule whose
bounds follow the sign of the advantage, [`SignedTruncate`][rpg.clipping.SignedTruncate],
reads that sign, as the kernel does), so they cannot disagree with the loss.

**Stale buffers.** The metrics are computed lazily from the call's own input
tensors. If one of them was modified in place after the call (a reused
``old_logp`` buffer, say), reading them raises ``RuntimeError`` instead of
returning numbers of other data (the tensors' version counters are checked, as
autograd does for saved tensors). Read ``out.metrics`` before reusing a buffer,
or pass a copy.

**Micro-batches and ranks.** ``out.metrics`` holds means over *this call's* tokens
(the loss's ``mask``; for ``rollout_corr/*`` the call's response tokens), whatever
``batch_num_tokens`` is. That is the value verl and TRL log: verl appends each
micro-batch's metrics and averages the list, TRL averages the values it logs per
micro-batch and gathers them across processes — so the rpg adapters log
``out.metrics``. Averaging per-call means weights every micro-batch equally; for
the exact full-batch token mean, read ``out.summable_metrics``: every token mean
as Σ_call x / ``batch_num_tokens``, which adds up over the micro-batches and ranks
of a step to the full-batch value (``ratio/min``, ``ratio/max``, ``ratio/ess`` and
the per-sequence ``rollout_corr/*`` values are not there: they do not add up).
With ``count_rejected=False`` the ``rollout_corr/*`` sums run over all response
tokens while ``batch_num_tokens`` counts the kept ones; their step total is then
the full-batch mean times (response tokens)/(kept tokens). An all-masked or empty
call gives 0.

```python
import torch
import rpg

g = torch.Generator().manual_seed(0)
logp = -torch.rand(8, 6, generator=g, dtype=torch.float64) - 1.0
old_logp = logp + 0.1 * torch.randn(8, 6, generator=g, dtype=torch.float64)
advantages = torch.randn(8, generator=g, dtype=torch.float64)
mask = torch.rand(8, 6, generator=g) < 0.8
loss_fn = rpg.DAPOLoss()
full = loss_fn(logp, old_logp, advantages, mask).metrics
n = int(mask.sum())  # the step's token count, as every micro-batch passes it
step = {}
for rows in (slice(0, 4), slice(4, 8)):
    out = loss_fn(logp[rows], old_logp[rows], advantages[rows], mask[rows], batch_num_tokens=n)
    for k, v in out.summable_metrics.items():
        step[k] = step.get(k, 0.0) + v
assert abs(step["ratio/mean"] - full["ratio/mean"]) < 1e-12
assert abs(step["clip_frac"] - full["clip_frac"]) < 1e-12
```
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._kernel import clip_codes, ratios
from .aggregation import denominator
from .clipping import DUAL, HIGH, LOW
from .config import LossConfig
from .correction import RolloutCorrection, _correction_stats
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
    selected: torch.Tensor | None = None  # the selection rule's tokens (Clip-Cov dropped, KL-Cov penalised)


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        return None


class LossOutput:
    """``loss`` (scalar tensor), ``per_token`` (``[B, T]``, differentiable, 0 at padding), ``metrics`` (lazy dict
    of per-call means) and ``summable_metrics`` (lazy dict of token means over ``batch_num_tokens``)."""

    __slots__ = ("_inputs", "_metrics", "_summable", "_versions", "loss", "per_token")

    def __init__(self, loss: torch.Tensor, per_token: torch.Tensor, inputs: MetricInputs) -> None:
        self.loss = loss
        self.per_token = per_token
        tensors = [(i, t) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
        snap = {i: t.clone() for i, t in tensors if _version(t) is None}  # untracked: snapshot
        if snap:
            inputs = inputs._replace(**{inputs._fields[i]: t for i, t in snap.items()})  # type: ignore[arg-type]
        self._inputs = inputs
        self._versions = tuple((i, t, _version(t)) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor))
        self._metrics: dict[str, float] | None = None
        self._summable: dict[str, float] | None = None

    def _check_fresh(self) -> None:
        for i, t, v in self._versions:
            if _version(t) != v:
                raise RuntimeError(
                    f"rpg: the {self._inputs._fields[i]} tensor of this loss call was modified in place after the "
                    "call, so its metrics would describe other data; read out.metrics before reusing the buffer "
                    "(or pass a copy)"
                )

    def _both(self) -> tuple[dict[str, float], dict[str, float]]:
        if self._metrics is None or self._summable is None:
            self._check_fresh()
            with torch.no_grad():
                self._metrics, self._summable = _compute(self._inputs)
        return self._metrics, self._summable

    @property
    def metrics(self) -> dict[str, float]:
        """The diagnostics of this call (see [`rpg.metrics`][rpg.metrics]), computed once on first access.

        Every mean is over this call's own tokens, whatever ``batch_num_tokens`` is: the per-micro-batch
        value verl and TRL log and average. For values that add up over micro-batches and ranks to the
        full batch's, read [`summable_metrics`][rpg.metrics.LossOutput.summable_metrics]."""
        return self._both()[0]

    @property
    def summable_metrics(self) -> dict[str, float]:
        """The token means of [`metrics`][rpg.metrics.LossOutput.metrics] as Σ_call x / ``batch_num_tokens``.

        Summed over the micro-batches and ranks of a step that all pass the step's ``batch_num_tokens``,
        each value is the full-batch call's (module docstring, "Micro-batches"). Only token means are
        here (not ``ratio/min``, ``ratio/max``, ``ratio/ess`` nor per-sequence means, which do not add
        up). Without ``batch_num_tokens`` the count is the call's own, and the values equal ``metrics``'."""
        return self._both()[1]

    @property
    def local_metrics(self) -> dict[str, float]:
        """The same dict as [`metrics`][rpg.metrics.LossOutput.metrics] (means over this call's tokens), kept
        for code written when ``metrics`` divided by ``batch_num_tokens``."""
        return self.metrics

    def __repr__(self) -> str:
        return f"LossOutput(loss={self.loss!r}, per_token=<{tuple(self.per_token.shape)}>)"


def compute_metrics(inputs: MetricInputs) -> dict[str, float]:
    """The metrics dict from the detached inputs of a loss call: means over this call's tokens (module docstring)."""
    return _compute(inputs)[0]


def _compute(inputs: MetricInputs) -> tuple[dict[str, float], dict[str, float]]:
    """``(metrics, summable)`` in one pass and one host-device sync."""
    (
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
        cfg,
        batch_num_tokens,
        behavior_logp,
        correction,
        entropy,
        response,
        selected,
    ) = inputs
    r = ratios(logp, old_logp, ref_logp)
    code = None
    if cfg.clip is not None:  # the same view of the ratio and sign as the loss kernel
        code = clip_codes(r, advantages, mask, cfg)
    if logp.device.type != "mps":  # float64 where the device has it: k3 of a log-ratio of 100 is finite
        logp, old_logp = logp.double(), old_logp.double()
        ref_logp = None if ref_logp is None else ref_logp.double()
        behavior_logp = None if behavior_logp is None else behavior_logp.double()
        entropy = None if entropy is None else entropy.double()
    r = ratios(logp, old_logp, ref_logp)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    n = mask.sum().to(logp.dtype)
    has = n > 0
    local = torch.where(has, n, torch.ones_like(n))
    denom = denominator(batch_num_tokens, n, logp)  # the count the loss divides by (token-mean)

    def total(x):
        return torch.where(mask, x, zero).sum()

    sums: dict[str, torch.Tensor] = {}  # token means: their sums over this call's tokens
    other: dict[str, torch.Tensor] = {}
    w = r.w
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    if w.numel():
        w_min = torch.where(has, torch.where(mask, w, inf).min(), zero)
        w_max = torch.where(has, torch.where(mask, w, -inf).max(), zero)
    else:  # an empty [0, T] or [B, 0] batch
        w_min = w_max = zero
    sum_w, sum_w2 = total(w), total(w * w)
    ess = torch.where(has, sum_w * sum_w / (n * sum_w2).clamp_min(torch.finfo(w.dtype).tiny), zero)
    n_inf = total(torch.isinf(w).to(w.dtype))  # π_old = 0 under μ: k infinite weights, ESS → k/n
    ess = torch.where(n_inf > 0, n_inf / local, ess)
    sums["ratio/mean"] = sum_w
    other.update({"ratio/min": w_min, "ratio/max": w_max, "ratio/ess": ess})
    for bound, name in ((LOW, "low"), (HIGH, "high"), (DUAL, "dual")):
        sums[f"clip_frac/{name}"] = zero if code is None else total((code == bound).to(w.dtype))
    sums["clip_frac"] = sums["clip_frac/low"] + sums["clip_frac/high"] + sums["clip_frac/dual"]
    if selected is not None:
        sums["select_frac"] = total(selected.to(w.dtype))
    # KL(π_θ‖π_X) estimated as E_old[w·log r] and E_old[w·k3] = the rkl and urkl surrogates' values
    # (their limits hold at a −∞ log-prob), times the exact ρ = π_old/μ when the tokens came from μ:
    # then the ratios are taken to μ directly (ρ·w = π_θ/μ, ρ·c = π_X/μ), finite where π_old = 0.
    for prefix, x in (("kl/old", old_logp), ("kl/ref", ref_logp)):
        if behavior_logp is None:
            rr = ratios(logp, old_logp, None) if x is old_logp else r
        else:
            rr = ratios(logp, behavior_logp, old_logp if x is None else x)
        for est, term in (("k1", "rkl"), ("k3", "urkl")):
            value = torch.zeros_like(w)
            REGISTRY[term].accumulate(value, torch.zeros_like(w), 1.0, rr)
            sums[f"{prefix}_{est}"] = total(value)
    if cfg.has_kl:
        value = torch.zeros_like(w)
        cfg.kl_term.accumulate(value, torch.zeros_like(w), 1.0, r)
        sums["kl/term"] = total(value)
    if entropy is not None:
        sums["entropy/mean"] = total(entropy)
    means = {k: torch.where(has, v / local, zero) for k, v in sums.items()}
    metrics = {"ratio/mean": means["ratio/mean"], **other, **{k: v for k, v in means.items() if k != "ratio/mean"}}
    summable = {k: v / denom for k, v in sums.items()}
    if behavior_logp is not None:  # over every response token, rejected or not
        response = mask if response is None else response
        corr, corr_sums = _correction_stats(old_logp, behavior_logp, response, correction)
        metrics.update(corr)
        summable.update({k: v / denom for k, v in corr_sums.items()})
    names = list(metrics) + list(summable)
    values = torch.stack(
        [torch.as_tensor(v, dtype=logp.dtype, device=logp.device) for v in (*metrics.values(), *summable.values())]
    ).tolist()
    m = dict(zip(names[: len(metrics)], values[: len(metrics)], strict=True))
    return m, dict(zip(names[len(metrics) :], values[len(metrics) :], strict=True))
