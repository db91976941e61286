"""Small internal helpers shared by the modules of ``rpg`` (not public API)."""

from __future__ import annotations

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
