r"""The fast path: one pass computing each per-token loss and its derivative (DESIGN §7).

Every per-token loss in ``rpg`` is a scalar function of the scalar ``logp``, so its
derivative is closed-form. :func:`token_loss` composes the pieces of
:mod:`rpg.objectives` and :mod:`rpg.clipping` into ``(value, dvalue/dlogp, clip code)``
in one pass with no autograd graph; :class:`TokenLoss` wraps that in one
``torch.autograd.Function`` that saves a single tensor (the derivative) for
backward. The plain-autograd version of the same formulas lives in
``tests/reference.py`` and the two agree to 1e-12 in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .clipping import Clip, Truncate, ppo, rpg_clip, truncate
from .objectives import kl_grad_split, kl_value_and_grad


@dataclass(frozen=True)
class Spec:
    """The settings the kernel needs (hashable, so ``torch.compile`` treats it as a constant)."""

    kl: str | None
    beta: float
    style: str
    clip: Clip | Truncate | None
    fold_kl: bool
    ratio: str = "token"


def sequence_log_ratio(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` masked mean over tokens of log w: the log of GSPO's sequence ratio s."""
    zero = torch.zeros((), dtype=log_w.dtype, device=log_w.device)
    n = mask.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(mask, log_w, zero).sum(-1, keepdim=True) / n


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: Spec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token ``(value, grad, code)`` for ``spec`` (unmasked; ``code`` is None without a clip).

    With ``spec.ratio == "sequence"`` (GSPO) the policy-gradient term uses the sequence
    ratio s = exp(mean_t log w) in place of w, with GSPO-token's derivative
    ∂ℓ_t/∂logp_t = −s·A (s_t = sg(s)·π_θ(y_t)/sg(π_θ(y_t))); a KL term stays per token.
    """
    log_w = logp - old_logp
    log_c = torch.zeros_like(log_w) if ref_logp is None else ref_logp - old_logp
    w = log_w.exp()
    adv = advantages
    has_kl = spec.kl is not None and spec.beta != 0
    code = None
    if spec.style == "reinforce":
        if isinstance(spec.clip, Truncate):
            # g = w̄·(A − β·per_w) − β·const: only the importance weight is truncated.
            log_w_bar, code = truncate(log_w, spec.clip)
            per_w, const = kl_grad_split(spec.kl, log_w, log_c) if has_kl else (0.0, 0.0)
            g = log_w_bar.exp() * (adv - spec.beta * per_w) - spec.beta * const
        else:
            g = w * adv
            if has_kl:
                g = g - spec.beta * kl_value_and_grad(spec.kl, log_w, log_c, logp)[1]
        value = -g * logp
        if isinstance(spec.clip, Clip):
            keep, code = rpg_clip(w, g, spec.clip)
            return value, torch.where(keep, -g, torch.zeros_like(g)), code
        return value, -g, code

    # Differentiable style: PPO / dual clip on −w·Â, KL surrogate outside the clip
    # (default) or folded into Â = g/w with gradient through it (fold_kl, rkl/urkl).
    kl_v = kl_g = d_adv = None
    if has_kl and spec.fold_kl:
        log_rho = log_w - log_c
        adv = adv - spec.beta * (log_rho + 1 if spec.kl == "rkl" else log_rho)
        d_adv = -spec.beta
    elif has_kl:
        kl_v, kl_g = kl_value_and_grad(spec.kl, log_w, log_c, logp)
    w_pg = sequence_log_ratio(log_w, mask).exp().expand_as(w) if spec.ratio == "sequence" else w
    if spec.clip is None:
        m, w_adv = w_pg, w_pg * adv
    else:
        m, unclipped, code = ppo(w_pg, adv, spec.clip)
        w_adv = torch.where(unclipped, w_pg * adv, torch.zeros_like(w))
    value, grad = -m * adv, -w_adv
    if kl_v is not None:
        value, grad = value + spec.beta * kl_v, grad + spec.beta * kl_g
    if d_adv is not None:
        grad = grad - m * d_adv
    return value, grad, code


class TokenLoss(torch.autograd.Function):
    """Per-token loss with a closed-form backward; gradient flows to ``logp`` only.

    ``forward(logp, old_logp, ref_logp, advantages, mask, spec) -> (per_token, code)``:
    ``per_token`` is 0 wherever ``mask`` is False (``torch.where``, so NaN/inf
    there never leak); ``code`` is the int8 clip code (non-differentiable).
    Saves one tensor for backward: the masked derivative.
    """

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, mask, spec):  # noqa: D102
        value, grad, code = token_loss(logp, old_logp, ref_logp, advantages, mask, spec)
        zero = torch.zeros((), dtype=value.dtype, device=value.device)
        value = torch.where(mask, value, zero)
        grad = torch.where(mask, grad, zero)
        if code is None:
            code = torch.zeros((0,), dtype=torch.int8, device=value.device)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(code)
        return value, code

    @staticmethod
    def backward(ctx, grad_value, grad_code):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad_value * grad, None, None, None, None, None
