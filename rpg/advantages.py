r"""Advantage estimators for the policy losses: group-relative, leave-one-out, REINFORCE++.

All functions are pure, run under ``torch.no_grad`` semantics (their outputs are
constants for the losses) and never divide by zero: a group whose rewards are
all equal gets advantage 0, never NaN or ±1/eps.

Rewards are ``[B]`` with the G responses of one prompt **contiguous**
(``B = num_groups · G``, the layout of verl's and TRL's rollouts).

* :func:`grpo` — A_i = (r_i − mean_g) / (std + eps) (DeepSeekMath GRPO, ``scale="group"``);
  ``scale="batch"`` divides by the batch std instead; ``scale="none"`` is Dr. GRPO.
* :func:`rloo` — A_i = r_i − mean_{j≠i} r_j (Kool et al.; Ahmadian et al.).
* :func:`reinforce_pp` — REINFORCE++ (Hu et al., 2025): per-token rewards
  −β·k(π_old → π_ref), the scalar reward on the last response token, discounted
  returns-to-go, whitened over the masked tokens of the batch.
* :func:`reinforce_pp_baseline` — REINFORCE++-baseline: group-mean baseline, then
  batch whitening.
* :func:`dapo_overlong_penalty` and :func:`informative_groups` — DAPO's soft
  overlong punishment and the dynamic-sampling group filter (Yu et al., 2025).
"""

from __future__ import annotations

import torch

from ._util import check_choice, check_floating

__all__ = [
    "grpo",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "whiten",
    "dapo_overlong_penalty",
    "informative_groups",
]


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rewards`` ``[B]`` viewed as ``[B / G, G]``, with clear errors."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got {getattr(rewards, 'shape', type(rewards))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    return rewards.detach().to(torch.float32 if not rewards.is_floating_point() else rewards.dtype).view(
        -1, group_size
    )


def _flat(groups: torch.Tensor) -> torch.Tensor:
    return groups.reshape(-1)


