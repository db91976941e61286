"""Small internal helpers shared by the modules of ``rpg`` (not public API)."""

from __future__ import annotations

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
        return int(value)
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
