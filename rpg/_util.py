"""Small internal helpers shared by the modules of ``rpg`` (not public API)."""

from __future__ import annotations

import contextlib
import math
import threading
from numbers import Integral, Real

import torch

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a computation runs in: float32/float64 stay, bf16/fp16 go to float32."""
    return torch.float32 if dtype in _HALF else dtype


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` in its compute dtype (bf16/fp16 become float32; others unchanged)."""
    return x.float() if x.dtype in _HALF else x


def check_floating(name: str, x: object) -> None:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (log-probabilities), got dtype {x.dtype}")


def check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``valid``, listing the valid options."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid options: {', '.join(repr(v) for v in valid)}")


def as_real(name: str, value: object) -> float:
    """A Python float from a real number, a numpy scalar or a one-element tensor; ``TypeError`` otherwise.

    ``bool`` is refused (it is not a number a user means). A tensor is read with ``.item()``: call
    this on settings, never in a hot path."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a real number, got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, Real):
        if type(value).__module__ == "numpy" and hasattr(value, "item") and not isinstance(value.item(), bool):
            item = value.item()
            if isinstance(item, Real):
                return float(item)
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def as_int(name: str, value: object) -> int:
    """A Python int from an integer, a numpy integer or a one-element integer tensor; ``TypeError`` otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be an integer, got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        return int(value.item())
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    if isinstance(value, Integral):
        return int(value)
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iu":
        return int(value)  # type: ignore[call-overload]  # a numpy integer scalar
    raise TypeError(f"{name} must be an integer, got {type(value).__name__}")


def check_bound(name: str, value: object, ok, rule: str) -> float | None:
    """A bound setting as a float (``None`` stays ``None``): ``TypeError`` for a non-number,
    ``ValueError`` naming ``rule`` unless ``ok(value)`` (NaN is never ok)."""
    if value is None:
        return None
    value = as_real(name, value)
    if value != value or not ok(value):
        raise ValueError(f"{name} must satisfy {rule}, got {value!r}")
    return value


def check_real(name: str, value: object, ok, rule: str) -> float:
    """A required real setting as a float: [`check_bound`][rpg._util.check_bound] that refuses ``None`` too."""
    bound = check_bound(name, value, ok, rule)
    if bound is None:
        raise TypeError(f"{name} must be a real number, not None")
    return bound


# --- value checks of the call's tensors ---------------------------------------------------------

LOGP_TOL = 1e-4
"""How far above 0 a float32/float64 log-probability may lie before it is refused (rounding of a
log-softmax never comes near it; logits and probabilities of sampled tokens lie far above it)."""
LOGP_TOL_HALF = 1e-2
"""The same for bf16/fp16 inputs (their resolution near a log-sum-exp of order 1 is ~4e-3)."""

_TRUST = threading.local()


@contextlib.contextmanager
def trusted_inputs():
    """Skip the value checks of the call's tensors inside this block (internal: for callers that
    validated them once and call a loss many times, e.g. the fused head's chunks)."""
    before = getattr(_TRUST, "on", False)
    _TRUST.on = True
    try:
        yield
    finally:
        _TRUST.on = before


@contextlib.contextmanager
def accept_unnormalized():
    """The state behind [`rpg.unnormalized_policies`][rpg.functional.unnormalized_policies]."""
    before = getattr(_TRUST, "unnormalized", False)
    _TRUST.unnormalized = True
    try:
        yield
    finally:
        _TRUST.unnormalized = before


def value_check_mode(x: torch.Tensor) -> str | None:
    """How a data-dependent check of ``x`` can run: ``"raise"`` (a CPU tensor, eagerly: read the
    result and raise ``ValueError``), ``"assert"`` (an accelerator, eagerly: an asynchronous device
    assertion, no host-device sync) or ``None`` (skipped: under ``torch.compile`` or a ``torch.func``
    transform, where a data-dependent branch cannot run, on the meta device, or inside
    [`trusted_inputs`][rpg._util.trusted_inputs])."""
    if getattr(_TRUST, "on", False) or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    if x.device.type == "cpu":
        return "raise"
    if x.device.type == "meta":
        return None
    return "assert"


def logp_tolerance(dtype: torch.dtype) -> float:
    """The largest log-probability accepted for an input of ``dtype``."""
    return LOGP_TOL_HALF if dtype in _HALF else LOGP_TOL