def grpo(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    r"""Group-relative advantages, ``[B]``.

    A_i = (r_i − mean_g(r)) / (s + eps) with s the unbiased std of the group
    (``scale="group"``, GRPO), of the whole batch (``"batch"``), or s + eps := 1
    (``"none"``, Dr. GRPO: no std scaling, which keeps E[A·∇logπ] the gradient of
    E[r]; std scaling instead maximises E[h(p)], h(p) = arcsin √p for 0/1 rewards).

    A group whose rewards are all equal gets exactly 0 (and so contributes no
    gradient), never NaN or ±1/eps. A group of one response gets 0 (it has no
    baseline of its own; verl instead returns r there).
    """
    check_choice("scale", scale, ("group", "batch", "none"))
    g = _groups(rewards, group_size)
    centered = g - g.mean(-1, keepdim=True)
    flat_equal = (g == g[:, :1]).all(-1, keepdim=True)
    centered = torch.where(flat_equal, torch.zeros_like(centered), centered)
    if scale == "group":
        std = g.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
        centered = centered / (std + eps)
    elif scale == "batch":
        flat = _flat(g)
        std = flat.std() if flat.numel() > 1 else torch.zeros((), dtype=flat.dtype)
        centered = centered / (std + eps)
    return _flat(centered)


def rloo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    r"""Leave-one-out advantages A_i = r_i − (Σ_{j≠i} r_j)/(G − 1) = G/(G−1)·(r_i − mean), ``[B]``.

    Unbiased: the baseline does not depend on r_i. Needs ``group_size >= 2``.
    """
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a leave-one-out baseline), got {group_size!r}")
    g = _groups(rewards, group_size)
    loo = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return _flat(g - loo)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""(x − mean) / sqrt(var + eps) over the tokens where ``mask`` is 1, and 0 elsewhere.

    Unbiased (Bessel-corrected) variance over the masked tokens of the whole
    batch, as verl's and OpenRLHF's ``masked_whiten``. An empty or one-token
    mask returns the centered values (variance taken as 0).
    """
    keep = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    x = torch.where(keep, values, zero)
    n = keep.sum()
    mean = x.sum() / n.clamp_min(1)
    centered = torch.where(keep, values - mean, zero)
    var = (centered * centered).sum() / (n - 1).clamp_min(1)
    return centered * torch.rsqrt(var + eps)


def _check_token_tensor(name: str, x: torch.Tensor | None, mask: torch.Tensor) -> None:
    if x is None:
        return
    check_floating(name, x)
    if x.shape != mask.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}; they must match")


def _last_token(mask: torch.Tensor) -> torch.Tensor:
    """One-hot ``[B, T]`` of the last response token of each row (all-zero rows stay zero)."""
    keep = mask.bool()
    t = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(keep, t, torch.full_like(t, -1)).amax(-1, keepdim=True)
    return (t == last) & keep


def reinforce_pp(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    estimator: str = "k1",
    gamma: float = 1.0,
    *,
    whiten_advantages: bool = True,
) -> torch.Tensor:
    r"""REINFORCE++ advantages, ``[B, T]`` (Hu et al., 2025; verl / OpenRLHF ``reinforce_plus_plus``).

    Per-token reward r_t = −β·k_t + [t = last]·R, with k_t the per-token KL
    estimate between the sampling policy and the reference: ``"k1"``:
    log π_old − log π_ref; ``"k2"``: ½(log π_old − log π_ref)². Then the
    discounted return-to-go G_t = Σ_{t' ≥ t} γ^{t'−t} r_{t'} (within the response)
    over the response tokens (masked positions inside a response, e.g. tool
    output in a multi-turn rollout, are skipped rather than cutting the return,
    as verl 0.9.1 does too), computed in float32 (float64 for float64 rewards), and, with ``whiten_advantages``, whitening over all
    masked tokens of the batch (:func:`whiten`). Masked positions are 0.

    With k1, γ = 1 and no whitening, E_{π_θ}[Σ_t G_t ∇log π_θ(y_t)] is exactly
    ∇(E[R] − β·KL(π_θ(y) ‖ π_ref(y))) on-policy — the *sequence-level* reverse
    KL (Tang & Munos, 2025); whitening rescales it. ``tests/test_sequence.py``
    checks this with the two-step oracle of :mod:`rpg.testing`.

    Args:
        rewards: ``[B]`` scalar reward of each response.
        mask: ``[B, T]`` response mask.
        old_logp: ``[B, T]`` log π_old of the sampled tokens; needed when ``beta > 0``.
        ref_logp: ``[B, T]`` log π_ref; needed when ``beta > 0``.
        beta: the KL coefficient β ≥ 0 of the reward shaping.
        estimator: ``"k1"`` (exact sequence KL on-policy) or ``"k2"``.
        gamma: the discount γ ∈ [0, 1].
        whiten_advantages: whiten over the batch's masked tokens (REINFORCE++'s default).
    """
    check_choice("estimator", estimator, ("k1", "k2"))
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a [B, T] tensor, got {getattr(mask, 'shape', type(mask))}")
    if not isinstance(rewards, torch.Tensor) or rewards.shape != mask.shape[:1]:
        raise ValueError(f"rewards must have shape [B] = {tuple(mask.shape[:1])}, got {getattr(rewards, 'shape', None)}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    _check_token_tensor("old_logp", old_logp, mask)
    _check_token_tensor("ref_logp", ref_logp, mask)
    if beta > 0 and (old_logp is None or ref_logp is None):
        raise ValueError("beta > 0 shapes the reward with the KL to the reference: pass old_logp and ref_logp")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32  # bf16/fp16/int: float32
    keep = mask.bool()
    if mask.shape[-1] == 0:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    token_r = torch.where(_last_token(mask), rewards.detach().to(dtype)[:, None], zero)
    if beta > 0:
        d = old_logp.detach().to(dtype) - ref_logp.detach().to(dtype)
        k = d if estimator == "k1" else 0.5 * d * d
        token_r = token_r - beta * torch.where(keep, k, zero)
    returns = torch.zeros_like(token_r)
    running = torch.zeros_like(token_r[:, 0])
    for t in range(token_r.shape[-1] - 1, -1, -1):  # masked positions are skipped, not steps
        running = torch.where(keep[:, t], token_r[:, t] + gamma * running, running)
        returns[:, t] = running
    returns = torch.where(keep, returns, zero)
    return whiten(returns, keep) if whiten_advantages else returns


def reinforce_pp_baseline(rewards: torch.Tensor, group_size: int, mask: torch.Tensor) -> torch.Tensor:
    r"""REINFORCE++-baseline advantages, ``[B, T]``: (r_i − mean_g) on every response token, batch-whitened.

    The group mean removes the prompt's difficulty; whitening over all masked
    tokens of the batch (:func:`whiten`) sets the scale (verl's
    ``reinforce_plus_plus_baseline``). A group of equal rewards is 0 before
    whitening.
    """
    centered = grpo(rewards, group_size, scale="none")
    if not isinstance(mask, torch.Tensor) or mask.shape[:1] != centered.shape or mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T] with B = {centered.numel()}, got {getattr(mask, 'shape', None)}")
    keep = mask.bool()
    return whiten(torch.where(keep, centered[:, None], torch.zeros_like(centered[:, None])), keep)


def dapo_overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    r"""DAPO's soft overlong punishment, added to the reward (Yu et al., 2025, eq. 13), ``[B]``.

    With L = ``max_len`` and C = ``cache_len``: 0 if |y| ≤ L − C;
    ((L − C) − |y|)/C if L − C < |y| ≤ L (linear from 0 to −1); −1 if |y| > L.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len!r}, max_len={max_len!r}")
    lengths = torch.as_tensor(lengths)
    lengths = lengths.to(torch.float32) if not lengths.is_floating_point() else lengths
    soft = ((max_len - cache_len) - lengths) / cache_len
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), soft.clamp(max=0.0))


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    r"""DAPO dynamic sampling: a ``[B]`` bool mask keeping the responses of groups whose rewards differ.

    A group where every reward is equal (all correct or all wrong) has zero
    group-relative advantage and no gradient; DAPO drops it and samples more.
    """
    g = _groups(rewards, group_size)
    varied = ~(g == g[:, :1]).all(-1, keepdim=True)
    return _flat(varied.expand_as(g))
