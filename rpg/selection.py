r"""Selection rules over a batch's tokens: Clip-Cov and KL-Cov (Cui et al., arXiv 2505.22617).

Both rank the response tokens of one call by the covariance of their advantage and log-probability,

    cov_t = (A_t − mean(A))·(log π_θ(y_t) − mean(log π_θ)),        means over the call's response tokens,

(detached: a value), the per-token term of Cov(A, log π) that drives the entropy of the policy down, and
act on a few of them, K = max(⌊fraction·N⌋, 1) with N the call's response tokens:

* [`CovarianceDrop`][rpg.selection.CovarianceDrop] (Clip-Cov): among the tokens the clip rule has not
  already cut (and with A ≠ 0 for it, as verl's ``clip_cov``; for a rule with a slope instead of a cut —
  a smooth gate, a gradient-preserving clip — the tokens its clip metrics count as clipped) whose cov lies strictly inside
  (``low``, ``high``), K drawn uniformly at random without replacement lose their policy-gradient term
  (value and gradient 0; they still count in the denominators). A KL term (β > 0) stays on every response
  token, the selected ones included: verl adds its KL loss over the whole response mask, apart from the
  ``clip_cov`` policy loss;
* [`CovariancePenalty`][rpg.selection.CovariancePenalty] (KL-Cov): the K tokens of largest cov get
  ``coef``·|log π_θ − log π_old| added to their loss (verl's and SkyRL's ``kl_cov``: the absolute k1;
  its derivative is coef·sign(log w)).

The randomness of Clip-Cov comes from the call's ``generator=`` (a ``torch.Generator``; ``None`` uses
torch's default generator, as verl and SkyRL do): a loss object holds settings only, so it stays
immutable and hashable, and seeding the generator reproduces a draw. The subset is drawn as verl draws
it (``torch.randperm`` over the candidates in row-major order), so the same seed selects the same tokens.

**Batch statistics and micro-batches.** The means, N and K are those of *one call*. Split a batch into
micro-batches or shards and each selects among its own tokens, with its own means — as verl and SkyRL
do per micro-batch. The sum of the shards' losses (with the full batch's global counts) is then the
loss of a selection made per shard, not the full-batch loss: the two differ wherever the selections do
(tested). A selection over the whole batch needs the whole batch in one call.

Both expected gradients are biased by construction (they drop or penalise the tokens the policy
gradient would move most, to keep the entropy up); where no token is selected they equal the
unselected loss's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._util import check_real
from .objectives import Ratios

__all__ = ["SelectionRule", "CovarianceDrop", "CovariancePenalty", "covariance", "count", "penalty"]

_INF = float("inf")


def covariance(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""``[B, T]`` cov_t = (A_t − mean A)·(logp_t − mean logp), means over the masked tokens; −∞ at padding.

    ``logp`` is detached here; ``advantages`` ``[B, 1]`` or ``[B, T]`` (a per-sequence A counts once per token)."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = advantages.expand_as(logp)
    n = mask.sum().clamp_min(1)
    lp = torch.where(mask, logp.detach(), zero)
    a = torch.where(mask, adv, zero)
    cov = (adv - a.sum() / n) * (logp.detach() - lp.sum() / n)
    return torch.where(mask, cov, torch.full((), -_INF, dtype=logp.dtype, device=logp.device))


def count(fraction: float, mask: torch.Tensor) -> int:
    """K = max(⌊fraction·N⌋, 1), N the masked tokens (a host sync on an accelerator, as verl's ``.item()``)."""
    return max(int(fraction * int(mask.sum())), 1)


class SelectionRule:
    """Base of a selection rule: ``select(...)`` returns ``(drop, penalize)``, bool ``[B, T]`` or ``None``.

    Subclasses are frozen dataclasses (hashable). ``coef`` is the penalty's coefficient (0 if none)."""

    coef: float = 0.0

    def select(self, logp, old_logp, advantages, mask, clip, generator=None):
        raise NotImplementedError


@dataclass(frozen=True)
class CovarianceDrop(SelectionRule):
    r"""Clip-Cov: K random tokens with ``low`` < cov < ``high`` (not already clipped) lose their policy-gradient term.

    A KL term of the loss (β > 0) is kept at every token, as verl computes it apart from ``clip_cov``.
    The fraction of tokens dropped is reported as ``select_frac``.

    Args:
        fraction: 0 < fraction ≤ 1, K = max(⌊fraction·N⌋, 1) (verl's ``clip_cov_ratio``, default 2e-4).
        low: the band's lower bound ω_low (``clip_cov_lb``, default 1.0).
        high: the band's upper bound ω_high > low (``clip_cov_ub``, default 5.0).
    """

    fraction: float = 2e-4
    low: float = 1.0
    high: float = 5.0

    def __post_init__(self) -> None:
        f = check_real("CovarianceDrop.fraction", self.fraction, lambda v: 0 < v <= 1, "0 < fraction <= 1")
        lo = check_real("CovarianceDrop.low", self.low, lambda v: -_INF < v < _INF, "a finite number")
        hi = check_real("CovarianceDrop.high", self.high, lambda v: -_INF < v < _INF, "a finite number")
        if not lo < hi:
            raise ValueError(f"CovarianceDrop.low = {lo} must be < CovarianceDrop.high = {hi}")
        object.__setattr__(self, "fraction", f)
        object.__setattr__(self, "low", lo)
        object.__setattr__(self, "high", hi)

    def select(self, logp, old_logp, advantages, mask, clip, generator=None):
        """``(drop, None)``: the K random band tokens (bool ``[B, T]``)."""
        cov = covariance(logp, advantages, mask)
        candidates = mask & (cov > self.low) & (cov < self.high)
        if clip is not None:  # tokens the clip already cut (with A ≠ 0) are not candidates
            adv = advantages.expand_as(logp)
            r = Ratios(logp.detach(), old_logp)
            _, cut = clip.effective_ratio(r.w, adv, r)
            if cut is not None and cut.dtype != torch.bool:  # a slope (smooth gate, kept gradient):
                cut = clip.codes(r.w, adv, r) != 0  # the tokens its metrics count as clipped
            if cut is not None:
                candidates = candidates & ~(cut & (adv != 0))
        idx = torch.nonzero(candidates)
        drop = torch.zeros_like(mask)
        if idx.shape[0] == 0:
            return drop, None
        device = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(idx.shape[0], generator=generator, device=device).to(idx.device)
        chosen = idx[perm[: count(self.fraction, mask)]]
        drop[chosen[:, 0], chosen[:, 1]] = True
        return drop, None


@dataclass(frozen=True)
class CovariancePenalty(SelectionRule):
    r"""KL-Cov: the K tokens of largest cov get ``coef``·|log π_θ − log π_old| added to their loss.

    Args:
        fraction: 0 < fraction ≤ 1, K = max(⌊fraction·N⌋, 1) (verl's ``kl_cov_ratio``, default 2e-4).
        coef: the penalty's coefficient ≥ 0 (verl's ``ppo_kl_coef``, default 1.0).
    """

    fraction: float = 2e-4
    coef: float = 1.0

    def __post_init__(self) -> None:
        f = check_real("CovariancePenalty.fraction", self.fraction, lambda v: 0 < v <= 1, "0 < fraction <= 1")
        c = check_real("CovariancePenalty.coef", self.coef, lambda v: 0 <= v < _INF, "0 <= coef < inf")
        object.__setattr__(self, "fraction", f)
        object.__setattr__(self, "coef", c)

    def select(self, logp, old_logp, advantages, mask, clip, generator=None):
        """``(None, penalize)``: the K tokens of largest covariance (bool ``[B, T]``)."""
        penalize = torch.zeros_like(mask)
        n = int(mask.sum())
        if n == 0:
            return None, penalize
        valid = torch.nonzero(mask.reshape(-1)).squeeze(-1)
        cov = covariance(logp, advantages, mask).reshape(-1)[valid]
        top = torch.topk(cov, min(count(self.fraction, mask), n), largest=True).indices
        penalize.view(-1)[valid[top]] = True
        return None, penalize


def penalty(logp: torch.Tensor, old_logp: torch.Tensor, penalize: torch.Tensor, coef: float) -> torch.Tensor:
    """``[B, T]`` coef·|logp − old_logp| at the ``penalize`` tokens, 0 elsewhere (differentiable in ``logp``)."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(penalize, coef * (logp - old_logp).abs(), zero)
