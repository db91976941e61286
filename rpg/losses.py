r"""Loss classes: the generic :class:`PolicyLoss` and its first instance, :class:`RPGLoss`.

A loss object holds settings only — no networks, no trainer state. Calling it
(DESIGN §6)::

    out = loss_fn(logp, old_logp, advantages, mask, ref_logp=None,
                  batch_num_tokens=None, global_batch_size=None)
    out.loss       # scalar; backward() gives the gradient
    out.per_token  # [B, T], 0 where mask is 0; differentiable
    out.metrics    # dict[str, float], computed on first access

``PolicyLoss`` = policy-gradient term (clip rule) + KL term (divergence
surrogate, in the loss or folded into the advantage) + aggregation. Named losses
are configurations of it; their ``repr`` shows the configuration.
"""

from __future__ import annotations

from numbers import Integral, Real

import torch

from ._kernel import Spec, TokenLoss
from ._util import check_choice, check_floating, compute_dtype
from .aggregation import AGG_MODES, aggregate_masked, check_count
from .clipping import Clip, Truncate
from .kl import DIVERGENCES
from .metrics import LossOutput
from .objectives import KL_TERMS

__all__ = ["LossOutput", "PolicyLoss", "RPGLoss", "STYLES", "RATIOS"]

STYLES = ("differentiable", "reinforce")
RATIOS = ("token", "sequence")


