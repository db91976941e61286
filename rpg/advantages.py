r"""Advantage estimators for the policy losses: group-relative, leave-one-out, REINFORCE++.

All functions are pure, run under ``torch.no_grad`` semantics (their outputs are
constants for the losses) and never divide by zero: a group whose rewards are
all equal gets advantage exactly 0, never NaN or ±1/eps, whatever ``eps``
(``eps = 0`` included).

Rewards are ``[B]`` with the G responses of one prompt **contiguous**
(``B = num_groups · G``, the layout of verl's and TRL's rollouts).

* [`grpo`][rpg.advantages.grpo] — A_i = (r_i − mean_g) / (std + eps) (DeepSeekMath GRPO, ``scale="group"``);
  ``scale="batch"`` divides by the batch std instead; ``scale="none"`` is Dr. GRPO.
* [`rloo`][rpg.advantages.rloo] — A_i = r_i − mean_{j≠i} r_j (Kool et al.; Ahmadian et al.).
* [`reinforce_pp`][rpg.advantages.reinforce_pp] — REINFORCE++ (Hu et al., 2025): per-token rewards
  −β·k(π_old → π_ref), the scalar reward on the last response token, discounted
  returns-to-go, whitened over the masked tokens of the batch.
* [`reinforce_pp_baseline`][rpg.advantages.reinforce_pp_baseline] — REINFORCE++-baseline: group-mean baseline, then
  batch whitening.
* [`dapo_overlong_penalty`][rpg.advantages.dapo_overlong_penalty] and [`informative_groups`][rpg.advantages.informative_groups] — DAPO's soft
  overlong punishment and the dynamic-sampling group filter (Yu et al., 2025).

**Non-finite inputs are refused, not contained.** One NaN reward would otherwise
reach every advantage of the batch through a batch statistic (the batch std, the
whitening mean and variance), so every estimator raises ``ValueError`` naming the
argument when a reward (or, in [`reinforce_pp`][rpg.advantages.reinforce_pp] with β > 0, a log-probability
at an unmasked token) is NaN or ±inf. Replace or drop such responses before
computing advantages. The check is free of host-device synchronisation: on CPU it
raises at once; on an accelerator it is an asynchronous device assertion
(``torch._assert_async``), which fails at the next synchronisation and leaves the
CUDA context unusable — check on the host first if you need to recover.

Number arguments (``group_size``, ``eps``, ``beta``, ``gamma``, …) accept Python
numbers, numpy scalars and one-element tensors; ``bool`` and other types raise
``TypeError``, out-of-range values ``ValueError``. Half-precision rewards are
computed in float32.

Statistics are computed on the rewards scaled by a power of two (exact in
floating point), so a very small or very large reward scale neither underflows
nor overflows the variance: the results equal the plain formula's wherever that
one is finite.
"""

from __future__ import annotations

import math

import torch

from ._util import as_int, as_real, check_choice, check_floating, compute_dtype, value_check_mode

__all__ = [
    "grpo",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "whiten",
    "dapo_overlong_penalty",
    "informative_groups",
]


def _check_finite(name: str, x: torch.Tensor, keep: torch.Tensor | None = None, what: str = "") -> None:
    """Raise ``ValueError`` if ``x`` (where ``keep``) holds NaN or ±inf; no host-device sync on accelerators.

    Runs where the losses' input checks run ([`value_check_mode`][rpg._util.value_check_mode]): eagerly on a
    CPU, as a device assertion elsewhere, skipped under ``torch.compile`` and ``torch.func`` transforms."""
    mode = value_check_mode(x)
    if not x.is_floating_point() or mode is None:
        return
    ok = torch.isfinite(x)
    if keep is not None:
        ok = ok | ~keep
    msg = f"{name} must be finite{what}; replace or drop NaN/inf entries before computing advantages"
    if mode == "raise":
        if not bool(ok.all()):
            bad = x[~ok]
            raise ValueError(f"{msg} (got {bad.numel()} non-finite, e.g. {bad[0].item()!r})")
    else:
        torch._assert_async(ok.all(), msg)


