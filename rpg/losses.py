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
from .clipping import DUAL, HIGH, LOW, Clip, Truncate
from .kl import DIVERGENCES
from .objectives import kl_value_and_grad

__all__ = ["LossOutput", "PolicyLoss", "RPGLoss", "STYLES"]

STYLES = ("differentiable", "reinforce")


class LossOutput:
    """What a loss call returns: ``loss`` (scalar), ``per_token`` (``[B, T]``) and ``metrics``.

    ``metrics`` is a ``dict[str, float]`` computed from detached tensors the
    first time it is read (one host-device sync then, none before), over the
    tokens where ``mask`` is 1:

    * ``ratio/mean``, ``ratio/min``, ``ratio/max`` — w = π_θ/π_old;
    * ``clip_frac``, ``clip_frac/low``, ``clip_frac/high``, ``clip_frac/dual`` —
      the fraction of tokens whose bound binds (for the advantage sign the
      clip acts on; 0 without a clip);
    * ``kl/old_k1``, ``kl/old_k3``, ``kl/ref_k1``, ``kl/ref_k3`` — k1 and k3
      estimates of KL(π_θ ‖ π_old) and KL(π_θ ‖ π_ref) that treat the tokens as
      drawn from π_θ (exact in expectation on-policy; ``kl/ref_k3`` is the
      value GRPO logs);
    * ``kl/term`` — mean of the loss's own KL surrogate, β excluded (absent when
      the loss has no KL term).

    All are 0 for an all-masked batch. They are computed in float64.
    """

    __slots__ = ("loss", "per_token", "_metric_inputs", "_metrics")

    def __init__(self, loss: torch.Tensor, per_token: torch.Tensor, metric_inputs: tuple) -> None:
        self.loss = loss
        self.per_token = per_token
        self._metric_inputs = metric_inputs
        self._metrics: dict[str, float] | None = None

    @property
    def metrics(self) -> dict[str, float]:
        if self._metrics is None:
            with torch.no_grad():
                self._metrics = _metrics(*self._metric_inputs)
            self._metric_inputs = ()
        return self._metrics

    def __repr__(self) -> str:
        return f"LossOutput(loss={self.loss!r}, per_token=<{tuple(self.per_token.shape)}>)"