def _check_shape(name: str, x: torch.Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but logp has shape {tuple(shape)}; they must match")


class PolicyLoss:
    r"""Generic KL-regularized policy-gradient loss: PG term + KL term + aggregation.

    Per token (all ``[B, T]``; w = π_θ/π_old, tokens sampled from π_old):

    * ``style="differentiable"``: ℓ = −m·A + β·KL-surrogate, where m = w
      without a clip and the PPO / dual effective ratio with a :class:`~rpg.Clip`
      (the KL surrogate stays outside the clip). With ``fold_kl=True`` the KL is
      folded into the clipped advantage Â = g/w, gradient flowing through it
      (paper Algorithm 1; rkl and urkl only).
    * ``style="reinforce"``: ℓ = −sg(g)·logp with g = −∂ℓ_diff/∂logp, the same
      expected gradient. A :class:`~rpg.Clip` applies RPG-Style Clip
      (Algorithm 2); a :class:`~rpg.Truncate` evaluates g at sg(clip(w)).

    * ``ratio="sequence"`` (GSPO, differentiable style): the PG term uses the
      sequence ratio s = exp(mean_t log w) in place of w.

    The KL terms are those of :mod:`rpg.objectives`: a divergence surrogate
    (fkl, rkl, ufkl, urkl — exact gradients), an unweighted estimator penalty
    (k1, k2, k3 — GRPO-style, see :mod:`rpg.kl` for what their gradients follow),
    or ``None``. The per-token loss and its closed-form derivative come from one
    ``autograd.Function`` that saves one tensor; only ``logp`` receives gradient
    (``old_logp``, ``ref_logp``, ``advantages`` are treated as constants).
    The named losses (:class:`RPGLoss`, :class:`~rpg.GRPOLoss`, ...) are
    configurations of this class; :attr:`config` shows it.

    Args:
        kl: the KL term (one of ``rpg.objectives.KL_TERMS``), or ``None``.
        beta: β ≥ 0, the KL coefficient (must be 0 without a KL term).
        style: ``"differentiable"`` or ``"reinforce"``.
        clip: :class:`~rpg.Clip`, :class:`~rpg.Truncate` (reinforce only) or ``None``.
        agg: aggregation mode (:mod:`rpg.aggregation`).
        fold_kl: fold the KL into the clipped advantage (differentiable style,
            rkl/urkl only; it drops the KL gradient for fkl/ufkl, so refused there).
        max_len: the constant L of ``seq-mean-token-sum-norm`` (default: T).
        ratio: ``"token"`` (default) or ``"sequence"`` (GSPO).
    """

    _repr_fields: tuple[str, ...] = ("kl", "style", "beta", "clip", "agg", "fold_kl", "max_len", "ratio")
    _repr_defaults: dict = {"fold_kl": False, "max_len": None, "ratio": "token"}

    def __init__(
        self,
        *,
        kl: str | None = None,
        beta: float = 0.0,
        style: str = "differentiable",
        clip: Clip | Truncate | None = None,
        agg: str = "token-mean",
        fold_kl: bool = False,
        max_len: int | None = None,
        ratio: str = "token",
    ) -> None:
        if kl is not None:
            check_choice("kl", kl, KL_TERMS)
        check_choice("style", style, STYLES)
        check_choice("ratio", ratio, RATIOS)
        check_choice("agg", agg, AGG_MODES)
        if isinstance(beta, bool) or not isinstance(beta, Real):
            raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
        if not 0 <= beta < float("inf"):
            raise ValueError(f"beta must be >= 0 and finite, got {beta!r}")
        if kl is None and beta != 0:
            raise ValueError(f"beta={beta!r} needs a KL term: pass kl= one of {', '.join(map(repr, KL_TERMS))}")
        if clip is not None and not isinstance(clip, (Clip, Truncate)):
            raise TypeError(f"clip must be rpg.Clip, rpg.Truncate or None, got {type(clip).__name__}")
        if isinstance(clip, Truncate) and style != "reinforce":
            raise ValueError("clip=rpg.Truncate(...) applies to style='reinforce'; use rpg.Clip for the PPO clip")
        if fold_kl and style != "differentiable":
            raise ValueError("fold_kl applies to style='differentiable' (RPG-Style Clip already branches on A' = g/w)")
        if fold_kl and kl not in ("rkl", "urkl"):
            raise ValueError(
                f"fold_kl=True is biased for kl={kl!r}: folding the KL into the clipped advantage Â = g/w "
                "is exact only for 'rkl' and 'urkl' (for 'fkl'/'ufkl' it drops beta*E_old[c*grad logp] != 0)"
            )
        if ratio == "sequence" and (style != "differentiable" or fold_kl):
            raise ValueError("ratio='sequence' (GSPO) applies to style='differentiable' without fold_kl")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, Integral) or max_len <= 0):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        self.kl, self.beta, self.style, self.clip, self.agg = kl, float(beta), style, clip, agg
        self.fold_kl, self.max_len = bool(fold_kl), None if max_len is None else int(max_len)
        self.ratio = ratio

    @property
    def _spec(self) -> Spec:
        """The kernel's view of the settings, read at each call (so it can never disagree with them)."""
        return Spec(kl=self.kl, beta=self.beta, style=self.style, clip=self.clip, fold_kl=self.fold_kl, ratio=self.ratio)

    @property
    def config(self) -> dict:
        """The :class:`PolicyLoss` configuration this loss is: ``PolicyLoss(**loss.config)`` gives the same loss."""
        return {k: getattr(self, k) for k in PolicyLoss._repr_fields}

    def __repr__(self) -> str:
        shown = {k: getattr(self, k) for k in self._repr_fields}
        shown = {k: v for k, v in shown.items() if k not in self._repr_defaults or v != self._repr_defaults[k]}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __call__(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        batch_num_tokens: int | float | torch.Tensor | None = None,
        global_batch_size: int | float | torch.Tensor | None = None,
    ) -> LossOutput:
        r"""Compute the loss.

        Args:
            logp: ``[B, T]`` log π_θ of the sampled tokens; the only input with gradient.
            old_logp: ``[B, T]`` log π_old (behaviour policy); detached.
            advantages: ``[B]`` or ``[B, T]``; detached. ``None`` means 0 (a pure
                KL objective, e.g. distillation).
            mask: ``[B, T]`` bool or 0/1; nonzero marks response tokens. ``None``: all.
            ref_logp: ``[B, T]`` log π_ref; ``None`` means π_ref = π_old (RPG's
                iterative reference). Required where β > 0 and π_ref ≠ π_old.
            batch_num_tokens: token count of the full batch (``token-mean``).
            global_batch_size: sequence count of the full batch (``seq-mean-*``).

        Returns:
            :class:`LossOutput`. bf16/fp16 inputs are computed in float32;
            float32/float64 in their own dtype.
        """
        check_floating("logp", logp)
        if logp.dim() != 2:
            raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
        check_floating("old_logp", old_logp)
        _check_shape("old_logp", old_logp, logp.shape)
        if ref_logp is not None:
            check_floating("ref_logp", ref_logp)
            _check_shape("ref_logp", ref_logp, logp.shape)
        if advantages is None:
            advantages = torch.zeros(logp.shape[:1], dtype=logp.dtype, device=logp.device)
        if not isinstance(advantages, torch.Tensor) or advantages.is_complex():
            raise TypeError(f"advantages must be a real torch.Tensor, got {getattr(advantages, 'dtype', type(advantages).__name__)}")
        if advantages.shape not in (logp.shape[:1], logp.shape):
            raise ValueError(
                f"advantages must have shape [B] = {tuple(logp.shape[:1])} or [B, T] = {tuple(logp.shape)}, "
                f"got {tuple(advantages.shape)}"
            )
        if mask is None:
            mask = torch.ones(logp.shape, dtype=torch.bool, device=logp.device)
        elif not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        else:
            _check_shape("mask", mask, logp.shape)
            mask = mask.bool()
        check_count("batch_num_tokens", batch_num_tokens)
        check_count("global_batch_size", global_batch_size)

        dtype = compute_dtype(logp.dtype)
        logp = logp.to(dtype)
        old_logp = old_logp.detach().to(dtype)
        if ref_logp is not None:
            ref_logp = ref_logp.detach().to(dtype)
        advantages = advantages.detach().to(dtype)
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(-1)

        per_token = TokenLoss.apply(logp, old_logp, ref_logp, advantages, mask, self._spec)
        loss = aggregate_masked(
            per_token,
            mask,
            self.agg,
            batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size,
            max_len=self.max_len,
        )
        return LossOutput(loss, per_token, (logp.detach(), old_logp, ref_logp, advantages, mask, self._spec, batch_num_tokens))


