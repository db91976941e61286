"""Plain-autograd reference of every rpg per-token loss, transcribed from docs/objectives.md and docs/clipping.md.

No closed-form derivatives here: gradients come from autograd through the
formulas as printed (stop-gradient = ``detach``). The fused kernel must agree
with this to 1e-12 in float64 (``tests/test_losses.py``).
"""

from __future__ import annotations

import torch

import rpg


def kl_surrogate(div, logp, old_logp, ref_logp):
    """docs/objectives.md table, differentiable column minus the −w·A term, β excluded."""
    w = (logp - old_logp).exp()
    log_rho = logp - ref_logp
    rho = log_rho.exp()
    c = (ref_logp - old_logp).exp()
    return {
        "fkl": -c * logp,
        "rkl": w * log_rho,
        "ufkl": c * (rho - 1 - log_rho),
        "urkl": w * (1 / rho - 1 + log_rho),
    }[div]


def reinforce_g(div, adv, beta, w, log_rho, c):
    """docs/objectives.md REINFORCE weights g."""
    return {
        "fkl": w * adv + beta * c,
        "rkl": w * (adv - beta * (log_rho + 1)),
        "ufkl": w * adv - beta * (w - c),
        "urkl": w * (adv - beta * log_rho),
    }[div]


def ppo_term(w, adv_hat, clip):
    """Algorithm 1 dual clip, written with max/min as the paper prints it."""
    if clip is None:
        return -w * adv_hat
    lo = 1 - clip.low if clip.low is not None else None
    hi = 1 + clip.high if clip.high is not None else None
    loss = torch.maximum(-w * adv_hat, -w.clamp(min=lo, max=hi) * adv_hat) if (lo or hi) else -w * adv_hat
    if clip.dual is not None:
        loss = torch.where(adv_hat < 0, torch.minimum(loss, -clip.dual * adv_hat), loss)
    return loss


def per_token(logp, old_logp, adv, mask, *, kl, beta, style, clip, fold_kl=False, ref_logp=None):
    """Reference per-token loss, masked with torch.where; ``adv`` is ``[B]`` or ``[B, T]``."""
    if ref_logp is None:
        ref_logp = old_logp
    if adv.dim() == 1:
        adv = adv[:, None]
    adv = adv.expand_as(logp)
    assert old_logp.shape == ref_logp.shape == mask.shape == logp.shape, "reference: inputs must share [B, T]"
    old_logp, ref_logp = old_logp.detach(), ref_logp.detach()
    w = (logp - old_logp).exp()
    c = (ref_logp - old_logp).exp()
    log_rho = logp - ref_logp
    if style == "differentiable":
        if fold_kl and kl is not None:
            adv_hat = adv - beta * (log_rho + 1 if kl == "rkl" else log_rho)
            loss = ppo_term(w, adv_hat, clip)
        else:
            loss = ppo_term(w, adv, clip)
            if kl is not None:
                loss = loss + beta * kl_surrogate(kl, logp, old_logp, ref_logp)
    else:
        wd = w.detach()
        if isinstance(clip, rpg.Truncate):
            # docs/clipping.md: g uses sg(clip(w)) in place of w; ρ and c are other symbols and stay.
            lo = 1 - clip.low if clip.low is not None else None
            hi = 1 + clip.high if clip.high is not None else None
            wd = wd.clamp(min=lo, max=hi)
        lr = log_rho.detach()
        g = reinforce_g(kl, adv, beta, wd, lr, c) if kl is not None else wd * adv
        g = g.detach()
        loss = -g * logp
        if isinstance(clip, rpg.Clip):
            # Algorithm 2: branch on the effective advantage A' = g / w.
            a_eff = g / wd
            hi = 1 + clip.high if clip.high is not None else float("inf")
            lo = 1 - clip.low if clip.low is not None else float("-inf")
            dual = clip.dual if clip.dual is not None else float("inf")
            keep = torch.where(a_eff >= 0, wd < hi, (wd > lo) & (wd < dual))
            loss = torch.where(keep, loss, loss.detach())
    return torch.where(mask.bool(), loss, torch.zeros_like(loss))


# --- token-level families (SAPO, GPPO / CE-GPPO, TOPR, DRO, prime-rl), as their papers print them ----------


def sapo_term(w, adv, tau_pos, tau_neg):
    """SAPO: −f(w)·A, f(w) = (4/τ)·σ(τ(w − 1)), τ = τ_pos where A > 0 else τ_neg; autograd through σ."""
    tau = torch.where(adv > 0, torch.full_like(w, tau_pos), torch.full_like(w, tau_neg))
    return -(4 / tau) * torch.sigmoid(tau * (w - 1)) * adv


def sequence_ratio_tokens(logp, old_logp, mask):
    """GSPO-token's s_t = sg(s)·π_θ/sg(π_θ), s = exp(masked mean of log w): value s, ∂s_t/∂logp_t = s."""
    log_w = torch.where(mask.bool(), logp - old_logp, torch.zeros_like(logp))
    log_s = (log_w.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)).detach()
    return (log_s + logp - logp.detach()).exp()


def gppo_term(w, adv, low, high, beta_low, beta_high):
    """GPPO / CE-GPPO in the sg-form: a clipped token is bound + β·bound·(w/sg(w) − 1) (value: the bound)."""
    hi, lo = 1 + high, 1 - low
    w_d = w.detach()
    kept_hi = hi + beta_high * hi * (w / w_d - 1)
    kept_lo = lo + beta_low * lo * (w / w_d - 1)
    m = torch.where((adv >= 0) & (w_d > hi), kept_hi, torch.where((adv < 0) & (w_d < lo), kept_lo, w))
    return -m * adv


