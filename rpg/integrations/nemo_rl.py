r"""An rpg loss as a NeMo-RL ``LossFunction`` (pass it to ``grpo_train(..., loss_fn=...)``).

NeMo-RL's ``LossFunction`` protocol (``nemo_rl/algorithms/loss/interfaces.py``) is called per
micro-batch as ``loss_fn(next_token_logprobs, data, global_valid_seqs, global_valid_toks)`` and
returns ``(loss, metrics)``. ``data`` carries all four policies, aligned with ``input_ids`` (``[B, T]``;
the loss reads ``[:, 1:]`` against the ``[B, T−1]`` next-token log-probs):

| NeMo-RL | rpg |
|---|---|
| ``next_token_logprobs`` | ``logp`` (π_θ) |
| ``data["prev_logprobs"]`` | ``old_logp`` (π_old, recomputed by the trainer) |
| ``data["generation_logprobs"]`` | ``behavior_logp`` (μ, the inference engine), when the loss has a ``correction`` |
| ``data["reference_policy_logprobs"]`` | ``ref_logp`` (``reference="model"``) |
| ``data["advantages"]`` | ``advantages`` |
| ``data["token_mask"] · data["sample_mask"]`` | ``mask`` |
| ``global_valid_toks`` / ``global_valid_seqs`` | ``batch_num_tokens`` / ``global_batch_size`` |

The micro-batch losses are shares of the global batch loss: rpg's ``token-mean`` with
``batch_num_tokens = global_valid_toks`` is NeMo-RL's ``LossType.TOKEN_LEVEL`` reduction and
``seq-mean-token-mean`` with ``global_batch_size = global_valid_seqs`` its ``SEQUENCE_LEVEL`` one
(per-sequence token mean over ``token_mask``, sum over ``sample_mask``, divided by the global
sequence count); NeMo-RL sums them over micro-batches. Its own ``masked_mean`` adds 1e-8 to every
denominator; rpg divides by the counts themselves (the shares then differ by that 1e-8, a
relative 1e-8/count). Other aggregation modes raise ``ValueError``.

``reference="old"`` (the default) is RPG's iterative reference π_ref = π_old and needs no
reference model; ``reference="model"`` reads ``reference_policy_logprobs`` (``ValueError`` when the
batch lacks them). ``generation_logprobs`` reach the loss as ``behavior_logp`` only when the loss
has a [`RolloutCorrection`][rpg.correction.RolloutCorrection] (``correction=``): then rpg weights
each token's whole loss by it; configure no importance-sampling correction in NeMo-RL as well.

Metrics: ``loss`` and ``num_valid_samples`` (read by NeMo-RL's policy workers) and rpg's token means
under ``rpg/`` normalised by ``global_valid_toks`` (so NeMo-RL's sum over micro-batches is the
batch mean); ``metric_normalizations`` advertises that, as NeMo-RL's losses do.

Tested against the documented interface (NeMo-RL does not install from the package index): the
tests re-state the call, the data keys and ``masked_mean``'s global normalisation from
``nemo_rl/algorithms/loss/`` and ``nemo_rl/algorithms/utils.py``. Paper: arXiv 2505.17508.
"""

from __future__ import annotations

from typing import Any

import torch

from ..losses import PolicyLoss

__all__ = ["RPGLossFn"]

_LEVEL = {"token-mean": "token_level", "seq-mean-token-mean": "sequence_level"}
_METRICS = ("ratio/mean", "clip_frac", "clip_frac/low", "clip_frac/high", "clip_frac/dual", "kl/old_k3", "kl/ref_k3")


def _nemo_enums():
    try:
        from nemo_rl.algorithms.loss.interfaces import LossInputType, LossType, MetricNormalizer
    except ImportError:
        return None
    return LossInputType, LossType, MetricNormalizer