class RPGLoss(PolicyLoss):
    r"""The eight RPG losses: 4 divergences × 2 styles (paper §3–§4, Algorithms 1–2).

    J(θ) = E_{π_θ}[A] − β·D, D ∈ {fkl, rkl, ufkl, urkl}; for every loss
    E_{π_old}[∇ℓ] = −∇J exactly when no clip binds, also with π_ref ≠ π_old.

    | D | differentiable ℓ | REINFORCE weight g (ℓ = −sg(g)·logp) |
    |---|---|---|
    | fkl | −w·A − β·c·logp | w·A + β·c |
    | rkl | −w·A + β·w·log ρ | w·(A − β(log ρ + 1)) |
    | ufkl | −w·A + β·c·(ρ − 1 − log ρ) | w·A − β(w − c) |
    | urkl | −w·A + β·w·(1/ρ − 1 + log ρ) | w·(A − β·log ρ) |

    w = π_θ/π_old, ρ = π_θ/π_ref, c = π_ref/π_old. With ``clip``, the
    differentiable style uses the PPO / dual clip on the PG term (Algorithm 1,
    KL outside the clip unless ``fold_kl``); the REINFORCE style uses
    RPG-Style Clip (Algorithm 2) or, with :class:`~rpg.Truncate`, truncated IS.

    Args:
        divergence: ``"fkl"``, ``"rkl"``, ``"ufkl"`` or ``"urkl"``.
        style: ``"differentiable"`` (default) or ``"reinforce"``.
        beta: β ≥ 0 (default 1e-4, the paper's).
        clip: default ``Clip(low=0.2, high=0.28, dual=3.0)`` (the paper's); ``None`` for none.
        agg: default ``"token-mean"``.
        fold_kl: see :class:`PolicyLoss`.
        max_len: see :class:`PolicyLoss`.

    Example::

        loss_fn = rpg.RPGLoss("urkl", style="reinforce")
        out = loss_fn(logp, old_logp, advantages, mask)
        out.loss.backward()
    """

    _repr_fields = ("divergence", "style", "beta", "clip", "agg", "fold_kl", "max_len")

    def __init__(
        self,
        divergence: str,
        style: str = "differentiable",
        beta: float = 1e-4,
        clip: Clip | Truncate | None = Clip(),
        agg: str = "token-mean",
        *,
        fold_kl: bool = False,
        max_len: int | None = None,
    ) -> None:
        check_choice("divergence", divergence, DIVERGENCES)
        super().__init__(kl=divergence, beta=beta, style=style, clip=clip, agg=agg, fold_kl=fold_kl, max_len=max_len)

    @property
    def divergence(self) -> str:
        """The divergence D of the objective."""
        return self.kl
