r"""An rpg loss as a prime-rl custom loss (``[trainer.loss] type = "custom"``).

prime-rl calls a custom loss once per sample as ``fn(inputs, **kwargs)``, with ``inputs`` its
``LossInputs`` (1-D tensors of the sample's tokens): ``trainer_logprobs`` (π_θ, with gradient),
``inference_logprobs`` (the inference engine's μ, which sampled the tokens), ``ref_logprobs``
(π_ref, or ``None`` when the algorithm has no reference model), ``advantages``, ``loss_mask``
(bool) and ``loss_weights`` (``None`` means 1), and expects a ``LossOutputs(loss, metrics)`` whose
``loss`` is the sample's **masked sum**; the trainer adds the samples' losses and divides by the
global count of the component's tokens. There is no recomputed π_old: the ratio anchors on the
engine, so here ``old_logp = inference_logprobs`` (rpg's bypass: ρ = π_old/μ = 1, no correction
weight).

[`rpg_loss`][rpg.integrations.prime_rl.rpg_loss] evaluates the configured rpg loss on the sample
with ``agg="token-sum"`` and ``weights = loss_weights``: the trainer's sum over samples divided by
the global token count is then rpg's ``token-mean`` over the whole batch with
``batch_num_tokens`` = that count, exactly. Another aggregation is not expressible through this
interface (the trainer's denominator is a token count), so ``agg`` is refused.

Configuration (the kwargs of ``[trainer.loss.kwargs]``), all optional:

| kwarg | rpg |
|---|---|
| ``kl``, ``beta``, ``style``, ``fold_kl``, ``ratio``, ``weight_kl`` | the [`PolicyLoss`][rpg.losses.PolicyLoss] settings of the same name |
| ``divergence`` | shorthand for ``kl`` (``"fkl"``, ``"rkl"``, ``"ufkl"``, ``"urkl"``) |
| ``clip`` = ``"ppo"`` with ``clip_low``, ``clip_high``, ``clip_dual`` | [`rpg.Clip`][rpg.clipping.Clip]`(low, high, dual)` |
| ``clip`` = ``"truncate"`` with ``clip_low``, ``clip_high`` | [`rpg.Truncate`][rpg.clipping.Truncate]`(low, high)` |
| ``clip`` = ``"trust_region"`` with ``clip_low``, ``clip_high``, ``clip_divergence``, ``clip_cap`` | [`rpg.TrustRegion`][rpg.clipping.TrustRegion] (DPPO; δ = ``clip_low`` / ``clip_high``) |
| ``reference`` | ``"inference"`` (default: π_ref = μ, RPG's iterative reference) or ``"model"`` (``ref_logprobs``; ``ValueError`` when prime-rl passes ``None``) |
| ``metrics`` | ``True``: rpg's token-mean metrics of the sample, as tensors, under ``rpg/`` (each a GPU sync per sample; off by default) |

```toml
[trainer.loss]
type = "custom"
import_path = "rpg.integrations.prime_rl.rpg_loss"

[trainer.loss.kwargs]
divergence = "urkl"
style = "reinforce"
beta = 1e-3
clip = "ppo"
clip_low = 0.2
clip_high = 0.28
clip_dual = 3.0
```

Tested against the documented interface (prime-rl does not install from the package index): the
tests re-state ``LossInputs`` and the trainer's ``compute_loss`` reduction from
``src/prime_rl/trainer/rl/loss.py`` and compare with rpg's batch loss.
Paper: arXiv 2505.17508.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..clipping import Clip, Truncate, TrustRegion
from ..losses import PolicyLoss
from ..objectives import DIVERGENCES

__all__ = ["LossOutputs", "loss_from_kwargs", "rpg_loss"]

try:  # prime-rl's own output class where it is installed
    from prime_rl.trainer.rl.loss import LossOutputs
except ImportError:

    @dataclass
    class LossOutputs:  # type: ignore[no-redef]  # the same fields as prime-rl's
        """prime-rl's ``LossOutputs``: the sample's loss (a 0-dim tensor) and its metrics (tensors)."""

        loss: torch.Tensor
        metrics: dict[str, torch.Tensor]


_CLIPS = ("ppo", "truncate", "trust_region")
_REFERENCES = ("inference", "model")
_METRICS = ("ratio/mean", "clip_frac", "clip_frac/low", "clip_frac/high", "clip_frac/dual", "kl/ref_k1", "kl/ref_k3")


def _clip(clip, low, high, dual, divergence, cap):
    if clip is None:
        return None
    if clip == "ppo":
        return Clip(low=low, high=high, dual=dual)
    if clip == "truncate":
        return Truncate(low, high)
    if clip == "trust_region":
        return TrustRegion(low, high, divergence, cap)
    raise ValueError(f"clip must be one of {_CLIPS} or None, got {clip!r}")


@functools.lru_cache(maxsize=64)
def _build(items: tuple) -> tuple[PolicyLoss, str, bool]:
    kw = dict(items)
    reference = kw.pop("reference", "inference")
    if reference not in _REFERENCES:
        raise ValueError(f"reference must be one of {_REFERENCES}, got {reference!r}")
    metrics = kw.pop("metrics", False)
    if not isinstance(metrics, bool):
        raise TypeError(f"metrics must be a bool, got {type(metrics).__name__}")
    agg = kw.pop("agg", "token-mean")
    if agg != "token-mean":
        raise ValueError(
            f"agg={agg!r}: prime-rl divides the summed sample losses by the global token count, so the "
            "aggregation is token-mean (batch_num_tokens = that count); other modes are not expressible"
        )
    divergence = kw.pop("divergence", None)
    if divergence is not None:
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if kw.get("kl") not in (None, divergence):
            raise ValueError(f"pass kl or divergence, not both (got kl={kw['kl']!r}, divergence={divergence!r})")
        kw["kl"] = divergence
    clip = _clip(
        kw.pop("clip", None),
        kw.pop("clip_low", 0.2),
        kw.pop("clip_high", 0.2),
        kw.pop("clip_dual", None),
        kw.pop("clip_divergence", "tv"),
        kw.pop("clip_cap", None),
    )
    unknown = set(kw) - {"kl", "beta", "style", "fold_kl", "ratio", "weight_kl"}
    if unknown:
        raise TypeError(f"unknown rpg prime-rl kwargs {sorted(unknown)}")
    return PolicyLoss(clip=clip, agg="token-sum", **kw), reference, metrics


def loss_from_kwargs(**kwargs) -> PolicyLoss:
    """The rpg loss ``[trainer.loss.kwargs]`` describe (with ``agg="token-sum"``, the per-sample sum)."""
    return _build(tuple(sorted(kwargs.items())))[0]


def rpg_loss(inputs, **kwargs) -> LossOutputs:
    """prime-rl custom loss: the sample's masked-sum rpg loss (module docs for the kwargs).

    Args:
        inputs: prime-rl's ``LossInputs`` for one sample (1-D tensors ``[seq]``).
        **kwargs: the loss's settings, ``[trainer.loss.kwargs]``.

    Returns:
        ``LossOutputs(loss, metrics)``: ``loss`` = Σ_t loss_weights_t·ℓ_t over the sample's
        ``loss_mask`` with ``old_logp = inference_logprobs``, ``ref_logp`` per ``reference``.
    """
    loss_fn, reference, want_metrics = _build(tuple(sorted(kwargs.items())))
    logp = inputs.trainer_logprobs
    if logp.dim() != 1:
        raise ValueError(f"prime-rl passes one sample: trainer_logprobs must be 1-D [seq], got {tuple(logp.shape)}")
    ref = None
    if reference == "model" and loss_fn.kl is not None and loss_fn.beta > 0:
        if inputs.ref_logprobs is None:
            raise ValueError(
                "reference='model' needs ref_logprobs, which prime-rl passes only for algorithms with a reference "
                "model; use reference='inference' (π_ref = the engine's policy) or such an algorithm"
            )
        ref = inputs.ref_logprobs[None]
    weights = None if inputs.loss_weights is None else inputs.loss_weights[None]
    advantages = inputs.advantages
    advantages = advantages[None] if advantages.dim() == 1 else advantages.reshape(1, -1)
    out = loss_fn(
        logp[None], inputs.inference_logprobs[None], advantages, inputs.loss_mask[None], ref_logp=ref, weights=weights
    )
    metrics = {}
    if want_metrics:
        m = out.metrics
        metrics = {f"rpg/{k}": torch.tensor(m[k], device=logp.device) for k in _METRICS if k in m}
    return LossOutputs(loss=out.loss, metrics=metrics)