def _metrics(logp, old_logp, ref_logp, mask, code, kl) -> dict[str, float]:
    # Diagnostics in float64 (where the device has it): k3 of a log-ratio of 100 is finite there.
    if logp.device.type != "mps":
        logp, old_logp = logp.double(), old_logp.double()
        ref_logp = None if ref_logp is None else ref_logp.double()
    maskf = mask.to(logp.dtype)
    n = maskf.sum()
    denom = n.clamp_min(1)

    def mean(x):
        return torch.where(mask, x, torch.zeros_like(x)).sum() / denom

    log_w = logp - old_logp
    w = log_w.exp()
    log_r = log_w if ref_logp is None else logp - ref_logp
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    has = n > 0
    names = ["ratio/mean", "ratio/min", "ratio/max"]
    if w.numel():
        w_min = torch.where(has, torch.where(mask, w, inf).min(), zero)
        w_max = torch.where(has, torch.where(mask, w, -inf).max(), zero)
    else:  # an empty [0, T] or [B, 0] batch
        w_min = w_max = zero
    values = [mean(w), w_min, w_max]
    for bound, name in ((LOW, "low"), (HIGH, "high"), (DUAL, "dual")):
        names.append(f"clip_frac/{name}")
        values.append(mean((code == bound).to(w.dtype)) if code.numel() else zero)
    names.append("clip_frac")
    values.append(values[-1] + values[-2] + values[-3])
    for prefix, lr in (("kl/old", log_w), ("kl/ref", log_r)):
        names += [f"{prefix}_k1", f"{prefix}_k3"]
        values += [mean(lr), mean(torch.expm1(-lr) + lr)]
    if kl is not None:
        log_c = torch.zeros_like(log_w) if ref_logp is None else ref_logp - old_logp
        names.append("kl/term")
        values.append(mean(kl_value_and_grad(kl, log_w, log_c, logp)[0]))
    return dict(zip(names, torch.stack(values).tolist()))


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

    The KL surrogates are those of :mod:`rpg.objectives` (``kl`` ∈ fkl, rkl, ufkl,
    urkl, or ``None`` for no KL term). The per-token loss and its closed-form
    derivative come from one ``autograd.Function`` that saves one tensor; only
    ``logp`` receives gradient (``old_logp``, ``ref_logp``, ``advantages`` are
    treated as constants).

    Args:
        kl: divergence of the KL term, or ``None``.
        beta: β ≥ 0, the KL coefficient.
        style: ``"differentiable"`` or ``"reinforce"``.
        clip: :class:`~rpg.Clip`, :class:`~rpg.Truncate` (reinforce only) or ``None``.
        agg: aggregation mode (:mod:`rpg.aggregation`).
        fold_kl: fold the KL into the clipped advantage (differentiable style,
            rkl/urkl only; biased for fkl/ufkl, so refused there).
        max_len: the constant L of ``seq-mean-token-sum-norm`` (default: T).
    """

    _repr_first: tuple[str, ...] = ("kl",)  # the settings a subclass's repr leads with

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
    ) -> None:
        if kl is not None:
            check_choice("divergence", kl, DIVERGENCES)
        check_choice("style", style, STYLES)
        check_choice("agg", agg, AGG_MODES)
        if isinstance(beta, bool) or not isinstance(beta, Real):
            raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
        if not 0 <= beta < float("inf"):
            raise ValueError(f"beta must be >= 0 and finite, got {beta!r}")
        if kl is None and beta != 0:
            raise ValueError(f"beta={beta!r} needs a KL term: pass kl= one of {', '.join(map(repr, DIVERGENCES))}")
        if clip is not None and not isinstance(clip, (Clip, Truncate)):
            raise TypeError(f"clip must be rpg.Clip, rpg.Truncate or None, got {type(clip).__name__}")
        if isinstance(clip, Truncate) and style != "reinforce":
            raise ValueError("clip=rpg.Truncate(...) applies to style='reinforce'; use rpg.Clip for the PPO clip")
        if fold_kl and style != "differentiable":
            raise ValueError("fold_kl applies to style='differentiable' (RPG-Style Clip already branches on A' = g/w)")
        if fold_kl and kl in ("fkl", "ufkl"):
            raise ValueError(
                f"fold_kl=True is biased for {kl!r}: folding the KL into the clipped advantage drops "
                "beta*E_old[c*grad logp] != 0 from the gradient; it is exact only for 'rkl' and 'urkl'"
            )
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, Integral) or max_len <= 0):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        self.kl, self.beta, self.style, self.clip, self.agg = kl, float(beta), style, clip, agg
        self.fold_kl, self.max_len = bool(fold_kl), None if max_len is None else int(max_len)
        self._spec = Spec(kl=kl, beta=float(beta), style=style, clip=clip, fold_kl=bool(fold_kl))

    def __repr__(self) -> str:
        shown = {k: getattr(self, k) for k in self._repr_first}
        shown.update(style=self.style, beta=self.beta, clip=self.clip, agg=self.agg)
        if self.fold_kl:
            shown["fold_kl"] = True
        if self.max_len is not None:
            shown["max_len"] = self.max_len
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __call__(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        batch_num_tokens=None,
        global_batch_size=None,
    ) -> LossOutput:
        r"""Compute the loss.

        Args:
            logp: ``[B, T]`` log π_θ of the sampled tokens; the only input with gradient.
            old_logp: ``[B, T]`` log π_old (behaviour policy); detached.
            advantages: ``[B]`` or ``[B, T]``; detached.
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

        per_token, code = TokenLoss.apply(logp, old_logp, ref_logp, advantages, mask, self._spec)
        loss = aggregate_masked(
            per_token,
            mask,
            self.agg,
            batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size,
            max_len=self.max_len,
        )
        kl = self.kl if self.beta != 0 else None
        return LossOutput(loss, per_token, (logp.detach(), old_logp, ref_logp, mask, code, kl))


class RPGLoss(PolicyLoss):
    r"""The eight RPG losses: 4 divergences × 2 styles (paper §3–§4, Algorithms 1–2).

    J(θ) = E_{π_θ}[A] − β·D, D ∈ {fkl, rkl, ufkl, urkl}; for every loss
    E_{π_old}[∇ℓ] = −∇J exactly when no clip binds, also with π_ref ≠ π_old.

    =========  =====================================  ====================================
    D          differentiable ℓ                       REINFORCE weight g (ℓ = −sg(g)·logp)
    =========  =====================================  ====================================
    fkl        −w·A − β·c·logp                        w·A + β·c
    rkl        −w·A + β·w·log ρ                       w·(A − β(log ρ + 1))
    ufkl       −w·A + β·c·(ρ − 1 − log ρ)             w·A − β(w − c)
    urkl       −w·A + β·w·(1/ρ − 1 + log ρ)           w·(A − β·log ρ)
    =========  =====================================  ====================================

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
        fold_kl, max_len: see :class:`PolicyLoss`.

    Example::

        loss_fn = rpg.RPGLoss("urkl", style="reinforce")
        out = loss_fn(logp, old_logp, advantages, mask)
        out.loss.backward()
    """

    _repr_first = ("divergence",)

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