def _check_group_size(group_size: object) -> int:
    g = as_int("group_size", group_size)
    if g < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    return g


def _check_eps(eps: object) -> float:
    e = as_real("eps", eps)
    if not 0 <= e < math.inf:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return e


def _rewards(rewards: object) -> torch.Tensor:
    """``rewards`` ``[B]``, detached, in its compute dtype (float32 for bool/int/half), checked finite."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor [B], got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got shape {tuple(rewards.shape)}")
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got dtype {rewards.dtype}")
    dtype = compute_dtype(rewards.dtype) if rewards.is_floating_point() else torch.float32
    rewards = rewards.detach().to(dtype)
    _check_finite("rewards", rewards)
    return rewards


def _groups(rewards: object, group_size: object) -> torch.Tensor:
    """``rewards`` ``[B]`` viewed as ``[B / G, G]``, with clear errors."""
    r = _rewards(rewards)
    g = _check_group_size(group_size)
    if r.numel() % g:
        raise ValueError(f"rewards has {r.numel()} entries, not a multiple of group_size={g}")
    return r.view(-1, g)


def _flat(groups: torch.Tensor) -> torch.Tensor:
    return groups.reshape(-1)


def _pow2_scale(absmax: torch.Tensor) -> torch.Tensor:
    """The power of two k = 2^(e−1) ≤ ``absmax`` < 2^e (always finite); 1 where ``absmax`` is 0.

    Dividing by it is exact in floating point, so statistics of x / k equal those of x
    scaled by 1/k bit for bit, without the underflow or overflow of squaring tiny or huge x."""
    _, exponent = torch.frexp(absmax)
    return torch.where(absmax > 0, torch.ldexp(torch.ones_like(absmax), exponent - 1), torch.ones_like(absmax))


def _all_equal(g: torch.Tensor) -> torch.Tensor:
    """``[num_groups, 1]`` bool: every reward of the group equals its first."""
    return (g == g[:, :1]).all(-1, keepdim=True)


def grpo(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    r"""Group-relative advantages, ``[B]``.

    A_i = (r_i − mean_g(r)) / (s + eps) with s the unbiased std of the group
    (``scale="group"``, GRPO), of the whole batch's rewards (``"batch"``), or
    s + eps := 1 (``"none"``, Dr. GRPO: no std scaling, which keeps E[A·∇logπ] the
    gradient of E[r]; std scaling instead maximises E[h(p)], h(p) = arcsin √p for
    0/1 rewards).

    A group whose rewards are all equal gets exactly 0 (and so contributes no
    gradient), never NaN or ±1/eps, for every ``eps >= 0``; with ``eps = 0`` every
    other group is exactly standardised. A group of one response gets 0 (it has no
    baseline of its own; verl instead returns r there).

    Args:
        rewards: ``[B]`` real rewards (bool/int/half are computed in float32); NaN or
            ±inf raise ``ValueError``.
        group_size: G, the responses per prompt (contiguous); ``B`` must be a multiple.
        scale: ``"group"``, ``"batch"`` or ``"none"``.
        eps: added to the std, finite and >= 0.
    """
    check_choice("scale", scale, ("group", "batch", "none"))
    eps = _check_eps(eps)
    g = _groups(rewards, group_size)
    if g.numel() == 0:
        return _flat(g).clone()
    equal = _all_equal(g)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    if scale == "none":
        return _flat(torch.where(equal, zero, g - g.mean(-1, keepdim=True)))
    # A = (r − m)/(s + eps) = (u − m_u)/(s_u + eps/k) with u = r/k, k a power of two: exact.
    if scale == "group":
        k = _pow2_scale(g.abs().amax(-1, keepdim=True))
    else:
        k = _pow2_scale(g.abs().amax())
    u = g / k
    centered = u - u.mean(-1, keepdim=True)
    if scale == "group":
        s = u.std(-1, keepdim=True) if g.shape[-1] > 1 else torch.zeros_like(u[:, :1])
    else:
        s = u.std() if u.numel() > 1 else torch.zeros((), dtype=u.dtype, device=u.device)
    # eps/k as eps·2^−e (exact); a zero denominator only meets an all-equal group, set to 0 below
    denom = s + eps / k if eps > 0 else s  # (0/k is NaN in torch for a subnormal k)
    return _flat(torch.where(equal, zero, centered / torch.where(denom > 0, denom, torch.ones_like(denom))))


def rloo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    r"""Leave-one-out advantages A_i = r_i − (Σ_{j≠i} r_j)/(G − 1) = G/(G−1)·(r_i − mean), ``[B]``.

    Unbiased: the baseline does not depend on r_i. Needs ``group_size >= 2``; an
    all-equal group gets exactly 0.
    """
    group_size = _check_group_size(group_size)
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a leave-one-out baseline), got {group_size!r}")
    g = _groups(rewards, group_size)
    loo = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return _flat(torch.where(_all_equal(g), torch.zeros_like(g), g - loo))


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, *, unbiased: bool = True) -> torch.Tensor:
    r"""(x − mean) / sqrt(var + eps) over the tokens where ``mask`` is 1, and 0 elsewhere.

    The mean and variance are taken over the masked tokens of the whole tensor
    (the batch). ``unbiased`` chooses the variance:

    * ``True`` (default): Bessel-corrected, Σ(x − mean)² / (N − 1), as verl's
      ``verl.utils.torch_functional.masked_whiten`` (``masked_var(unbiased=True)``)
      used by its REINFORCE++ and REINFORCE++-baseline estimators;
    * ``False``: the population variance Σ(x − mean)² / N, as OpenRLHF (0.11)
      normalises REINFORCE++ advantages. OpenRLHF then divides by
      sqrt(max(var, 1e-8)) where this divides by sqrt(var + eps); the two differ
      only when the variance is near ``eps``.

    With N tokens the two conventions differ by the factor sqrt(N / (N − 1)):
    about 0.5% at N = 100.

    An empty mask, a single masked token, or masked values that are all equal
    give exactly 0 (also with ``eps = 0``). NaN/inf at masked-out positions never
    reach the result; at masked positions they raise ``ValueError``.

    Args:
        values: ``[...]`` floating tensor (half precision is computed in float32).
        mask: ``[...]`` same shape, 1/True where a token counts.
        eps: added to the variance, finite and >= 0.
        unbiased: divide the squared deviations by N − 1 (``True``) or N (``False``).
    """
    check_floating("values", values)
    if not isinstance(mask, torch.Tensor) or mask.shape != values.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor of the values' shape {tuple(values.shape)}, got {got}")
    eps = _check_eps(eps)
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    keep = mask.bool()
    values = values.detach().to(compute_dtype(values.dtype))
    if values.numel() == 0:
        return torch.zeros_like(values)
    _check_finite("values", values, keep, " where mask is set")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    x = torch.where(keep, values, zero)
    n = keep.sum()
    mean = x.sum() / n.clamp_min(1)
    centered = torch.where(keep, values - mean, zero)
    # var(x)/k² from x/k, k a power of two: exact, and the squares neither under- nor overflow
    k = _pow2_scale(centered.abs().amax())
    c = centered / k
    var = (c * c).sum() / ((n - 1).clamp_min(1) if unbiased else n.clamp_min(1))
    denom = var + eps / (k * k) if eps > 0 else var
    # all masked values equal (or none, or one): exactly 0, not rounding noise / sqrt(eps)
    hi = torch.where(keep, values, torch.full_like(values, -math.inf)).amax()
    lo = torch.where(keep, values, torch.full_like(values, math.inf)).amin()
    flat = (hi <= lo) | (denom <= 0)
    return c * torch.where(flat, zero, torch.rsqrt(torch.where(flat, torch.ones_like(denom), denom)))


def _check_token_tensor(name: str, x: torch.Tensor | None, mask: torch.Tensor) -> None:
    if x is None:
        return
    check_floating(name, x)
    if x.shape != mask.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}; they must match")


def _check_mask(mask: object, batch: int | None = None) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a [B, T] tensor, got {type(mask).__name__}")
    if mask.dim() != 2 or (batch is not None and mask.shape[0] != batch):
        want = "[B, T]" if batch is None else f"[B, T] with B = {batch}"
        raise ValueError(f"mask must have shape {want}, got {tuple(mask.shape)}")
    return mask


def _last_token(mask: torch.Tensor) -> torch.Tensor:
    """One-hot ``[B, T]`` of the last response token of each row (all-zero rows stay zero)."""
    keep = mask.bool()
    t = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(keep, t, torch.full_like(t, -1)).amax(-1, keepdim=True)
    return (t == last) & keep


def _check_unbiased(unbiased: object, whitens: bool) -> bool:
    if unbiased is None:
        return True
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool or None, got {type(unbiased).__name__}")
    if not whitens:
        raise ValueError("unbiased chooses the whitening variance; it has no effect with whiten_advantages=False")
    return unbiased


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
    unbiased: bool | None = None,
) -> torch.Tensor:
    r"""REINFORCE++ advantages, ``[B, T]`` (Hu et al., 2025; verl / OpenRLHF ``reinforce_plus_plus``).

    Per-token reward r_t = −β·k_t + [t = last]·R, with k_t the per-token KL
    estimate between the sampling policy and the reference: ``"k1"``:
    log π_old − log π_ref; ``"k2"``: ½(log π_old − log π_ref)². Then the
    discounted return-to-go G_t = Σ_{t' ≥ t} γ^{t'−t} r_{t'} (within the response)
    over the response tokens (masked positions inside a response, e.g. tool
    output in a multi-turn rollout, are skipped rather than cutting the return,
    as verl 0.9.1 does too), computed in float32 (float64 for float64 rewards),
    and, with ``whiten_advantages``, whitening over all masked tokens of the batch
    ([`whiten`][rpg.advantages.whiten]). Masked positions are 0.

    With k1, γ = 1 and no whitening, E_{π_θ}[Σ_t G_t ∇log π_θ(y_t)] is exactly
    ∇(E[R] − β·KL(π_θ(y) ‖ π_ref(y))) on-policy — the *sequence-level* reverse
    KL (Tang & Munos, 2025); whitening rescales it. ``tests/test_sequence.py``
    checks this with the two-step oracle of [`rpg.testing`][rpg.testing].

    Args:
        rewards: ``[B]`` scalar reward of each response; NaN or ±inf raise ``ValueError``.
        mask: ``[B, T]`` response mask.
        old_logp: ``[B, T]`` log π_old of the sampled tokens; needed when ``beta > 0``
            (finite at unmasked tokens).
        ref_logp: ``[B, T]`` log π_ref; needed when ``beta > 0`` (finite at unmasked tokens).
        beta: the KL coefficient β ≥ 0 of the reward shaping.
        estimator: ``"k1"`` (exact sequence KL on-policy) or ``"k2"``.
        gamma: the discount γ ∈ [0, 1].
        whiten_advantages: whiten over the batch's masked tokens (REINFORCE++'s default).
        unbiased: the whitening variance: ``True`` (the default when whitening) divides
            by N − 1 as verl does, ``False`` by N as OpenRLHF does ([`whiten`][rpg.advantages.whiten]).
            Setting it with ``whiten_advantages=False`` raises ``ValueError``.
    """
    check_choice("estimator", estimator, ("k1", "k2"))
    mask = _check_mask(mask)
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor [B], got {type(rewards).__name__}")
    if rewards.shape != mask.shape[:1]:
        raise ValueError(f"rewards must have shape [B] = {tuple(mask.shape[:1])}, got {tuple(rewards.shape)}")
    gamma = as_real("gamma", gamma)
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    beta = as_real("beta", beta)
    if not 0 <= beta < math.inf:
        raise ValueError(f"beta must be finite and >= 0, got {beta!r}")
    unbiased = _check_unbiased(unbiased, bool(whiten_advantages))
    _check_token_tensor("old_logp", old_logp, mask)
    _check_token_tensor("ref_logp", ref_logp, mask)
    shaped = beta > 0
    if shaped and (old_logp is None or ref_logp is None):
        raise ValueError("beta > 0 shapes the reward with the KL to the reference: pass old_logp and ref_logp")
    r = _rewards(rewards)
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    keep = mask.bool()
    if old_logp is not None and ref_logp is not None and shaped:
        _check_finite("old_logp", old_logp.detach(), keep, " at unmasked tokens when beta > 0")
        _check_finite("ref_logp", ref_logp.detach(), keep, " at unmasked tokens when beta > 0")
    if mask.shape[-1] == 0:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    token_r = torch.where(_last_token(mask), r.to(dtype)[:, None], zero)
    if old_logp is not None and ref_logp is not None and shaped:
        d = old_logp.detach().to(dtype) - ref_logp.detach().to(dtype)
        k = d if estimator == "k1" else 0.5 * d * d
        token_r = token_r - beta * torch.where(keep, k, zero)
    returns = torch.zeros_like(token_r)
    running = torch.zeros_like(token_r[:, 0])
    for t in range(token_r.shape[-1] - 1, -1, -1):  # masked positions are skipped, not steps
        running = torch.where(keep[:, t], token_r[:, t] + gamma * running, running)
        returns[:, t] = running
    returns = torch.where(keep, returns, zero)
    return whiten(returns, keep, unbiased=unbiased) if whiten_advantages else returns


def reinforce_pp_baseline(
    rewards: torch.Tensor, group_size: int, mask: torch.Tensor, *, unbiased: bool = True
) -> torch.Tensor:
    r"""REINFORCE++-baseline advantages, ``[B, T]``: (r_i − mean_g) on every response token, batch-whitened.

    The group mean removes the prompt's difficulty; whitening over all masked
    tokens of the batch ([`whiten`][rpg.advantages.whiten]) sets the scale (verl's
    ``reinforce_plus_plus_baseline``; OpenRLHF's ``reinforce_baseline``). A group
    of equal rewards is 0 before whitening. ``unbiased`` chooses the whitening
    variance: N − 1 (``True``, verl) or N (``False``, OpenRLHF).
    """
    centered = grpo(rewards, group_size, scale="none")
    mask = _check_mask(mask, centered.numel())
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    keep = mask.bool()
    return whiten(torch.where(keep, centered[:, None], torch.zeros_like(centered[:, None])), keep, unbiased=unbiased)


def dapo_overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    r"""DAPO's soft overlong punishment, added to the reward (Yu et al., 2025, eq. 13), ``[B]``.

    With L = ``max_len`` and C = ``cache_len``: 0 if |y| ≤ L − C;
    ((L − C) − |y|)/C if L − C < |y| ≤ L (linear from 0 to −1); −1 if |y| > L.
    NaN or ±inf lengths raise ``ValueError``.
    """
    max_len_f, cache_len_f = as_real("max_len", max_len), as_real("cache_len", cache_len)
    if not 0 < cache_len_f <= max_len_f < math.inf:
        raise ValueError(f"need 0 < cache_len <= max_len < inf, got cache_len={cache_len!r}, max_len={max_len!r}")
    lengths = torch.as_tensor(lengths)
    if lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be real, got dtype {lengths.dtype}")
    lengths = lengths.to(torch.float32) if not lengths.is_floating_point() else lengths.to(compute_dtype(lengths.dtype))
    _check_finite("lengths", lengths)
    soft = ((max_len_f - cache_len_f) - lengths) / cache_len_f
    return torch.where(lengths > max_len_f, torch.full_like(lengths, -1.0), soft.clamp(max=0.0))


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    r"""DAPO dynamic sampling: a ``[B]`` bool mask keeping the responses of groups whose rewards differ.

    A group where every reward is equal (all correct or all wrong) has zero
    group-relative advantage and no gradient; DAPO drops it and samples more.
    NaN or ±inf rewards raise ``ValueError`` (as in every estimator here), so a
    failed reward can never make its group look informative.
    """
    g = _groups(rewards, group_size)
    return _flat((~_all_equal(g)).expand_as(g))
