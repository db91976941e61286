r"""The fast path: one pass computing each per-token loss and its derivative (DESIGN §7).

Every per-token loss in ``rpg`` is a scalar function of the scalar ``logp``, so its
derivative is closed-form. :func:`token_loss` composes the pieces of
:mod:`rpg.objectives` and :mod:`rpg.clipping` into ``(value, dvalue/dlogp)``
in one pass with no autograd graph; :class:`TokenLoss` wraps that in one
``torch.autograd.Function`` that saves a single tensor (the derivative) for
backward. The plain-autograd version of the same formulas lives in
``tests/reference.py`` and the two agree to 1e-12 in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .clipping import Clip, Truncate, codes, ppo, rpg_clip, truncate
from .objectives import kl_accumulate, kl_grad_split


@dataclass(frozen=True)
class Spec:
    """The settings the kernel needs (hashable, so ``torch.compile`` treats it as a constant)."""

    kl: str | None
    beta: float
    style: str
    clip: Clip | Truncate | None
    fold_kl: bool
    ratio: str = "token"


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def sequence_log_ratio(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` masked mean over tokens of log w: the log of GSPO's sequence ratio s."""
    n = mask.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(mask, log_w, _zero(log_w)).sum(-1, keepdim=True) / n


def _reinforce_weight(logp, old_logp, ref_logp, log_w, w, adv, spec: Spec) -> torch.Tensor:
    """g = −∂ℓ_diff/∂logp (a fresh tensor), with w̄ in place of w under :class:`Truncate`."""
    has_kl = spec.kl is not None and spec.beta != 0
    if isinstance(spec.clip, Truncate):
        # g = w̄·(A − β·per_w) − β·const: only the importance weight is truncated.
        w_bar = truncate(log_w, spec.clip).exp()
        if not has_kl:
            return w_bar.mul_(adv)
        per_w, const = kl_grad_split(spec.kl, logp, old_logp, ref_logp, log_w)
        return w_bar.mul_(adv - spec.beta * per_w).sub_(spec.beta * const)
    g = w * adv
    if has_kl:
        kl_accumulate(spec.kl, None, g, -spec.beta, logp, old_logp, ref_logp, log_w, w)
    return g


def _advantage_analogue(logp, ref_logp, log_w, adv, spec: Spec):
    """Â for the PPO clip and its derivative in logp: A and None, or g/w with gradient −β (fold_kl; rkl/urkl)."""
    if spec.fold_kl and spec.kl is not None and spec.beta != 0:
        log_rho = log_w if ref_logp is None else logp - ref_logp
        return adv - spec.beta * (log_rho + 1 if spec.kl == "rkl" else log_rho), -spec.beta
    return adv, None


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: Spec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(value, grad)`` for ``spec``, before masking; both fresh ``[B, T]`` tensors.

    With ``spec.ratio == "sequence"`` (GSPO) the policy-gradient term uses the sequence
    ratio s = exp(mean_t log w) in place of w, with GSPO-token's derivative
    ∂ℓ_t/∂logp_t = −s·A (s_t = sg(s)·π_θ(y_t)/sg(π_θ(y_t))); a KL term stays per token.
    Written to allocate few tensors (on CPU a fresh tensor costs more than the math).
    """
    log_w = logp - old_logp
    w = log_w.exp()
    if spec.style == "reinforce":
        g = _reinforce_weight(logp, old_logp, ref_logp, log_w, w, advantages, spec)
        value = torch.addcmul(_zero(g), g, logp, value=-1)
        clipped = rpg_clip(w, g, spec.clip) if isinstance(spec.clip, Clip) else None
        grad = g.neg_()
        if clipped is not None:
            grad.masked_fill_(clipped, 0)
        return value, grad

    # Differentiable style: PPO / dual clip on −w·Â, KL surrogate outside the clip
    # (default) or folded into Â = g/w with gradient through it (fold_kl, rkl/urkl).
    adv, d_adv = _advantage_analogue(logp, ref_logp, log_w, advantages, spec)
    w_pg = sequence_log_ratio(log_w, mask).exp().expand_as(w) if spec.ratio == "sequence" else w
    grad = torch.addcmul(_zero(w), w_pg, adv, value=-1)  # −w·Â, one pass
    if spec.clip is None:
        m, value = w_pg, grad.clone()
    else:
        m, clipped = ppo(w_pg, adv, spec.clip)
        grad.masked_fill_(clipped, 0)
        value = torch.addcmul(_zero(w), m, adv, value=-1)
    if d_adv is not None:
        grad.sub_(m, alpha=d_adv)
    elif spec.kl is not None and spec.beta != 0:
        kl_accumulate(spec.kl, value, grad, spec.beta, logp, old_logp, ref_logp, log_w, w)
    return value, grad


def clip_codes(logp, old_logp, ref_logp, advantages, mask, spec: Spec) -> torch.Tensor | None:
    """The ``int8`` clip code of every token (for the metrics), or ``None`` without a clip."""
    if spec.clip is None:
        return None
    log_w = logp - old_logp
    w = log_w.exp()
    if spec.style == "reinforce":
        direction = None
        if not isinstance(spec.clip, Truncate):
            direction = _reinforce_weight(logp, old_logp, ref_logp, log_w, w, advantages, spec)
        return codes(w, direction, spec.clip)
    if spec.ratio == "sequence":
        w = sequence_log_ratio(log_w, mask).exp().expand_as(w)
    return codes(w, _advantage_analogue(logp, ref_logp, log_w, advantages, spec)[0].expand_as(w), spec.clip)


class TokenLoss(torch.autograd.Function):
    """Per-token loss with a closed-form backward; gradient flows to ``logp`` only.

    ``forward(logp, old_logp, ref_logp, advantages, mask, spec) -> per_token``:
    ``per_token`` is 0 wherever ``mask`` is False (``masked_fill``, so NaN/inf
    there never leak). Saves one tensor for backward: the masked derivative.
    """

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, mask, spec):  # noqa: D102
        value, grad = token_loss(logp, old_logp, ref_logp, advantages, mask, spec)
        padding = ~mask
        value.masked_fill_(padding, 0)  # both are fresh [B, T] tensors: in place is safe
        grad.masked_fill_(padding, 0)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_value):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad_value * grad, None, None, None, None, None
