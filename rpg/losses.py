r"""Loss classes: the generic [`PolicyLoss`][rpg.losses.PolicyLoss] and its first instance, [`RPGLoss`][rpg.losses.RPGLoss].

A loss object holds one frozen [`LossConfig`][rpg.config.LossConfig] — no networks, no trainer
state — and calling it is [`rpg.policy_loss`][rpg.functional.policy_loss] with that configuration:

```python
import torch, rpg

loss_fn = rpg.RPGLoss("urkl", style="reinforce")
logp = -torch.rand(2, 5, requires_grad=True)  # log π_θ of the sampled tokens, [B, T]
old_logp, advantages, mask = -torch.rand(2, 5), torch.randn(2), torch.ones(2, 5, dtype=torch.bool)
out = loss_fn(logp, old_logp, advantages, mask, ref_logp=None, behavior_logp=None,
              batch_num_tokens=None, global_batch_size=None, weights=None, entropy=None)
out.loss       # scalar; backward() gives the gradient
out.per_token  # [B, T], 0 where mask is 0; differentiable
out.metrics    # dict[str, float] of means over this call's tokens, computed on first access
out.summable_metrics  # its token means over batch_num_tokens: they add up over micro-batches
```

``PolicyLoss`` = policy-gradient term (clip rule) + KL term (divergence
surrogate, in the loss or folded into the advantage) + rollout correction +
per-token weights + entropy bonus + aggregation. Named losses are
configurations of it; their ``repr`` shows the arguments they were built with
and ``.config`` the framework settings. Loss objects are immutable (a setting
cannot drift from what was validated), compare equal when their configurations
are equal, and hash accordingly; ``loss.replace(beta=0.1)`` gives a new one (a named loss keeps
its class where it can express the change: [`PolicyLoss.replace`][rpg.losses.PolicyLoss.replace]).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import warnings
from typing import ClassVar

import torch

from ._util import check_choice
from .clipping import Clip, ClipRule
from .config import RATIOS, STYLES, LossConfig
from .correction import RolloutCorrection
from .functional import policy_loss
from .metrics import LossOutput
from .objectives import DIVERGENCES
from .selection import SelectionRule
from .sequence import SequenceKernel

__all__ = ["LossOutput", "PolicyLoss", "RPGLoss", "STYLES", "RATIOS"]

_FIELDS = (
    "kl",
    "beta",
    "style",
    "clip",
    "agg",
    "fold_kl",
    "max_len",
    "ratio",
    "correction",
    "entropy_coef",
    "weight_kl",
    "kl_anchor",
    "separate_kl",
    "kernel",
    "select",
)


# Other libraries' names for rpg's settings: what a user coming from verl, TRL, OpenRLHF or a paper types.
_PEER_NAMES = {
    **dict.fromkeys(
        (
            "epsilon",
            "eps",
            "epsilon_low",
            "epsilon_high",
            "eps_clip",
            "clip_eps",
            "clip_epsilon",
            "clip_ratio",
            "clip_ratio_low",
            "clip_ratio_high",
            "cliprange",
            "clip_range",
            "cliprange_low",
            "cliprange_high",
            "clip_higher",
        ),
        ("clip", "clip=rpg.Clip(low=…, high=…)"),
    ),
    **dict.fromkeys(("clip_ratio_c", "dual_clip", "dual_clip_ratio", "dual_clip_c"), ("clip", "clip=rpg.Clip(dual=…)")),
    **dict.fromkeys(
        ("beta", "kl_coef", "kl_coeff", "kl_beta", "kl_loss_coef", "init_kl_coef", "kl_ctl", "kl_weight"),
        ("beta", "beta=…"),
    ),
    **dict.fromkeys(
        ("loss_agg_mode", "loss_type", "aggregation", "reduction", "agg_mode"),
        ("agg", "agg=… (one of rpg.aggregation.AGG_MODES)"),
    ),
    **dict.fromkeys(
        ("entropy_coeff", "ent_coef", "entropy_coefficient", "entropy_beta"), ("entropy_coef", "entropy_coef=…")
    ),
    **dict.fromkeys(("kl_loss_type", "kl_penalty", "kl_type", "kl_estimator"), ("kl", "kl=… (one of rpg.KL_TERMS)")),
    **dict.fromkeys(
        ("max_completion_length", "max_response_length", "max_new_tokens", "loss_scale_factor"),
        ("max_len", "max_len=…"),
    ),
    **dict.fromkeys(
        (
            "rollout_is",
            "rollout_is_threshold",
            "rollout_rs",
            "tis_imp_ratio_cap",
            "vllm_importance_sampling_cap",
            "vllm_importance_sampling_correction",
            "imp_ratio_cap",
        ),
        ("correction", "correction=rpg.RolloutCorrection(…)"),
    ),
    **dict.fromkeys(("use_kl_loss", "use_kl_in_reward"), ("beta", "beta=… (0: no KL term)")),
}


def _suggest(cls: type, name: str, valid: list[str]) -> str:
    """``: did you mean …?`` for an argument ``name`` that ``cls`` does not take."""
    peer = _PEER_NAMES.get(name.lower())
    if peer is not None:
        target, spelled = peer
        if target in valid:
            return f": did you mean {spelled}?"
        return (
            f": {cls.__name__} has no {target!r} setting (rpg.PolicyLoss({target}=…) builds any configuration, "
            "and loss.replace(...) changes one)"
        )
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f": did you mean {close[0]}=?" if close else ""


def _checked_init(init):
    """``init`` with Python's bare argument errors replaced by one that lists the valid arguments and
    suggests the nearest (peers' names such as ``epsilon`` → ``clip=rpg.Clip(...)``, then close spellings)."""
    if getattr(init, "_rpg_checked", False) or not inspect.isfunction(init):
        return init  # another descriptor (e.g. a user's functools.partialmethod) keeps Python's behaviour
    sig = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            sig.bind(self, *args, **kwargs)
        except TypeError as err:
            cls = type(self)
            params = [p for p in list(sig.parameters.values())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            valid = [p.name for p in params]
            unknown = [k for k in kwargs if k not in valid]
            listing = f"valid arguments: {', '.join(valid)}"
            if unknown:
                hints = "".join(f"\n  {k!r}{_suggest(cls, k, valid)}" for k in unknown)
                raise TypeError(
                    f"{cls.__name__} got unexpected argument(s) {', '.join(map(repr, unknown))}; {listing}{hints}"
                ) from None
            raise TypeError(f"{cls.__name__}: {err}; {listing}") from None
        return init(self, *args, **kwargs)

    __init__._rpg_checked = True
    return __init__


def _own_arguments(cls: type) -> tuple[str, ...]:
    """The keyword-passable arguments of ``cls.__init__`` (what ``replace`` may rebuild a named loss with)."""
    params = inspect.signature(cls).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in kinds)


_WARNED_NO_REF: set = set()


def _warn_no_reference(loss: PolicyLoss) -> None:
    """Once per class: a loss whose published algorithm has a fixed reference was called without ``ref_logp``."""
    cls = type(loss)
    if cls in _WARNED_NO_REF or torch.compiler.is_compiling():
        return
    _WARNED_NO_REF.add(cls)
    warnings.warn(
        f"{cls.__name__}(beta={loss.beta}) was called without ref_logp: ref_logp=None means π_ref = π_old "
        "(RPG's iterative reference), so the KL term pulls toward the policy that sampled the batch, not toward "
        f"the fixed reference model {cls.__name__}'s algorithm uses. Pass ref_logp= (the reference's log-probs "
        "of the sampled tokens); pass ref_logp=old_logp to choose the iterative reference explicitly, or "
        "beta=0 for no KL term. (Shown once per loss class.)",
        UserWarning,
        stacklevel=3,
    )


class PolicyLoss:
    r"""Generic KL-regularized policy-gradient loss: PG term + KL term + aggregation.

    Per token (all ``[B, T]``; w = π_θ/π_old):

    * ``style="differentiable"``: ℓ = −m·A + β·KL-surrogate, where m = w
      without a clip and the PPO / dual effective ratio with a [`Clip`][rpg.clipping.Clip]
      (the KL surrogate stays outside the clip). With ``fold_kl=True`` the KL is
      folded into the clipped advantage Â = g/w, gradient flowing through it
      (paper Algorithm 1; rkl and urkl only).
    * ``style="reinforce"``: ℓ = −sg(g)·logp with g = −∂ℓ_diff/∂logp, the same
      expected gradient. A [`Clip`][rpg.clipping.Clip] applies RPG-Style Clip
      (Algorithm 2); a [`Truncate`][rpg.clipping.Truncate] evaluates g at sg(clip(w)).
    * ``ratio="sequence"`` (GSPO, differentiable style): the PG term uses the
      sequence ratio s = exp(mean_t log w) in place of w.

    Then, per token, the loss is multiplied by the rollout correction's constant
    weight when the call passes ``behavior_logp`` ([`RolloutCorrection`][rpg.correction.RolloutCorrection])
    and by the call's ``weights``, and ``entropy_coef``·entropy is subtracted.

    The KL terms are those of [`rpg.objectives`][rpg.objectives]: a divergence surrogate
    (fkl, rkl, ufkl, urkl — exact gradients), an unweighted estimator penalty
    (k1, k2, k3 — GRPO-style, see [`rpg.kl`][rpg.kl] for what their gradients follow),
    or ``None``. The per-token loss and its closed-form derivative come from one
    ``autograd.Function`` that saves one tensor; only ``logp`` (and ``entropy``)
    receive gradient. The named losses ([`RPGLoss`][rpg.losses.RPGLoss], [`GRPOLoss`][rpg.presets.GRPOLoss], ...)
    are configurations of this class; [`config`][rpg.config] shows it.

    Args:
        kl: the KL term (one of ``rpg.KL_TERMS``), or ``None``.
        beta: β ≥ 0, the KL coefficient (must be 0 without a KL term).
        style: ``"differentiable"`` or ``"reinforce"``.
        clip: a clip rule ([`Clip`][rpg.clipping.Clip], [`Truncate`][rpg.clipping.Truncate] (reinforce only)) or ``None``.
        agg: aggregation mode ([`rpg.aggregation`][rpg.aggregation]).
        fold_kl: fold the KL into the clipped advantage (differentiable style,
            rkl/urkl only; it drops the KL gradient for fkl/ufkl, so refused there).
        max_len: the constant L of ``seq-mean-token-sum-norm`` (default: T).
        ratio: ``"token"`` (default) or ``"sequence"`` (GSPO).
        correction: the [`RolloutCorrection`][rpg.correction.RolloutCorrection] for calls with ``behavior_logp``
            (default ``None``: ``RolloutCorrection()``, token-level truncation at 2).
        entropy_coef: c_H ≥ 0, the entropy bonus (the call must pass ``entropy=``).
        weight_kl: whether the correction weight and ``weights`` multiply the KL term too
            (default ``True``); ``False`` is TRL's convention (see [`LossConfig`][rpg.config.LossConfig]).
        kl_anchor: ``"ref"`` (default) or ``"behavior"``: the KL term toward ``behavior_logp`` (μ, π_old
            when not given) instead of ``ref_logp`` (see [`LossConfig`][rpg.config.LossConfig]).
        separate_kl: REINFORCE style: the KL term as its own term instead of inside g (see
            [`LossConfig`][rpg.config.LossConfig]).
        kernel: a sequence weight kernel for ``ratio="product"`` ([`rpg.sequence.Gamma`][rpg.sequence.Gamma]).
        select: a token selection rule ([`rpg.selection`][rpg.selection]: Clip-Cov, KL-Cov).
    """

    __slots__ = ("_args", "_config")
    _warn_without_ref: ClassVar[bool] = False  # a preset whose published algorithm has a fixed reference
    _arg_names: tuple[str, ...] = _FIELDS
    _arg_defaults: ClassVar[dict] = {
        "fold_kl": False,
        "max_len": None,
        "ratio": "token",
        "correction": None,
        "entropy_coef": 0.0,
        "weight_kl": True,
        "kl_anchor": "ref",
        "separate_kl": False,
        "kernel": None,
        "select": None,
    }

    def __init__(
        self,
        *,
        kl: str | None = None,
        beta: float = 0.0,
        style: str = "differentiable",
        clip: ClipRule | None = None,
        agg: str = "token-mean",
        fold_kl: bool = False,
        max_len: int | None = None,
        ratio: str = "token",
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
        weight_kl: bool = True,
        kl_anchor: str = "ref",
        separate_kl: bool = False,
        kernel: SequenceKernel | None = None,
        select: SelectionRule | None = None,
    ) -> None:
        cfg = LossConfig(
            kl=kl,
            beta=beta,
            style=style,
            clip=clip,
            agg=agg,
            fold_kl=fold_kl,
            max_len=max_len,
            ratio=ratio,
            correction=correction,
            entropy_coef=entropy_coef,
            weight_kl=weight_kl,
            kl_anchor=kl_anchor,
            separate_kl=separate_kl,
            kernel=kernel,
            select=select,
        )
        self._init(cfg, cfg.as_dict())

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # every loss class, presets added later included
            cls.__init__ = _checked_init(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def _init(self, config: LossConfig, args: dict) -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_args", args)

    @classmethod
    def from_config(cls, config: LossConfig) -> PolicyLoss:
        """The [`PolicyLoss`][rpg.losses.PolicyLoss] holding ``config`` (a [`LossConfig`][rpg.config.LossConfig])."""
        if not isinstance(config, LossConfig):
            raise TypeError(f"config must be rpg.LossConfig, got {type(config).__name__}")
        loss = PolicyLoss.__new__(PolicyLoss)
        loss._init(config, config.as_dict())
        return loss

    # --- settings: read-only views of the one configuration ---------------------------------

    @property
    def loss_config(self) -> LossConfig:
        """The frozen [`LossConfig`][rpg.config.LossConfig] this loss computes with."""
        return self._config

    @property
    def config(self) -> dict:
        """The [`PolicyLoss`][rpg.losses.PolicyLoss] settings this loss is: ``PolicyLoss(**loss.config)`` gives the same loss."""
        return self._config.as_dict()

    kl = property(lambda self: self._config.kl, doc="The KL term, or None.")
    beta = property(lambda self: self._config.beta, doc="β, the KL coefficient.")
    style = property(lambda self: self._config.style, doc="``'differentiable'`` or ``'reinforce'``.")
    clip = property(lambda self: self._config.clip, doc="The clip rule, or None.")
    agg = property(lambda self: self._config.agg, doc="The aggregation mode.")
    fold_kl = property(lambda self: self._config.fold_kl, doc="Whether the KL is folded into Â.")
    max_len = property(lambda self: self._config.max_len, doc="L of seq-mean-token-sum-norm, or None.")
    ratio = property(lambda self: self._config.ratio, doc="``'token'`` or ``'sequence'``.")
    correction = property(lambda self: self._config.correction, doc="The rollout correction, or None.")
    entropy_coef = property(lambda self: self._config.entropy_coef, doc="The entropy bonus coefficient.")
    weight_kl = property(lambda self: self._config.weight_kl, doc="Whether per-token multipliers weight the KL term.")
    kl_anchor = property(lambda self: self._config.kl_anchor, doc="``'ref'`` or ``'behavior'``: the KL term's anchor.")
    separate_kl = property(lambda self: self._config.separate_kl, doc="Whether a REINFORCE-style KL term is separate.")
    kernel = property(lambda self: self._config.kernel, doc="The sequence weight kernel, or None.")
    select = property(lambda self: self._config.select, doc="The token selection rule, or None.")

    def __getattr__(self, name: str):
        args = object.__getattribute__(self, "_args")
        if name in args:  # a preset's own argument (e.g. GRPOLoss.importance_weighted_kl)
            return args[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(
            f"{type(self).__name__} is immutable (its settings were validated once): "
            f"use loss.replace({name}=...) for a new loss with a changed setting"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def replace(self, **changes) -> PolicyLoss:
        """A new loss with settings changed (validated): framework settings (the fields of
        [`LossConfig`][rpg.config.LossConfig]) and, on a named loss, its own arguments.

        A named loss stays its class where it can express the result: ``GRPOLoss().replace(beta=0.1)`` is
        ``GRPOLoss(beta=0.1)`` (its repr, argument names and missing-reference warning included). A
        framework setting keeps its framework meaning: the named loss is rebuilt with that argument
        changed and kept only if its configuration is exactly the replaced one; otherwise (a setting the
        named loss fixes or has no argument for, e.g. ``GRPOLoss().replace(kl="rkl")``, or
        ``CISPOLoss().replace(clip=rpg.Clip())``, whose preset would read the ``Clip`` as truncation
        bounds) the result is the [`PolicyLoss`][rpg.losses.PolicyLoss] of the replaced configuration. A
        named loss's own argument (``PrimeRLLoss().replace(kl_tau=0.01)``,
        ``GRPOLoss().replace(importance_weighted_kl=True)``) rebuilds it with that argument; framework
        settings in the same call then apply to the rebuilt configuration."""
        own = _own_arguments(type(self)) if type(self) is not PolicyLoss else ()
        unknown = set(changes) - set(_FIELDS) - set(own)
        if unknown:
            extra = [k for k in own if k not in _FIELDS]
            also = f"; {type(self).__name__}'s own arguments: {', '.join(extra)}" if extra else ""
            raise TypeError(f"unknown settings {sorted(unknown)}; valid: {', '.join(_FIELDS)}{also}")
        if not own:
            return PolicyLoss.from_config(self._config.replace(**changes))
        base: PolicyLoss = self
        named = {k: v for k, v in changes.items() if k in own and k not in _FIELDS}
        if named:  # the named loss's own arguments: rebuilt by its __init__ (which validates them)
            base = type(self)(**{**self._own_args(own), **named})
        framework = {k: v for k, v in changes.items() if k not in named}
        if not framework:
            return base
        target = base._config.replace(**framework)
        if set(framework) <= set(own):  # can the named loss express it? only if it builds exactly `target`
            try:
                rebuilt = type(self)(**{**base._own_args(own), **framework})
            except (TypeError, ValueError):  # the named loss refuses the setting (e.g. GMPO's fixed agg)
                rebuilt = None
            if rebuilt is not None and rebuilt._config == target:
                return rebuilt
        return PolicyLoss.from_config(target)

    def _own_args(self, own: tuple[str, ...]) -> dict:
        """The arguments this loss was built with, among its class's ``__init__`` arguments ``own``."""
        return {k: self._args[k] for k in own if k in self._args}

    def __eq__(self, other) -> bool:
        if not isinstance(other, PolicyLoss):
            return NotImplemented
        return self._config == other._config

    def __hash__(self) -> int:
        return hash(self._config)

    def __reduce__(self):  # pickle / copy keep the class and the arguments it was built with
        return (_rebuild, (type(self), self._config, dict(self._args)))

    def __repr__(self) -> str:
        shown = {k: self._args[k] for k in self._arg_names if k in self._args}
        shown = {k: v for k, v in shown.items() if k not in self._arg_defaults or v != self._arg_defaults[k]}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __call__(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
        behavior_logp: torch.Tensor | None = None,
        batch_num_tokens: int | float | torch.Tensor | None = None,
        global_batch_size: int | float | torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        r"""Compute the loss ([`rpg.policy_loss`][rpg.functional.policy_loss] with this configuration).

        Args:
            logp: ``[B, T]`` log π_θ of the sampled tokens; the only input with gradient.
            old_logp: ``[B, T]`` log π_old (the proximal policy the ratio and clip anchor on); detached.
            advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``; detached. ``None`` means 0 (a pure
                KL objective, e.g. distillation).
            mask: ``[B, T]`` bool or 0/1; nonzero marks response tokens. ``None``: all.
            ref_logp: ``[B, T]`` log π_ref; ``None`` means π_ref = π_old (RPG's
                iterative reference). Required where β > 0 and π_ref ≠ π_old.
            behavior_logp: ``[B, T]`` log μ of the rollout engine that sampled the tokens;
                ``None`` means μ = π_old (see [`rpg.correction`][rpg.correction]).
            batch_num_tokens: token count of the full batch (``token-mean``).
            global_batch_size: sequence count of the full batch (``seq-mean-*``).
            weights: ``[B, T]`` constant per-token multipliers (see [`rpg.policy_loss`][rpg.functional.policy_loss]).
            entropy: ``[B, T]`` differentiable entropy for the ``entropy_coef`` bonus.
            generator: ``torch.Generator`` for a random selection rule (Clip-Cov); ``None``: torch's default.

        Returns:
            [`LossOutput`][rpg.metrics.LossOutput]. bf16/fp16 inputs are computed in float32;
            float32/float64 in their own dtype.
        """
        if ref_logp is None and self._warn_without_ref and self._config.beta > 0:
            _warn_no_reference(self)
        return policy_loss(
            logp,
            old_logp,
            advantages,
            mask,
            ref_logp,
            behavior_logp,
            batch_num_tokens,
            global_batch_size,
            weights=weights,
            entropy=entropy,
            generator=generator,
            config=self._config,
        )


PolicyLoss.__init__ = _checked_init(PolicyLoss.__init__)  # type: ignore[method-assign]


def _rebuild(cls: type[PolicyLoss], config: LossConfig, args: dict) -> PolicyLoss:
    loss = cls.__new__(cls)
    loss._init(config, args)
    return loss


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
    RPG-Style Clip (Algorithm 2) or, with [`Truncate`][rpg.clipping.Truncate], truncated IS.

    Audited ([`rpg.testing.audit`][rpg.testing.audit], ``clip=None``, β > 0), each divergence D in either style: on-policy D;
    off-policy, per token, D.

    Args:
        divergence: ``"fkl"``, ``"rkl"``, ``"ufkl"`` or ``"urkl"``.
        style: ``"differentiable"`` (default) or ``"reinforce"``.
        beta: β ≥ 0 (default 1e-4, the paper's).
        clip: default ``Clip(low=0.2, high=0.28, dual=3.0)`` (the paper's); ``None`` for none.
        agg: default ``"token-mean"``.
        fold_kl: see [`PolicyLoss`][rpg.losses.PolicyLoss].
        max_len: see [`PolicyLoss`][rpg.losses.PolicyLoss].
        correction: see [`PolicyLoss`][rpg.losses.PolicyLoss].
        entropy_coef: see [`PolicyLoss`][rpg.losses.PolicyLoss].

    For example:

    ```python
    import torch, rpg

    logp = -torch.rand(4, 6, requires_grad=True)  # [B, T]
    old_logp, advantages, mask = -torch.rand(4, 6), torch.randn(4), torch.ones(4, 6, dtype=torch.bool)
    loss_fn = rpg.RPGLoss("urkl", style="reinforce")
    out = loss_fn(logp, old_logp, advantages, mask)
    out.loss.backward()
    ```
    """

    __slots__ = ()
    _arg_names = ("divergence", "style", "beta", "clip", "agg", "fold_kl", "max_len", "correction", "entropy_coef")

    def __init__(
        self,
        divergence: str,
        style: str = "differentiable",
        beta: float = 1e-4,
        clip: ClipRule | None = Clip(),
        agg: str = "token-mean",
        *,
        fold_kl: bool = False,
        max_len: int | None = None,
        correction: RolloutCorrection | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        check_choice("divergence", divergence, DIVERGENCES)
        cfg = LossConfig(divergence, beta, style, clip, agg, fold_kl, max_len, "token", correction, entropy_coef)
        self._init(cfg, {"divergence": divergence, **cfg.as_dict()})

    @property
    def divergence(self) -> str:
        """The divergence D of the objective."""
        return self._config.kl
