r"""Sequence-level importance ratios and weight kernels: GMPO's geometric mean, VESPO's Gamma kernel.

Two ways a loss can look at a whole response y = (y_1, …, y_n) instead of one token (w_t = π_θ/π_old
per token, A the advantage, all ``[B, T]`` with a mask):

**A geometric mean of clipped token ratios** (``ratio="geometric"``, differentiable style; GMPO, Zhao
et al., arXiv 2507.20673). Each token's log-ratio is clipped *before* the mean, sign-aware as PPO's clip
(A ≥ 0: at most log(1+ε_high); A < 0: at least log(1−ε_low), and at most log c_dual with a dual bound),
in log space; then

    s_b = exp((1/n_b) Σ_t log m_bt),      ℓ_bt = −s_b·A_bt,

with m_bt the [`Clip`][rpg.clipping.Clip]'s effective ratio of token t. GSPO (``ratio="sequence"``)
instead clips the mean: s = clip(exp(mean_t log w_t)). As for GSPO the per-token value is the
sequence's and the gradient at token t flows through that token's own clipped log-ratio
(GMPO-token): ∂ℓ_bt/∂logp_bt = −s_b·A_bt where token t is not clipped, 0 where it is, so with
``agg="seq-mean-token-mean"`` and a per-sequence A the loss is (1/S)·Σ_b −s_b·A_b and its gradient is
exactly ∇ of that (a clipped token stays in the mean as a constant and passes no gradient).

**A sequence ratio through a weight kernel** (``ratio="product"``, REINFORCE style; VESPO,
arXiv 2602.10693). The full sequence importance weight, no length normalisation, in log space:

    log W_b = Σ_t log w_bt,       ℓ_bt = −sg(φ(W_b)·A_bt)·logp_bt,

with φ the ``kernel`` ([`Gamma`][rpg.sequence.Gamma] for VESPO) or φ(W) = W without one — the
exact outcome-reward importance weight π_θ(y)/π_old(y), so without a kernel the expected gradient
of ``ratio="product"`` with ``agg="seq-mean-token-sum"`` is exactly −∇E_{π_θ}[R(y)] off-policy (tested
by enumeration). A kernel trades that exactness for bounded variance. With a behaviour policy the
rollout correction's weight enters W (W = Π_t w_t·ρ̄(y), see
[`correction_log_weight`][rpg.sequence.correction_log_weight]) instead of multiplying each token's loss.

Both are configurations of [`LossConfig`][rpg.config.LossConfig]; the kernel in
``rpg._kernel`` hands these ratios to [`sequence_token_loss`][rpg.sequence.sequence_token_loss].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._util import check_bound as _check_bound
from .objectives import REGISTRY

__all__ = [
    "Gamma",
    "SequenceKernel",
    "geometric_log_ratio",
    "product_log_ratio",
    "correction_log_weight",
    "sequence_token_loss",
]

_INF = float("inf")


class SequenceKernel:
    """Base of a weight kernel φ: the REINFORCE weight uses φ(W)·A in place of W·A.

    Subclasses are frozen dataclasses (hashable: ``torch.compile`` treats them as constants) and
    define ``log_phi(log_w, up)``: log φ at the ratio W = exp(log_w), ``up`` the tokens with A ≥ 0."""

    def log_phi(self, log_w: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Gamma(SequenceKernel):
    r"""VESPO's Gamma kernel (arXiv 2602.10693): φ(W) = W^k·e^{−λ(W − 1)}, normalised so φ(1) = 1.

    (k, λ) = (``k_pos``, ``lambda_pos``) for A ≥ 0 and (``k_neg``, ``lambda_neg``) for A < 0;
    k ≥ 0 sets how fast a small W is down-weighted, λ ≥ 0 how fast a large one is. Evaluated in log
    space, log φ = k·log W − λ·(W − 1), so a sequence of any length gives a finite weight or 0
    (W^k·e^{−λW} → 0 as W → ∞ for λ > 0). φ is a value: no gradient flows through it. Defaults are
    TRL's (``vespo_k_pos=2``, ``vespo_lambda_pos=3``, ``vespo_k_neg=3``, ``vespo_lambda_neg=2``).
    TRL additionally clamps λ ≥ 1e-4, each token's log-ratio to ±20, each log ρ̄_t of its vLLM
    correction to [log 1e-8, 20] and log W to [log 1e-8, 20]; rpg does not. The two agree wherever no
    such clamp binds (λ ≥ 1e-4, |log w_t| ≤ 20, 1e-8 ≤ W ≤ e^20, no token masked by the correction);
    where W < 1e-8 (e.g. a masked token: ρ̄_t = 0, rpg's W = 0) TRL's φ is e^λ·1e-8^k instead of ≈ 0:
    1.6e-8 at k = 1, λ = 0.5; below 1e-15 at its default k ≥ 2.
    """

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        for name in ("k_pos", "lambda_pos", "k_neg", "lambda_neg"):
            v = _check_bound(f"Gamma.{name}", getattr(self, name), lambda x: 0 <= x < _INF, f"0 <= {name} < inf")
            if v is None:
                raise TypeError(f"Gamma.{name} must be a real number, got None")
            object.__setattr__(self, name, v)

    def log_phi(self, log_w: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """log φ(W) = k·log W − λ·(W − 1) with the (k, λ) of each token's branch (``up``: A ≥ 0).

        Limits, exactly: a term with k = 0 (λ = 0) is 0 even where log W = −∞ (W = ∞)."""
        zero = torch.zeros((), dtype=log_w.dtype, device=log_w.device)
        k = torch.where(up, self.k_pos, self.k_neg).to(log_w.dtype)
        lam = torch.where(up, self.lambda_pos, self.lambda_neg).to(log_w.dtype)
        power = torch.where(k == 0, zero, k * log_w)
        decay = torch.where(lam == 0, zero, lam * torch.expm1(log_w))
        return power - decay


def _log_bounds(clip, up: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [`Clip`][rpg.clipping.Clip]'s bounds on log w per branch: A ≥ 0 → (−∞, log(1+ε_high)),
    A < 0 → (log(1−ε_low), log c_dual); an absent bound is ±∞."""
    lo = -_INF if clip.low is None else math.log1p(-clip.low)
    hi = _INF if clip.high is None else math.log1p(clip.high)
    dual = _INF if clip.dual is None else math.log(clip.dual)

    def full(v):
        return torch.full((), v, dtype=like.dtype, device=like.device)

    return torch.where(up, full(-_INF), full(lo)), torch.where(up, full(hi), full(dual))


def geometric_log_ratio(log_w: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip=None):
    r"""GMPO's log s_b = (1/n_b)·Σ_t log m_bt and the clipped tokens.

    Args:
        log_w: ``[B, T]`` log π_θ − log π_old (detached).
        advantages: ``[B, 1]`` or ``[B, T]``; the sign of each token's A picks its clip branch.
        mask: ``[B, T]`` bool.
        clip: a [`Clip`][rpg.clipping.Clip] or ``None`` (no clip: s is GSPO's unclipped ratio).

    Returns:
        ``(log_s, cut)``: ``[B, 1]`` log of the geometric mean of the clipped token ratios (0 for an
        empty row), and ``[B, T]`` bool, the tokens whose log-ratio was clipped (``None`` without a clip).
    """
    zero = torch.zeros((), dtype=log_w.dtype, device=log_w.device)
    cut = None
    log_m = log_w
    if clip is not None:
        lo, hi = _log_bounds(clip, advantages >= 0, log_w)
        log_m = torch.maximum(torch.minimum(log_w, hi), lo)
        cut = log_m != log_w
    n = mask.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(mask, log_m, zero).sum(-1, keepdim=True) / n, cut


def product_log_ratio(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` log W_b = Σ_t log w_bt over the response's tokens: the log of π_θ(y)/π_old(y)."""
    return torch.where(mask, log_w, torch.zeros((), dtype=log_w.dtype, device=log_w.device)).sum(-1, keepdim=True)


def correction_log_weight(weight: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    r"""``[B, 1]`` log of a rollout correction's weight of a whole sequence, for ``ratio="product"``.

    With a behaviour policy μ the product ratio takes the correction inside the sequence ratio,
    W = Π_t w_t · ρ̄(y), rather than as a multiplier of each token's loss (TRL's VESPO): ρ̄(y) = Π_t ρ̄_t
    for a token-level correction (each ρ̄_t truncated or masked as configured) and ρ̄_seq for a
    sequence-level one. A rejected token (weight 0) gives log 0 = −∞: W = 0 for its sequence.
    Without a kernel (φ(W) = W) and with the untruncated sequence weight this is π_θ(y)/μ(y), exact."""
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    log_w = torch.where(mask, torch.log(weight), zero).sum(-1, keepdim=True)
    if level == "sequence":  # the same weight at each token: once per sequence
        log_w = log_w / mask.sum(-1, keepdim=True).clamp_min(1)
    return log_w


def sequence_token_loss(r, advantages: torch.Tensor, mask: torch.Tensor, cfg, pg_scale=None, seq_log_weight=None):
    r"""Per-token ``(value, grad)`` for ``ratio="geometric"`` or ``ratio="product"`` (fresh ``[B, T]`` tensors).

    * ``"geometric"`` (differentiable): value −s_b·A_bt, derivative −s_b·A_bt where token t is not
      clipped (0 where it is), plus the KL term per token.
    * ``"product"`` (REINFORCE): g_bt = φ(W_b)·A_bt − β·(w_bt·per_w + const) (the KL term's
      REINFORCE weight per token, as for ``style="reinforce"``), value −g·logp, derivative −g; with
      ``separate_kl`` the KL term is instead added beside it as β·surrogate (``pg_scale`` on the first
      term only).

    ``r`` is the batch's `rpg.objectives.Ratios`; ``pg_scale`` as in ``rpg._kernel.token_loss``;
    ``seq_log_weight`` (``[B, 1]`` or ``None``) is added to log W: the rollout correction's log-weight
    of the sequence, so that W is the ratio against the behaviour policy (see
    [`correction_log_weight`][rpg.sequence.correction_log_weight]).
    """
    adv = advantages.expand_as(r.log_w)
    if cfg.ratio == "geometric":
        log_s, cut = geometric_log_ratio(r.log_w, advantages, mask, cfg.clip)
        s = log_s.exp()
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        value = torch.where(adv == 0, zero, -(s * adv))  # A = 0 gives 0, even where s overflowed
        grad = value.clone()
        if cut is not None:
            grad.masked_fill_(cut, 0)
        if pg_scale is not None:
            zero_w = pg_scale == 0
            value.mul_(pg_scale).masked_fill_(zero_w, 0)
            grad.mul_(pg_scale).masked_fill_(zero_w, 0)
        if cfg.has_kl:
            REGISTRY[cfg.kl].accumulate(value, grad, cfg.beta, r)
        return value, grad
    log_big_w = product_log_ratio(r.log_w, mask)
    if seq_log_weight is not None:
        log_big_w = log_big_w + seq_log_weight
    if cfg.kernel is not None:
        weight = cfg.kernel.log_phi(log_big_w.expand_as(r.log_w), adv >= 0).exp()
    else:
        weight = log_big_w.exp().expand_as(r.log_w)
    g = torch.where(adv == 0, torch.zeros((), dtype=adv.dtype, device=adv.device), weight * adv)
    if cfg.has_kl and not cfg.separate_kl:
        per_w, const = REGISTRY[cfg.kl].split(r)
        if isinstance(per_w, torch.Tensor) or per_w != 0:
            g = g - cfg.beta * r.w * per_w
        if isinstance(const, torch.Tensor) or const != 0:
            g = g - cfg.beta * const
    value, grad = -(g * r.logp), -g
    if cfg.has_kl and cfg.separate_kl:  # the KL term beside −sg(φ(W)·A)·logp (TRL's VESPO with β ≠ 0)
        if pg_scale is not None:  # weight_kl=False: the multipliers act on the policy term only
            zero_w = pg_scale == 0
            value.mul_(pg_scale).masked_fill_(zero_w, 0)
            grad.mul_(pg_scale).masked_fill_(zero_w, 0)
        REGISTRY[cfg.kl].accumulate(value, grad, cfg.beta, r)
    return value, grad
