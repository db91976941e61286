r"""Reducing a ``[B, T]`` per-token loss to a scalar, invariant to how the batch is split.

With ℓ_bt the per-token loss, m_bt the mask, n_b = Σ_t m_bt the tokens of
sequence b, N = Σ_b n_b the tokens of the batch and S the number of sequences
with at least one token:

| ``agg`` | loss |
|---|---|
| ``token-mean`` | Σ_bt ℓ_bt / N |
| ``token-sum`` | Σ_bt ℓ_bt |
| ``seq-mean-token-mean`` | Σ_b (Σ_t ℓ_bt / n_b) / S |
| ``seq-mean-token-sum`` | Σ_bt ℓ_bt / S |
| ``seq-mean-token-sum-norm`` | Σ_bt ℓ_bt / (S · L), L = ``max_len`` (Dr. GRPO) |

**Micro-batches and data parallelism.** ``batch_num_tokens`` replaces N and
``global_batch_size`` replaces S. Pass the counts of the *full* batch (all
micro-batches on all ranks) and the shard losses **sum** to exactly the
full-batch loss, so gradients accumulate by summation: call ``backward()`` on
each micro-batch loss without dividing, and all-reduce gradients with SUM
across ranks (with a MEAN all-reduce, as FSDP/DDP do by default, multiply each
rank's loss by the world size — verl's ``* dp_size``). Fully masked sequences
do not count in S (verl's convention). ``seq-mean-token-sum-norm`` needs a
constant L: pass ``max_len`` (default: the padded width T, which changes with
padding — set it for Dr. GRPO).

An empty mask gives 0, not NaN (a zero count is replaced by 1; the sum it
divides is then 0). Nothing here calls ``.item()`` on an accelerator tensor or
copies a Python number to the device: no host-device sync. Counts must be finite
and ≥ 0: Python numbers, numpy scalars and CPU tensors are checked with a
``ValueError``, accelerator tensors by an asynchronous device assertion; a tensor
count is not checked under ``torch.compile`` or ``torch.func`` (no data-dependent
branch can run there, and a CPU tensor traces like any other).
"""

from __future__ import annotations

import math

import torch

from ._util import as_real, check_choice, value_check_mode

__all__ = ["AGG_MODES", "aggregate", "check_count"]

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_count(name: str, value: object) -> None:
    """Validate an optional global count: ``None``, a finite number ≥ 0, or a one-element tensor.

    A CPU tensor is checked here (no sync); on an accelerator the check is an asynchronous
    device assertion (no host-device sync): a negative, NaN or infinite count fails there.
    Under ``torch.compile`` / ``torch.func`` a tensor count is not checked (a data-dependent
    branch cannot run there)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")
        mode = value_check_mode(value)  # None under torch.compile / torch.func: no data-dependent branch there
        if mode is None:
            return
        ok = torch.isfinite(value) & (value >= 0) if value.is_floating_point() else value >= 0
        if mode == "raise":
            if not bool(ok):
                raise ValueError(f"{name} must be finite and >= 0, got {value.item()!r}")
        else:
            torch._assert_async(ok.reshape(()), f"{name} must be finite and >= 0")
        return
    count = as_real(name, value)
    if not 0 <= count < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def denominator(count, default: torch.Tensor, like: torch.Tensor):
    """The count to divide by, 1 where it is 0. A Python number stays a Python number, so
    that no host-to-device copy (a sync on CUDA) happens; a tensor is used where it lives."""
    if count is not None and not isinstance(count, torch.Tensor):
        count = as_real("count", count)
        return count if count > 0 else 1.0
    count = (default if count is None else count.reshape(()).to(like.device, non_blocking=True)).to(like.dtype)
    return torch.where(count > 0, count, torch.ones_like(count))


def aggregate_masked(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    agg: str,
    *,
    batch_num_tokens=None,
    global_batch_size=None,
    max_len: int | None = None,
) -> torch.Tensor:
    """As [`aggregate`][rpg.aggregation.aggregate], for a ``per_token`` that is already 0 wherever ``mask`` is 0."""
    if agg == "token-sum":
        return per_token.sum()
    if agg == "token-mean":
        return per_token.sum() / denominator(batch_num_tokens, torch.count_nonzero(mask), per_token)
    n_b = torch.count_nonzero(mask, dim=-1).to(per_token.dtype)
    seqs = denominator(global_batch_size, torch.count_nonzero(n_b), per_token)
    if agg == "seq-mean-token-mean":
        return (per_token.sum(-1) / n_b.clamp_min(1)).sum() / seqs
    if agg == "seq-mean-token-sum":
        return per_token.sum() / seqs
    if agg == "seq-mean-token-sum-norm":
        length = max(per_token.shape[-1], 1) if max_len is None else max_len  # T = 0: the sum is 0, and so is the loss
        return per_token.sum() / (seqs * length)
    check_choice("agg", agg, AGG_MODES)
    raise AssertionError("unreachable")  # pragma: no cover


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    *,
    batch_num_tokens: int | float | torch.Tensor | None = None,
    global_batch_size: int | float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    r"""Aggregate a per-token loss ``[B, T]`` under ``mask`` ``[B, T]`` into a scalar.

    Args:
        per_token: ``[B, T]`` per-token values (differentiable).
        mask: ``[B, T]`` bool or 0/1 float; 0 marks padding. Masked entries are
            removed with ``torch.where``, so NaN/inf there never reach the result
            or its gradient.
        agg: one of [`AGG_MODES`][rpg.aggregation.AGG_MODES] (table above).
        batch_num_tokens: N of the full batch, replacing the local token count.
        global_batch_size: S of the full batch, replacing the local sequence count.
        max_len: L for ``seq-mean-token-sum-norm`` (default ``T``).

    Returns:
        A scalar tensor; 0 (with zero gradient) for an all-masked batch.
    """
    check_choice("agg", agg, AGG_MODES)
    check_count("batch_num_tokens", batch_num_tokens)
    check_count("global_batch_size", global_batch_size)
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(
            f"per_token and mask must have the same [B, T] shape, got {tuple(per_token.shape)} and {tuple(mask.shape)}"
        )
    keep = mask.bool()
    per_token = torch.where(keep, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    return aggregate_masked(
        per_token, keep, agg, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size, max_len=max_len
    )