def check_logprob(name: str, x: torch.Tensor, mask: torch.Tensor | None, *, neg_inf: bool, hint: str = "") -> None:
    """Refuse a log-probability tensor whose response tokens (``mask``; ``None``: all) hold a value above
    [`logp_tolerance`][rpg._util.logp_tolerance] (logits or probabilities), NaN or +inf, or −inf unless
    ``neg_inf`` allows it. Padding is never looked at. On a CPU one reduction over ``x`` when every
    position is valid (padding included), else a masked copy and a second one; see
    [`value_check_mode`][rpg._util.value_check_mode] for where it runs."""
    mode = value_check_mode(x)
    if mode is None or x.numel() == 0:
        return
    tol = math.inf if getattr(_TRUST, "unnormalized", False) else logp_tolerance(x.dtype)

    def valid(y):
        lo, hi = torch.aminmax(y)  # NaN propagates to both
        ok = (hi <= tol) & (hi < math.inf)
        return (ok if neg_inf else ok & (lo > -math.inf)), hi

    x = x.detach()
    if mode == "raise" and mask is not None and bool(valid(x)[0]):
        return  # every position valid, padding included: one pass, no masked copy
    y = x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    ok, hi = valid(y)
    if mode == "assert":
        torch._assert_async(
            ok, f"rpg: {name} must hold log-probabilities <= {tol} (no NaN, no +inf) at response tokens"
        )
        return
    if bool(ok):
        return
    keep = torch.ones_like(y, dtype=torch.bool) if mask is None else mask
    nan = int(torch.count_nonzero(keep & torch.isnan(x)))
    if nan:
        raise ValueError(f"{name} is NaN at {nan} response token(s)")
    if hi.item() == math.inf:
        raise ValueError(f"{name} is +inf at {int(torch.count_nonzero(keep & (x == math.inf)))} response token(s)")
    if hi.item() > tol:
        above = int(torch.count_nonzero(keep & (x > tol)))
        raise ValueError(
            f"{name} has values > 0 at {above} response token(s) (max {hi.item():.4g}): it looks like logits or "
            "probabilities; pass log-probabilities, e.g. rpg.logprobs.from_logits(logits, tokens) "
            f"(values up to {tol} are accepted as rounding)"
        )
    raise ValueError(f"{name} is -inf at {int(torch.count_nonzero(keep & (x == -math.inf)))} response token(s){hint}")


def check_finite(name: str, x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Refuse NaN or ±inf in ``x`` at the response tokens of ``mask`` (bool ``[B, T]``); ``x`` is ``[B]``,
    ``[B, 1]`` or ``[B, T]`` (a per-sequence value counts at its row's tokens). Padding is never looked at.
    ``dtype``: the dtype the caller computes in; ``x`` is checked as cast to it (a float64 1e39 is finite,
    its float32 cast is +inf). On a CPU one reduction over ``x`` when it is finite everywhere, else a
    masked copy; see [`value_check_mode`][rpg._util.value_check_mode] for where it runs."""
    if not x.is_floating_point():
        return
    mode = value_check_mode(x)
    if mode is None or x.numel() == 0 or mask.numel() == 0:
        return
    x = x.detach() if dtype is None else x.detach().to(dtype)
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if mode == "raise" and bool(torch.isfinite(x).all()):
        return  # finite everywhere, padding included: one pass, no masked copy
    bad = mask & ~torch.isfinite(x)  # broadcasts a per-sequence value over its row
    if mode == "assert":
        torch._assert_async(~bad.any(), f"rpg: {name} must be finite (no NaN, no ±inf) at response tokens")
        return
    if not bool(bad.any()):
        return
    for what, at in (("NaN", torch.isnan(x)), ("+inf", x == math.inf), ("-inf", x == -math.inf)):
        count = int(torch.count_nonzero(mask & at))
        if count:
            raise ValueError(
                f"{name} is {what} at {count} response token(s); it must be finite where mask is set "
                "(replace or drop such responses; padding is never read)"
            )


def check_mask_values(mask: torch.Tensor) -> None:
    """Refuse a non-bool ``mask`` with a value other than 0 or 1 (soft weights belong in ``weights=``)."""
    if mask.dtype == torch.bool or mask.numel() == 0:
        return
    mode = value_check_mode(mask)
    if mode is None:
        return
    ok = torch.logical_or(mask == 0, mask == 1).all()
    if mode == "assert":
        torch._assert_async(ok, "rpg: mask must hold only 0 and 1 (per-token weights go in weights=)")
        return
    if not bool(ok):
        bad = mask[(mask != 0) & (mask != 1)]
        raise ValueError(
            f"mask must be bool or hold only 0 and 1, got {bad.numel()} other value(s) (e.g. {bad[0].item()!r}): "
            "a soft mask is not a weight here (every nonzero would count as 1); pass per-token weights as "
            "weights= and keep mask 0/1"
        )
