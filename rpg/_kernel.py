r"""The fast path: one pass computing each per-token loss and its derivative (private).

Every per-token loss in ``rpg`` is a scalar function of the scalar ``logp``, so its
derivative is closed-form. :func:`token_loss` composes the KL terms of
:mod:`rpg.objectives` (through their registry records) and the clip rule of
:mod:`rpg.clipping` (through its methods) into ``(value, dvalue/dlogp)`` in one
pass with no autograd graph; :class:`TokenLoss` wraps that in one
``torch.autograd.Function`` that saves a single tensor (the derivative) for
backward. :func:`clip_view` decides which ratio and which sign the clip sees;
the kernel and the metrics both call it, so clip fractions can never disagree
with the loss. The plain-autograd version of the same formulas lives in
``tests/reference.py`` and the two agree to 1e-12 in float64.

Limits, evaluated exactly: a ``logp`` of −∞ (a token the policy cannot emit) is
evaluated at the most negative finite number of its dtype, so w = 0 and every
product w·log ρ, w·k3, g·logp takes its limit 0 instead of 0·∞ = NaN; terms whose
limit is infinite stay infinite. Under RPG-Style Clip a clipped token keeps its
value −g·logp (detached); where w overflows the dtype (|log w| ≳ 88 in float32)
that value is not finite, and the token takes the value at the bound instead,
−A′·m·logp (Algorithm 2 prints it so), which is — the gradient is 0 either way.
"""

from __future__ import annotations

import math

import torch

