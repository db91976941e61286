r"""Train with any rpg loss inside TRL's ``GRPOTrainer``.

:class:`RPGGRPOTrainer` is a ``trl.GRPOTrainer`` whose loss is an rpg loss
object (``loss=rpg.RPGLoss("urkl", style="reinforce")``, ``rpg.GRPOLoss(...)``,
…). Everything else is TRL's: generation, rewards, group advantages, the old
log-probs (``old_per_token_logps``, present when ``num_iterations > 1`` or
``steps_per_generation > gradient_accumulation_steps``; otherwise the batch is
on-policy and π_old = sg(π_θ)), the reference log-probs and the normalisation
counts. The rpg loss receives

* ``logp`` — TRL's per-token log-probs of the completion under the model;
* ``old_logp`` — ``old_per_token_logps`` (or ``logp.detach()``);
* ``advantages`` — TRL's ``[B]`` group advantages;
* ``mask`` — ``completion_mask`` (times ``tool_mask`` when present);
* ``ref_logp`` — ``ref_per_token_logps`` when TRL computed them
  (``GRPOConfig(beta != 0)`` loads the reference model; the β that counts is
  the rpg loss's), else ``None``: RPG's iterative reference π_ref = π_old;
* ``batch_num_tokens`` — TRL's count of completion tokens in this process's
  gradient-accumulation window (its ``num_items_in_batch`` scaled as for its
  ``dapo`` loss), and ``global_batch_size`` — the sequences in that window —
  so the micro-batch losses sum to one window's loss, and accelerate's mean
  all-reduce across processes gives the global mean.

Every entry of ``out.local_metrics`` is logged through TRL as ``rpg/<name>``
(TRL averages logged values over micro-batches, so they are per-call means).
A Mixture-of-Experts router loss is added as TRL does. GRPOConfig options that
act inside TRL's own loss — ``off_policy_mask_threshold``,
``top_entropy_quantile``, the entropy bonus, the vLLM importance-sampling
correction — are refused with an error rather than silently ignored.
"""

from __future__ import annotations

import torch

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("rpg.integrations.trl needs TRL: pip install 'rpg-losses[trl]' "
                      "(from a clone of rpg: pip install -e '.[trl]')") from e

from ..losses import PolicyLoss

__all__ = ["RPGGRPOTrainer"]


class RPGGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with an rpg policy loss: ``RPGGRPOTrainer(loss=rpg.RPGLoss(...), model=..., ...)``.

    All other arguments are ``GRPOTrainer``'s. See the module docstring for what
    the loss receives and how it is normalised.
    """

    def __init__(self, *args, loss: PolicyLoss, **kwargs) -> None:
        if not isinstance(loss, PolicyLoss):
            raise TypeError(f"loss must be an rpg loss (rpg.PolicyLoss or a preset), got {type(loss).__name__}")
        self.rpg_loss = loss
        super().__init__(*args, **kwargs)
        unsupported = {
            "off_policy_mask_threshold": getattr(self, "off_policy_mask_threshold", None) is not None,
            "top_entropy_quantile < 1": getattr(self, "top_entropy_quantile", 1.0) < 1.0,
            "an entropy bonus (entropy_coef / adaptive entropy)": getattr(self, "_entropy_bonus_enabled", False),
            "vLLM importance-sampling correction": getattr(self, "use_vllm", False)
            and getattr(self, "vllm_importance_sampling_correction", False),
        }
        used = [name for name, on in unsupported.items() if on]
        if used:
            raise ValueError(
                f"RPGGRPOTrainer computes the loss with {type(loss).__name__} and does not apply TRL's "
                f"{', '.join(used)}; unset them in GRPOConfig (or correct with rpg's own options)"
            )

    def _window_counts(self, inputs, mask: torch.Tensor, training: bool):
        """Tokens and sequences of this process's gradient-accumulation window (TRL's normalisation)."""
        steps = self.current_gradient_accumulation_steps if training else 1
        n_items = inputs.get("num_items_in_batch")
        if n_items is None:
            tokens = torch.count_nonzero(mask).to(torch.float32) * steps
        else:
            tokens = torch.as_tensor(n_items, dtype=torch.float32, device=mask.device).clamp(min=1.0)
            tokens = tokens / self.accelerator.num_processes
            if training:
                tokens = tokens * steps / self.args.steps_per_generation
        return tokens, mask.size(0) * steps

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logp, _, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=False,
            compute_aux_loss=self.aux_loss_enabled,
        )
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        training = self.model.training
        tokens, sequences = self._window_counts(inputs, mask, training)
        out = self.rpg_loss(
            logp,
            logp.detach() if old is None else old,
            inputs["advantages"],
            mask,
            ref_logp=inputs.get("ref_per_token_logps"),
            batch_num_tokens=tokens,
            global_batch_size=sequences,
        )
        mode = "train" if training else "eval"
        for name, value in out.local_metrics.items():  # TRL averages logged values over micro-batches
            self._metrics[mode][f"rpg/{name}"].append(value)
        loss = out.loss
        if self.aux_loss_enabled:  # MoE load balancing, scaled for accumulation as TRL does
            loss = loss + self.router_aux_loss_coef * aux_loss / (self.current_gradient_accumulation_steps if training else 1)
        return loss