class RPGLossFn:
    r"""A NeMo-RL ``LossFunction`` computing an rpg loss with NeMo-RL's global normalisation.

    Args:
        loss: the rpg loss ([`PolicyLoss`][rpg.losses.PolicyLoss] or a preset) with ``agg`` ``"token-mean"``
            (``LossType.TOKEN_LEVEL``) or ``"seq-mean-token-mean"`` (``SEQUENCE_LEVEL``) and ``entropy_coef=0``.
        reference: ``"old"`` (π_ref = π_old) or ``"model"`` (``data["reference_policy_logprobs"]``).

    ``loss_type`` and ``input_type`` are NeMo-RL's enums where ``nemo_rl`` is importable, else their
    string values (``"token_level"`` / ``"sequence_level"``, ``"logprob"``).
    """

    def __init__(self, loss: PolicyLoss, *, reference: str = "old") -> None:
        if not isinstance(loss, PolicyLoss):
            raise TypeError(f"loss must be an rpg PolicyLoss, got {type(loss).__name__}")
        if loss.agg not in _LEVEL:
            raise ValueError(
                f"NeMo-RL normalises by global_valid_toks (token-mean) or global_valid_seqs (seq-mean-token-mean); "
                f"got agg={loss.agg!r}"
            )
        if loss.entropy_coef != 0:
            raise ValueError("the loss receives no entropy from NeMo-RL: use entropy_coef=0")
        if reference not in ("old", "model"):
            raise ValueError(f"reference must be 'old' or 'model', got {reference!r}")
        self.loss = loss
        self.reference = reference
        enums = _nemo_enums()
        level = _LEVEL[loss.agg]
        if enums is None:
            self.loss_type, self.input_type = level, "logprob"
            tokens, none = "tokens", "none"
            grad = "tokens" if level == "token_level" else "sequences"
        else:
            input_type, loss_type, normalizer = enums
            self.loss_type, self.input_type = loss_type(level), input_type.LOGPROB
            tokens, none = normalizer.TOKENS, normalizer.NONE
            grad = normalizer.TOKENS if level == "token_level" else normalizer.SEQUENCES
        self.metric_normalizations = {"loss": grad, "num_valid_samples": none}
        self.metric_normalizations.update({f"rpg/{k}": tokens for k in _METRICS})

    def __repr__(self) -> str:
        return f"RPGLossFn({self.loss!r}, reference={self.reference!r})"

    def __call__(
        self,
        next_token_logprobs: torch.Tensor,
        data,
        global_valid_seqs: torch.Tensor,
        global_valid_toks: torch.Tensor,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The micro-batch's share of the global rpg loss, and its metrics (module docs)."""
        logp = next_token_logprobs
        if logp.dim() != 2:
            raise ValueError(f"next_token_logprobs must be [B, T-1], got {tuple(logp.shape)}")
        mask = (data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)) != 0
        old = data["prev_logprobs"][:, 1:]
        advantages = data["advantages"][:, 1:]
        ref = None
        if self.reference == "model" and self.loss.kl is not None and self.loss.beta > 0:
            if "reference_policy_logprobs" not in data:
                raise ValueError(
                    "reference='model' needs data['reference_policy_logprobs'] (NeMo-RL computes them when a "
                    "reference model is configured)"
                )
            ref = data["reference_policy_logprobs"][:, 1:]
        behavior = data["generation_logprobs"][:, 1:] if self.loss.correction is not None else None
        out = self.loss(
            logp,
            old,
            advantages,
            mask,
            ref_logp=ref,
            behavior_logp=behavior,
            batch_num_tokens=global_valid_toks,
            global_batch_size=global_valid_seqs,
        )
        m = out.summable_metrics  # token means over global_valid_toks: NeMo-RL sums them over micro-batches
        metrics = {f"rpg/{k}": m[k] for k in _METRICS if k in m}
        metrics["loss"] = out.loss.item()
        metrics["num_valid_samples"] = data["sample_mask"].sum().item()
        return out.loss, metrics