from .config import LossConfig
from .objectives import Ratios
from .sequence import sequence_token_loss


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def sequence_log_ratio(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` masked mean over tokens of log w: the log of GSPO's sequence ratio s."""
    n = mask.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(mask, log_w, _zero(log_w)).sum(-1, keepdim=True) / n


def reinforce_weight(r: Ratios, adv: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """g = −∂ℓ_diff/∂logp (a fresh tensor) in the split form g = w̄·(A − β·per_w) − β·const.

    w̄ is the clip rule's weight where it truncates, else w itself. The split form is as cheap as
    accumulating the KL derivative into w·A, and never forms ∞ − ∞ where w overflows (the two terms
    share the factor w), so the sign of g is that of A′ = g/w even then."""
    w_bar = cfg.clip.reinforce_ratio(r.log_w, adv) if cfg.clip is not None else None
    fresh = w_bar is not None  # a truncated weight is a fresh tensor: multiply it in place
    if w_bar is None:
        w_bar = r.w
    if not cfg.has_kl or cfg.separate_kl:  # a separate KL term is added by the kernel, outside g
        return w_bar.mul_(adv) if fresh else w_bar * adv
    per_w, const = cfg.kl_term.split(r)
    a = adv - cfg.beta * per_w if isinstance(per_w, torch.Tensor) or per_w != 0 else adv
    g = w_bar.mul_(a) if fresh and a.shape == w_bar.shape else w_bar * a
    if isinstance(const, torch.Tensor) or const != 0:
        g = g.sub_(cfg.beta * const)
    return g


def effective_advantage(r: Ratios, adv: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """A′ = g/w, formed without dividing by w: A − β·per_w − β·const/w (finite where w overflows)."""
    if not cfg.has_kl or cfg.separate_kl:
        return adv.expand_as(r.log_w)
    per_w, const = cfg.kl_term.split(r)
    a = adv - cfg.beta * per_w
    if isinstance(const, torch.Tensor) or const != 0:
        a = a - cfg.beta * const * torch.exp(-r.log_w)
    return a.expand_as(r.log_w)


def _fold(cfg: LossConfig, r: Ratios) -> torch.Tensor:
    """The KL term's fold shift (the configuration allows ``fold_kl`` only for terms that have one)."""
    fold = cfg.kl_term.fold
    if fold is None:
        raise ValueError(f"kl={cfg.kl!r} cannot be folded into the clipped advantage")
    return fold(r)


def clip_view(r: Ratios, adv: torch.Tensor, mask: torch.Tensor, cfg: LossConfig):
    """Which ratio, which sign and which token probabilities the clip sees: ``(ratio, direction, ratios)``.

    REINFORCE style: (w, g, r), g the REINFORCE weight, whose sign is that of A′ = g/w; with
    ``ratio="sequence"`` (w, r) are the sequence ratio s and ``None``, so g = w̄(s)·A (the KL term,
    if any, is then separate: ``separate_kl=True``). Differentiable style: (w, or GSPO's sequence ratio s; Â, the advantage analogue — A, or
    A − β·fold with ``fold_kl``; r, or ``None`` for a sequence ratio). The kernel builds the loss
    from exactly these, and the metrics count clipped tokens from them."""
    if cfg.style == "reinforce":
        if cfg.ratio == "sequence":  # CISPO on the sequence ratio: g = w̄(s)·A for every token
            log_s = sequence_log_ratio(r.log_w, mask).expand_as(r.log_w)
            seq = Ratios(r.logp, r.old_logp, r.ref_logp, log_w=log_s)
            return seq.w, reinforce_weight(seq, adv, cfg), None
        return r.w, reinforce_weight(r, adv, cfg), r
    if cfg.fold_kl and cfg.has_kl:
        adv = adv - cfg.beta * _fold(cfg, r)
    if cfg.ratio == "sequence":
        return sequence_log_ratio(r.log_w, mask).exp().expand_as(r.w), adv, None
    return r.w, adv, r


def clip_codes(r: Ratios, adv: torch.Tensor, mask: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """``int8`` clip code per token for the metrics (0 none, 1 low, 2 high, 3 dual), from the loss's own
    view ([`clip_view`][rpg._kernel.clip_view]); a rule whose bounds follow the sign of the advantage
    (``branch_on_advantage``: [`SignedTruncate`][rpg.clipping.SignedTruncate]) reads A itself, as the
    kernel does, not the sign of the REINFORCE weight g (they differ where a KL term outweighs A)."""
    if cfg.clip is None:
        raise ValueError("clip_codes needs a clip rule (cfg.clip is None)")
    ratio, direction, anchor = clip_view(r, adv, mask, cfg)
    if cfg.clip.branch_on_advantage:
        direction = adv.expand_as(ratio)
    return cfg.clip.codes(ratio, direction, anchor)


def ratios(logp, old_logp, ref_logp) -> Ratios:
    """:class:`Ratios` with a −∞ ``logp`` moved to the dtype's most negative finite value.

    (A −∞ ``ref_logp`` needs no such care: every term then takes its limit or its true infinite
    value as computed, except ufkl's c·(ρ − 1 − log ρ), whose record handles it.)"""
    lo = torch.finfo(logp.dtype).min
    if ref_logp is not None:  # π_θ = π_ref = 0 at a token: the same finite stand-in, log(π_θ/π_ref) = 0, not ∞ − ∞
        ref_logp = torch.where(logp == -math.inf, ref_logp.clamp_min(lo), ref_logp)
    return Ratios(logp.clamp_min(lo), old_logp, ref_logp)


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    pg_scale: torch.Tensor | None = None,
    seq_log_weight: torch.Tensor | None = None,
    kl_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(value, grad)`` for ``cfg``, before masking and weighting; both fresh ``[B, T]`` tensors.

    ``pg_scale`` (a KL term separate from the policy-gradient term: differentiable style without
    ``fold_kl``, or ``separate_kl``) multiplies the policy-gradient term only, before the KL
    term is added (``cfg.weight_kl=False``: the multipliers leave the KL term unweighted).

    With ``cfg.ratio == "sequence"`` (GSPO) the policy-gradient term uses the sequence
    ratio s = exp(mean_t log w) in place of w, with GSPO-token's derivative
    ∂ℓ_t/∂logp_t = −s·A (s_t = sg(s)·π_θ(y_t)/sg(π_θ(y_t))); a KL term stays per token.
    Written to allocate few tensors (on CPU a fresh tensor costs more than the math).
    """
    r = ratios(logp, old_logp, ref_logp)
    if cfg.ratio in ("geometric", "product"):  # GMPO, VESPO: rpg.sequence
        return sequence_token_loss(r, advantages, mask, cfg, pg_scale, seq_log_weight, kl_scale)
    logp = r.logp
    ratio, direction, anchor = clip_view(r, advantages, mask, cfg)
    if cfg.style == "reinforce":
        g = direction
        value = torch.addcmul(_zero(g), g, logp, value=-1)
        clip = cfg.clip
        clipped = clip.reinforce_clipped(ratio, g, anchor) if clip is not None else None
        grad = g.neg_()
        if clip is not None and clipped is not None:
            grad.masked_fill_(clipped, 0)
            # A clipped token keeps its value −g·logp, detached; where w overflowed the dtype (g
            # not finite) it takes the value at the bound, −A′·m·logp (Algorithm 2), which is finite.
            # On a CPU, eagerly, one reduction tells whether any value overflowed (no sync there);
            # elsewhere the fallback is always formed, so no host-device sync is ever needed.
            eager_cpu = (
                value.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and not torch._C._are_functorch_transforms_active()
            )
            if not eager_cpu or not torch.isfinite(value.sum()):
                overflow = clipped & ~torch.isfinite(value)
                a_eff = effective_advantage(r, advantages, cfg)
                m, _ = clip.effective_ratio(ratio, a_eff, anchor)
                value = torch.where(overflow, -(a_eff * m * logp), value)
        if cfg.separate_kl and cfg.has_kl:  # the KL term outside g, as in the differentiable style
            if pg_scale is not None:
                zero_w = pg_scale == 0
                value.mul_(pg_scale).masked_fill_(zero_w, 0)
                grad.mul_(pg_scale).masked_fill_(zero_w, 0)
            cfg.kl_term.accumulate(value, grad, cfg.beta, r)
        return value, grad

    # Differentiable style: the clip rule's effective ratio on −w·Â, the KL surrogate outside
    # the clip (default) or folded into Â = g/w with gradient through it (fold_kl).
    adv = direction
    grad = torch.addcmul(_zero(ratio), ratio, adv, value=-1)  # −w·Â, one pass
    if cfg.clip is None:
        m, value = ratio, grad.clone()
    else:
        m, cut = cfg.clip.effective_ratio(ratio, adv, anchor)
        if cut is not None and cut.dtype == torch.bool:  # a hard clip: no gradient through w there
            grad.masked_fill_(cut, 0)
        elif cut is not None:  # a smooth gate or a kept gradient: the rule's slope ∂m/∂logp
            grad = torch.mul(cut, adv).neg_()
        value = torch.addcmul(_zero(ratio), m, adv, value=-1)
    if pg_scale is not None:  # a weight of 0 gives exactly 0, even where the term is not finite
        zero_w = pg_scale == 0
        value.mul_(pg_scale).masked_fill_(zero_w, 0)
        grad.mul_(pg_scale).masked_fill_(zero_w, 0)
    if cfg.fold_kl and cfg.has_kl:
        grad.add_(m, alpha=cfg.beta)  # −m·∂Â/∂logp with ∂Â/∂logp = −β
    elif cfg.has_kl:
        cfg.kl_term.accumulate(value, grad, cfg.beta, r)
    return value, grad


class TokenLoss(torch.autograd.Function):
    """Per-token loss with a closed-form backward; gradient flows to ``logp`` only.

    ``apply(logp, old_logp, ref_logp, advantages, mask, scale, cfg) -> per_token``:
    ``per_token`` is ``scale``·ℓ (``scale`` a constant ``[B, T]`` weight or ``None``) and 0
    wherever ``mask`` is False or ``scale`` is 0 (``masked_fill``, so NaN/inf there never leak). Saves one
    tensor for backward: the masked, scaled derivative.

    Second derivatives: in the REINFORCE style every per-token loss is linear in ``logp``
    (ℓ = −sg(g)·logp), so its second derivative is exactly 0 and double backward returns
    that. In the differentiable style, and in the REINFORCE style with a separate KL term
    (``separate_kl``), it is not: differentiating the backward again raises a clear error
    instead of returning a silent 0.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        logp, old_logp, ref_logp, advantages, mask, scale, cfg, seq_log_weight=None, kl_scale=None, pg_keep=None
    ):
        pg_only = scale is not None and not cfg.weight_kl and cfg.has_kl
        pg_scale = scale if pg_only else None
        if pg_keep is not None:  # tokens whose policy-gradient term is dropped (Clip-Cov); a KL term stays
            pg_scale = pg_keep.to(logp.dtype) if pg_scale is None else torch.where(pg_keep, pg_scale, _zero(logp))
        value, grad = token_loss(logp, old_logp, ref_logp, advantages, mask, cfg, pg_scale, seq_log_weight, kl_scale)
        padding = ~mask
        if scale is not None and not pg_only:  # value and grad are fresh tensors: in place is safe
            value.mul_(scale)
            grad.mul_(scale)
            padding = padding | (scale == 0)  # a weight of 0 gives exactly 0, even where ℓ is inf
        return value.masked_fill_(padding, 0), grad.masked_fill_(padding, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # The derivative (output 1) is saved as an output: under create_graph it is unpacked as a
        # function of logp through this node, so differentiating the backward again lands in
        # backward() below with a gradient for output 1 — where it raises, or is exactly 0.
        ctx.save_for_backward(output[1])
        ctx.set_materialize_grads(False)
        # ℓ = −sg(g)·logp is linear in logp in the REINFORCE style (ratio="product" too), unless a
        # separate KL term (separate_kl) is added to it
        cfg = inputs[6]
        ctx.linear = cfg.style == "reinforce" and not (cfg.separate_kl and cfg.has_kl)
        ctx.separate = cfg.style == "reinforce" and not ctx.linear  # names the cause if it raises

    @staticmethod
    def backward(ctx, grad_value, grad_of_grad):
        # (Under torch.compile the traced backward may carry a zero gradient for output 1: not a second
        # derivative, so it is not checked there.)
        if grad_of_grad is not None and not ctx.linear and not torch.compiler.is_compiling():
            what = (
                "a style='reinforce' loss with a separate KL term (separate_kl=True, e.g. DROLoss's penalty)"
                if ctx.separate
                else "a style='differentiable' loss"
            )
            raise RuntimeError(
                f"rpg: second derivatives of {what} are not implemented (its per-token loss is not linear in "
                "logp, and a silent 0 would be wrong); the REINFORCE-style losses without separate_kl are linear "
                "in logp and support double backward exactly (the second derivative is 0)"
            )
        if grad_value is None:
            return None, None, None, None, None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        return grad_value * grad, None, None, None, None, None, None, None, None, None


def per_token_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    scale,
    cfg: LossConfig,
    seq_log_weight=None,
    kl_scale=None,
    pg_keep=None,
) -> torch.Tensor:
    """The differentiable ``[B, T]`` per-token loss (the kernel's value, gradient to ``logp`` only).

    ``seq_log_weight`` and ``kl_scale``: ``ratio="product"``'s rollout correction, in the sequence ratio
    and on the per-token KL term ([`sequence_token_loss`][rpg.sequence.sequence_token_loss]). ``pg_keep``:
    bool ``[B, T]``, False where the policy-gradient term alone is dropped (Clip-Cov's selection; the
    KL term, if any, stays there, and ``scale`` still multiplies it)."""
    return TokenLoss.apply(logp, old_logp, ref_logp, advantages, mask, scale, cfg, seq_log_weight, kl_scale, pg_keep)[0]