def topr_term(logp, old_logp, adv):
    """TOPR: −A·logp for A > 0, −sg(clip(w, 0, 1))·A·logp for A ≤ 0."""
    w = (logp - old_logp).exp().detach()
    w_bar = torch.where(adv > 0, torch.ones_like(w), w.clamp(0.0, 1.0))
    return -(w_bar * adv).detach() * logp


def dro_term(logp, anchor_logp, adv, beta):
    """DRO / Kimi-1.5: −A·logp + (β/2)·(logp − log μ)²."""
    return -adv * logp + 0.5 * beta * (logp - anchor_logp.detach()) ** 2


def prime_rl_term(logp, old_logp, anchor_logp, adv, low, high, tau):
    """prime-rl's default loss, with rpg's value at the trust region's edge for a masked token:
    −M·w·A (masked: −(1 ± δ/q)·A, detached) + τ·(logp − log μ)²."""
    p, q = logp.detach().exp(), old_logp.exp()
    up = adv > 0
    masked = torch.where(up, p - q > high, p - q < -low)
    w = (logp - old_logp).exp()
    edge = torch.where(up, 1 + high / q, 1 - low / q)
    pg = torch.where(masked, -(edge * adv).detach(), -w * adv)
    return pg + tau * (logp - anchor_logp.detach()) ** 2


# --- sequence-level and selection families (rpg.sequence, rpg.selection), as their docstrings print them ---


def gmpo_per_token(logp, old_logp, adv, mask, clip):
    """GMPO-token: ℓ_t = −sg(s)·exp(log m_t − sg(log m_t))·A_t, s = exp(mean_t log m_t), log m_t the
    sign-aware clipped log-ratio (A ≥ 0: min(log w, log(1+ε_high)); A < 0: max(log w, log(1−ε_low)),
    then min with log c_dual)."""
    import math

    if adv.dim() == 1:
        adv = adv[:, None]
    adv = adv.expand_as(logp)
    log_w = logp - old_logp.detach()
    log_m = log_w
    if clip is not None:
        up = log_w if clip.high is None else torch.minimum(log_w, torch.tensor(math.log1p(clip.high), dtype=logp.dtype))
        down = (
            log_w if clip.low is None else torch.maximum(log_w, torch.tensor(math.log1p(-clip.low), dtype=logp.dtype))
        )
        if clip.dual is not None:
            down = torch.minimum(down, torch.tensor(math.log(clip.dual), dtype=logp.dtype))
        log_m = torch.where(adv >= 0, up, down)
    zero = torch.zeros((), dtype=logp.dtype)
    s = (torch.where(mask, log_m, zero).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)).exp()
    loss = -s.detach() * (log_m - log_m.detach()).exp() * adv
    return torch.where(mask, loss, zero)


def vespo_per_token(logp, old_logp, adv, mask, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0, kernel=True):
    """ℓ_t = −sg(φ(W)·A_t)·logp_t, W = Π_t w_t, φ(W) = W^k·e^{−λ(W−1)} (or W itself without the kernel)."""
    if adv.dim() == 1:
        adv = adv[:, None]
    adv = adv.expand_as(logp)
    zero = torch.zeros((), dtype=logp.dtype)
    big_w = torch.where(mask, logp - old_logp, zero).sum(-1, keepdim=True).exp().detach()
    if kernel:
        k = torch.where(adv >= 0, k_pos, k_neg)
        lam = torch.where(adv >= 0, lambda_pos, lambda_neg)
        phi = big_w**k * torch.exp(-lam * (big_w - 1))
    else:
        phi = big_w.expand_as(logp)
    loss = -(phi * adv).detach() * logp
    return torch.where(mask, loss, zero)


def clip_cov_per_token(logp, old_logp, adv, mask, clip, drop):
    """Clip-Cov with a given drop set: the PPO term, times 0 at the dropped tokens."""
    if adv.dim() == 1:
        adv = adv[:, None]
    w = (logp - old_logp.detach()).exp()
    loss = ppo_term(w, adv.expand_as(logp), clip) * (~drop).to(logp.dtype)
    return torch.where(mask, loss, torch.zeros((), dtype=logp.dtype))


def kl_cov_per_token(logp, old_logp, adv, mask, penalize, coef):
    """KL-Cov with a given selection: −w·A + coef·|logp − old_logp| at the selected tokens."""
    if adv.dim() == 1:
        adv = adv[:, None]
    log_w = logp - old_logp.detach()
    loss = -log_w.exp() * adv + coef * log_w.abs() * penalize.to(logp.dtype)
    return torch.where(mask, loss, torch.zeros((), dtype=logp.dtype))


def m2_keep(log_rho, mask, threshold):
    """M2PO's filter as AReaL prints it: sort (log ρ)² descending, drop the first k with k the first index
    whose suffix mean is below the threshold (all but the last if none is)."""
    m2 = (log_rho**2)[mask]
    order = torch.argsort(m2, descending=True)
    sorted_m2 = m2[order]
    n = sorted_m2.numel()
    k = n - 1
    for i in range(n):
        if sorted_m2[i:].mean() < threshold:
            k = i
            break
    keep_sorted = torch.ones(n, dtype=torch.bool)
    keep_sorted[:k] = False
    keep_flat = torch.empty(n, dtype=torch.bool)
    keep_flat[order] = keep_sorted
    out = torch.zeros_like(mask)
    out[mask] = keep_flat
    return out
