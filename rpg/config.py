r"""The one configuration of a policy loss: frozen, validated once, the single source of its settings.

[`LossConfig`][rpg.config.LossConfig] holds every setting of [`PolicyLoss`][rpg.losses.PolicyLoss] and checks
them in ``__post_init__``. The loss kernel reads it directly (it is hashable, so
``torch.compile`` treats it as a constant), and a loss object's attributes,
``repr``, ``config``, equality and hash all derive from it — there is no second
copy to fall out of step. Being frozen, it cannot be changed after construction:
``dataclasses.replace(cfg, beta=0.1)`` (or ``loss.replace(beta=0.1)``) makes a new,
validated one.

The framework, per token (w = π_θ/π_old, tokens from π_old):

* ``style="differentiable"``: ℓ = −m·Â + β·KL-surrogate, m the clip rule's
  effective ratio (w without a clip; the sequence ratio with ``ratio="sequence"``);
* ``style="reinforce"``: ℓ = −sg(g)·logp with g = −∂ℓ_diff/∂logp, the clip rule
  masking or truncating it;

then, before aggregation, times the rollout correction ρ̄ (``correction``) and the
caller's ``weights``, minus ``entropy_coef``·entropy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ._util import as_int, as_real, check_choice
from .aggregation import AGG_MODES
from .clipping import Clip, ClipRule
from .correction import RolloutCorrection
from .objectives import KL_TERMS, REGISTRY, KLTerm
from .selection import SelectionRule
from .sequence import SequenceKernel

__all__ = ["LossConfig", "STYLES", "RATIOS", "KL_ANCHORS"]

STYLES = ("differentiable", "reinforce")
RATIOS = ("token", "sequence", "geometric", "product")
KL_ANCHORS = ("ref", "behavior")


@dataclass(frozen=True)
class LossConfig:
    r"""Every setting of a policy loss, validated once.

    Args:
        kl: the KL term (one of ``rpg.KL_TERMS``), or ``None``.
        beta: β ≥ 0, the KL coefficient (must be 0 without a KL term).
        style: ``"differentiable"`` or ``"reinforce"``.
        clip: a clip rule ([`Clip`][rpg.clipping.Clip], [`Truncate`][rpg.clipping.Truncate], …) or ``None``.
        agg: aggregation mode ([`rpg.aggregation`][rpg.aggregation]).
        fold_kl: fold the KL into the clipped advantage (differentiable style, only
            for terms where that is exact: rkl, urkl).
        max_len: the constant L of ``seq-mean-token-sum-norm`` (default: T).
        ratio: ``"token"``; ``"sequence"`` (GSPO: the PG term uses
            s = exp(mean_t log w), clipped; in the REINFORCE style g = w̄(s)·A, CISPO on the
            sequence ratio, with any KL term separate, ``separate_kl=True``); ``"geometric"`` (GMPO: s =
            exp(mean_t log m_t) of the clip's per-token effective ratios m_t; differentiable style,
            ``clip`` an [`rpg.Clip`][rpg.clipping.Clip] or ``None``); ``"product"`` (the sequence
            ratio W = Π_t w_t, no length normalisation, as the REINFORCE weight's importance
            weight; REINFORCE style, no clip) — see [`rpg.sequence`][rpg.sequence].
        correction: the [`RolloutCorrection`][rpg.correction.RolloutCorrection] applied when a call passes
            ``behavior_logp`` (``None``: ``RolloutCorrection()`` then).
        entropy_coef: c_H ≥ 0; the loss subtracts c_H·agg(entropy) (the call's
            ``entropy=``).
        weight_kl: whether the per-token multipliers — the rollout correction's weight and
            the call's ``weights`` — multiply the KL term too (``True``, the default: the whole
            per-token loss, which keeps the KL gradient exact under a behaviour policy) or only
            the policy-gradient term (``False``: TRL's convention for its vLLM weight and token
            masks; differentiable style without ``fold_kl``, or ``separate_kl``, where the two terms
            are separate).
        kl_anchor: which log-probability the KL term compares ``logp`` with: ``"ref"`` (the default,
            ``ref_logp``, π_old when it is not given) or ``"behavior"`` (the sampler μ: the call's
            ``behavior_logp``, π_old when it is not given — a penalty toward the policy that sampled
            the tokens, as DRO / Kimi-1.5's ½(log π − log μ)² and prime-rl's). With ``"behavior"``
            a call must not pass ``ref_logp`` (it would be unused).
        separate_kl: REINFORCE style only: add the KL term as its own term, value β·surrogate and
            derivative β·∂surrogate/∂logp (as the differentiable style does), instead of folding its
            derivative into the REINFORCE weight g (the default, where a clip or truncation acts on
            both). The per-token loss is then −sg(w̄·A)·logp + β·surrogate (DRO's form).
    """

    kl: str | None = None
    beta: float = 0.0
    style: str = "differentiable"
    clip: ClipRule | None = None
    agg: str = "token-mean"
    fold_kl: bool = False
    max_len: int | None = None
    ratio: str = "token"
    correction: RolloutCorrection | None = None
    entropy_coef: float = 0.0
    weight_kl: bool = True
    kl_anchor: str = "ref"
    separate_kl: bool = False
    kernel: SequenceKernel | None = None
    select: SelectionRule | None = None

    def __post_init__(self) -> None:
        if self.kl is not None:
            check_choice("kl", self.kl, KL_TERMS)
        check_choice("style", self.style, STYLES)
        check_choice("ratio", self.ratio, RATIOS)
        check_choice("agg", self.agg, AGG_MODES)
        beta = as_real("beta", self.beta)
        if not 0 <= beta < math.inf:
            raise ValueError(f"beta must be >= 0 and finite, got {self.beta!r}")
        if self.kl is None and beta != 0:
            raise ValueError(f"beta={beta!r} needs a KL term: pass kl= one of {', '.join(map(repr, KL_TERMS))}")
        if self.clip is not None and not isinstance(self.clip, ClipRule):
            raise TypeError(
                f"clip must be a clip rule (rpg.Clip, rpg.Truncate, ...) or None, got {type(self.clip).__name__}"
            )
        if self.clip is not None and self.style not in self.clip.styles:
            raise ValueError(
                f"clip={self.clip!r} applies to style={' or '.join(map(repr, self.clip.styles))}, not {self.style!r}"
                + ("; use rpg.Clip for the PPO clip" if self.style == "differentiable" else "")
            )
        if not isinstance(self.fold_kl, bool):
            raise TypeError(f"fold_kl must be a bool, got {type(self.fold_kl).__name__}")
        if self.fold_kl and self.style != "differentiable":
            raise ValueError("fold_kl applies to style='differentiable' (RPG-Style Clip already branches on A' = g/w)")
        if self.fold_kl and (self.kl is None or REGISTRY[self.kl].fold is None):
            exact = [name for name, t in REGISTRY.items() if t.fold is not None]
            raise ValueError(
                f"fold_kl=True is biased for kl={self.kl!r}: folding the KL into the clipped advantage Â = g/w "
                f"is exact only for {' and '.join(map(repr, exact))} (for 'fkl'/'ufkl' it drops "
                "beta*E_old[c*grad logp] != 0)"
            )
        if self.ratio == "sequence" and self.fold_kl:
            raise ValueError("ratio='sequence' (GSPO) applies without fold_kl")
        if (
            self.ratio == "sequence"
            and self.style == "reinforce"
            and self.kl is not None
            and beta != 0
            and not self.separate_kl
        ):
            # REINFORCE on the sequence ratio: g = w̄(s)·A. A KL term's weight is per token, so it cannot
            # share g; with separate_kl=True it is its own differentiable per-token term.
            raise ValueError(
                "ratio='sequence' with style='reinforce' weights the policy-gradient term by the sequence ratio; "
                "a KL term must then be separate from it: pass separate_kl=True"
            )
        if self.ratio == "geometric" and (self.style != "differentiable" or self.fold_kl):
            raise ValueError("ratio='geometric' (GMPO) applies to style='differentiable' without fold_kl")
        if self.ratio == "product" and self.style != "reinforce":
            raise ValueError(
                "ratio='product' (the sequence ratio W = prod_t w_t as the REINFORCE weight's importance weight, "
                "VESPO) applies to style='reinforce'"
            )
        if self.kernel is not None and not isinstance(self.kernel, SequenceKernel):
            raise TypeError(
                f"kernel must be a weight kernel (rpg.sequence.Gamma) or None, got {type(self.kernel).__name__}"
            )
        if self.kernel is not None and self.ratio != "product":
            raise ValueError(
                f"kernel={self.kernel!r} weights the sequence ratio: it needs ratio='product', not {self.ratio!r}"
            )
        if self.select is not None and not isinstance(self.select, SelectionRule):
            raise TypeError(
                "select must be a selection rule (rpg.selection.CovarianceDrop, rpg.selection.CovariancePenalty) "
                f"or None, got {type(self.select).__name__}"
            )
        if self.select is not None and (self.style != "differentiable" or self.ratio != "token" or self.fold_kl):
            raise ValueError(
                f"select={self.select!r} (Clip-Cov / KL-Cov) applies to style='differentiable' with ratio='token' "
                "and without fold_kl"
            )
        max_len = self.max_len
        if max_len is not None:
            max_len = as_int("max_len", max_len)
            if max_len <= 0:
                raise ValueError(f"max_len must be a positive int or None, got {self.max_len!r}")
        if self.correction is not None and not isinstance(self.correction, RolloutCorrection):
            raise TypeError(f"correction must be rpg.RolloutCorrection or None, got {type(self.correction).__name__}")
        if not isinstance(self.weight_kl, bool):
            raise TypeError(f"weight_kl must be a bool, got {type(self.weight_kl).__name__}")
        check_choice("kl_anchor", self.kl_anchor, KL_ANCHORS)
        if self.kl_anchor != "ref" and self.kl is None:
            raise ValueError(f"kl_anchor={self.kl_anchor!r} sets the anchor of a KL term: pass kl= as well")
        if not isinstance(self.separate_kl, bool):
            raise TypeError(f"separate_kl must be a bool, got {type(self.separate_kl).__name__}")
        if self.separate_kl and (self.style != "reinforce" or self.kl is None):
            raise ValueError(
                "separate_kl=True applies to style='reinforce' with a KL term (kl=...); in the differentiable "
                "style the KL term is already separate unless fold_kl=True"
            )
        separate = (self.style == "differentiable" and not self.fold_kl) or self.separate_kl
        if not self.weight_kl and not separate:
            raise ValueError(
                "weight_kl=False needs the KL term separate from the policy-gradient term: style='differentiable' "
                "without fold_kl, or style='reinforce' with separate_kl=True (otherwise one weight g carries both)"
            )
        if self.clip is not None and self.ratio == "geometric" and not isinstance(self.clip, Clip):
            raise ValueError(
                f"ratio='geometric' (GMPO) clips each token's log-ratio with an rpg.Clip's bounds; got clip={self.clip!r}"
            )
        if self.clip is not None and self.ratio == "product":
            raise ValueError(
                "ratio='product' takes no clip rule (a kernel, e.g. rpg.sequence.Gamma, bounds the sequence "
                f"weight); got clip={self.clip!r}"
            )
        if self.clip is not None and self.ratio not in (*self.clip.ratios, "geometric"):
            raise ValueError(
                f"clip={self.clip!r} applies to ratio={' or '.join(map(repr, self.clip.ratios))}, not {self.ratio!r}"
            )
        entropy_coef = as_real("entropy_coef", self.entropy_coef)
        if not 0 <= entropy_coef < math.inf:
            raise ValueError(f"entropy_coef must be >= 0 and finite, got {self.entropy_coef!r}")
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "max_len", max_len)
        object.__setattr__(self, "entropy_coef", entropy_coef)

    @property
    def has_kl(self) -> bool:
        """Whether the loss has a KL term with β ≠ 0."""
        return self.kl is not None and self.beta != 0

    @property
    def kl_term(self) -> KLTerm:
        """The KL term's [`KLTerm`][rpg.objectives.KLTerm] record (``ValueError`` without a KL term)."""
        if self.kl is None:
            raise ValueError("this configuration has no KL term (kl=None)")
        return REGISTRY[self.kl]

    def replace(self, **changes) -> LossConfig:
        """A new, validated configuration with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The settings as a dict (``LossConfig(**cfg.as_dict()) == cfg``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
