r"""``RPGGRPOTrainer(..., fused_head=True)``: the training step through [`FusedLinearLoss`][rpg.fused.FusedLinearLoss].

The policy's log-probs, entropies and loss come from the backbone's last hidden states and the LM
head's weight (and bias) in one chunked pass — the ``[B, T, V]`` logits are never formed and the
gradients of the hidden states and the head are computed during the forward pass. The old-policy
and reference log-probs (computed under ``torch.no_grad()`` while TRL scores a generation batch)
go through the chunked [`rpg.logprobs.from_hidden`][rpg.logprobs.from_hidden].

The loss's inputs and the logged metrics are the unfused trainer's own (``_trl_step``: TRL's masks,
counts, vLLM correction, metric names); the trainer's whole micro-batch loss — the rpg loss with
those inputs, and TRL's (adaptive) entropy bonus — is one function of the per-token log-probs and
entropies (``_StepLoss``), so the fused pass differentiates exactly what the unfused trainer
differentiates, and its final values (log-probs, entropies, which are always computed: TRL logs
``entropy`` for every config) give the metrics. Two of TRL's masks need every token's value before
the loss: the off-policy sequence mask (a sequence's mean of ``sampling − logp``) and the
high-entropy token mask (a quantile of the batch's entropies), as does an on-policy batch with a
rollout correction (π_old = π_θ in ρ). Then one extra head pass under ``torch.no_grad()``
(``from_hidden``, no logits kept) computes those values first.

**The head.** ``model.get_output_embeddings()`` of the (unwrapped, PEFT base) model must be a plain
linear map ``x·Wᵀ + b``: a ``torch.nn.Linear`` (tied to the input embeddings or not, with or without
a bias); a PEFT LoRA ``Linear`` on it (``W + scaling·B·A``, the bias plus ``scaling·b_B`` with
``lora_bias``; a ``[V, H]`` tensor is formed, not logits), when its LoRA dropout is 0 or the model is
in eval mode, and without a LoRA variant such as DoRA (TRL 1.16's ``GRPOTrainer`` refuses LoRA on
``lm_head`` itself); or PEFT's ``modules_to_save`` copy of it.
Disabled or merged adapters use the base weight, as PEFT's forward does. The backbone is the
model's ``base_model`` (``model.model`` for Llama/Qwen-style models). Anything else is refused
with the reason, as are PEFT prompt-learning adapters (their virtual tokens enter in ``PeftModel``'s
forward, which the backbone alone skips), models whose config scales or soft-caps the logits, multimodal inputs,
MoE router losses and runs on several processes (the backbone is called outside the distributed
wrapper's forward).
"""

from __future__ import annotations

import functools

import torch

from ..fused import FusedLinearLoss
from ..logprobs import from_hidden
from . import _trl_step


@functools.cache
def _peft():
    """PEFT's classes ``(PeftModel, lora.Linear, BaseTunerLayer, ModulesToSaveWrapper)``, or ``None`` without peft
    (a PEFT-wrapped head then cannot be read and is refused as a module that is not a linear map)."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - exercised only without peft
        return None
    return PeftModel, LoraLinear, BaseTunerLayer, ModulesToSaveWrapper


# Config fields by which Hugging Face models scale or soft-cap their logits after the head (RecurrentGemma's
# logits_soft_cap, 30 by default, is one that TRL's own fused head does not read).
_LOGIT_CAPS = ("final_logit_softcapping", "logits_soft_cap")
_LOGIT_MODIFIERS = (
    *_LOGIT_CAPS,
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def _hf_model(model):
    """The Hugging Face model under a PEFT wrapper (the trainer's model, already unwrapped from accelerate).

    A PEFT prompt-learning adapter (prompt tuning, prefix tuning, P-tuning) acts in ``PeftModel``'s own
    forward (virtual tokens or past key-values), which the backbone alone never sees: refused."""
    peft = _peft()
    if peft is not None and isinstance(model, peft[0]):
        config = model.active_peft_config
        if getattr(config, "is_prompt_learning", False):
            raise ValueError(
                f"fused_head=True runs the backbone without PeftModel's forward, which is where the active "
                f"adapter ({type(config).__name__}, prompt learning) adds its virtual tokens: the log-probs "
                "would be those of the model without the adapter. Use fused_head=False"
            )
        return model.get_base_model()
    return model


def check_trainer(trainer) -> None:
    """Refuse a setup the fused path does not run exactly: several processes (the backbone and head are called
    on the unwrapped model, outside a DDP/FSDP/DeepSpeed wrapper's forward, which that wrapper's gradient
    synchronisation relies on)."""
    processes = trainer.accelerator.num_processes
    if processes > 1:
        raise ValueError(
            f"fused_head=True runs on one process; this run has {processes}: the backbone and the LM head are "
            "called outside the distributed wrapper's forward, whose gradient synchronisation needs it. "
            "Use fused_head=False"
        )


def check_model(model) -> None:
    """Refuse, with the reason, a model whose head or logits the fused path cannot reproduce exactly."""
    hf = _hf_model(model)
    get = getattr(hf, "get_output_embeddings", None)
    if get is None or get() is None:
        raise ValueError(
            f"fused_head=True needs the model's LM head: {type(hf).__name__}.get_output_embeddings() returned none"
        )
    backbone = getattr(hf, "base_model", None)
    if backbone is None or backbone is hf:
        raise ValueError(
            f"fused_head=True runs the model's backbone without its head, and {type(hf).__name__} has no base_model"
        )
    config = getattr(hf, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    for name in _LOGIT_MODIFIERS:
        value = getattr(text, name, None)
        if value is not None and not (name not in _LOGIT_CAPS and value == 1):
            raise ValueError(
                f"fused_head=True computes logits as hidden·Wᵀ + b; this model's config sets {name}={value!r}, "
                "which transforms them after the head. Use fused_head=False"
            )
    if getattr(text, "output_router_logits", False):
        raise ValueError(
            "fused_head=True does not compute the MoE router load-balancing loss (output_router_logits=True): "
            "use fused_head=False"
        )
    head_tensors(get(), training=True)  # refuses a head that is not a linear map (in training)


def head_tensors(module, training: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` with ``module(x) == x·Wᵀ + b`` (differentiable in the module's parameters), or ``ValueError``.

    ``training``: whether LoRA dropout would be active (``None``: the module's own mode).
    """
    peft = _peft()
    _, lora_linear, tuner_layer, modules_to_save = peft if peft is not None else (None, None, None, None)
    if modules_to_save is not None and isinstance(module, modules_to_save):
        active = module.active_adapters
        if module.disable_adapters or not active or any(a not in module.modules_to_save for a in active):
            return head_tensors(module.original_module, training)
        return head_tensors(module.modules_to_save[active[0]], training)
    if lora_linear is not None and isinstance(module, lora_linear):
        return _lora_tensors(module, module.training if training is None else training)
    if tuner_layer is not None and isinstance(module, tuner_layer):
        raise ValueError(
            f"fused_head=True supports LoRA (peft.tuners.lora.Linear) on the LM head; got {type(module).__name__}, "
            "whose output is not read as one weight matrix here. Use fused_head=False"
        )
    if isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward:
        return module.weight, module.bias
    hint = "" if peft is not None else " (a PEFT-wrapped head needs peft installed to be read)"
    raise ValueError(
        f"fused_head=True needs an LM head that is a plain linear map (torch.nn.Linear, or LoRA on one); "
        f"got {type(module).__name__}{hint}. Use fused_head=False"
    )


def _lora_tensors(module, training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = head_tensors(module.get_base_layer(), training)
    if module.disable_adapters or module.merged:  # PEFT's forward then runs the base layer alone
        return weight, bias
    if getattr(module, "fan_in_fan_out", False):
        raise ValueError("fused_head=True: a LoRA head with fan_in_fan_out=True is not a torch.nn.Linear layout")
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}):
            raise ValueError(
                f"fused_head=True: the LoRA adapter {name!r} on the LM head uses a variant "
                f"({type(module.lora_variant[name]).__name__}, e.g. DoRA), which is not a sum of weight matrices"
            )
        dropout = module.lora_dropout[name]
        if training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
            raise ValueError(
                f"fused_head=True: the LoRA adapter {name!r} on the LM head has lora_dropout={dropout.p}, which drops "
                "entries of each hidden state before B·A, so the head is not one weight matrix in training. "
                "Use lora_dropout=0 for the head's adapter, or fused_head=False"
            )
        a, b_layer, scale = module.lora_A[name], module.lora_B[name], module.scaling[name]
        weight = weight + (b_layer.weight @ a.weight) * scale
        if b_layer.bias is not None:
            bias = b_layer.bias * scale if bias is None else bias + b_layer.bias * scale
    return weight, bias


def _backbone_hidden(trainer, model, input_ids, attention_mask, completion_length: int) -> torch.Tensor:
    """``[B, T, H]`` last hidden states at the positions that predict the ``T`` completion tokens."""
    hf = _hf_model(trainer.accelerator.unwrap_model(model))
    with trainer.accelerator.autocast():
        out = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[:, -completion_length - 1 : -1]


def _head(trainer, model):
    return head_tensors(_hf_model(trainer.accelerator.unwrap_model(model)).get_output_embeddings())


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def _refuse_extras(kwargs) -> None:
    given = [k for k in _trl_step.MULTIMODAL if kwargs.get(k) is not None]
    if given:
        raise ValueError(
            f"fused_head=True supports text-only models; the batch has {', '.join(given)}. Use fused_head=False"
        )


def per_token_logps_and_entropies(
    trainer,
    model,
    input_ids,
    attention_mask,
    logits_to_keep,
    batch_size=None,
    compute_entropy=False,
    compute_aux_loss=False,
    **kwargs,
):
    """TRL's ``_get_per_token_logps_and_entropies`` through ``from_hidden``: ``(logp, entropy | None, None)``.

    Used for the old-policy and reference log-probs (under ``torch.no_grad()``); differentiable otherwise
    (``from_hidden``'s exact gradient). Positions whose attention mask is 0 get 0, as in TRL.
    """
    _refuse_extras(kwargs)
    if compute_aux_loss:
        raise ValueError("fused_head=True does not compute the MoE router load-balancing loss")
    t = logits_to_keep
    batch_size = batch_size or input_ids.size(0)
    weight, bias = _head(trainer, model)
    logps, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, am = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        hidden = _backbone_hidden(trainer, model, ids, am, t)
        labels = ids[:, -t:].masked_fill(am[:, -t:] == 0, -100)
        with _no_autocast(hidden.device):
            got = from_hidden(
                hidden,
                weight,
                labels,
                bias=bias,
                temperature=trainer.temperature,
                return_entropy=compute_entropy,
                ignore_index=-100,
            )
        logp, entropy = got if compute_entropy else (got, None)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None


class _StepLoss:
    """The trainer's micro-batch loss as one function of the per-token ``logp`` and ``entropy``.

    ``loss(logp, old, A, mask, ...)`` of the rpg loss with the ``Step``'s
    counts, minus TRL's entropy bonus c·Σ H·m′ / (max(Σ m′, 1)·GA) over the micro-batch's kept tokens m′.
    On-policy (``step.old`` is ``None``) π_old = sg(π_θ) at each call, as in the unfused trainer. Every
    term is a sum over tokens with coefficients fixed before the call, so
    [`FusedLinearLoss`][rpg.fused.FusedLinearLoss]'s chunks add up to it.

    ``entropy_coef = 1`` asks ``FusedLinearLoss`` for the entropies always (TRL logs ``entropy`` for every
    config); ``ratio``, ``select`` and ``correction`` tell it how to chunk. When m′ is not the call's mask
    (``held``: TRL's high-entropy mask with a bonus) every call must cover the whole batch. The value call (no
    gradient: ``FusedLinearLoss``'s last, on the full batch) is kept in ``final``:
    ``(logp, entropy, policy_loss)``, ``policy_loss`` being the rpg loss without the bonus.
    """

    entropy_coef = 1.0

    def __init__(self, loss, step, held: bool):
        self.loss, self.step = loss, step
        self.held = step.kept if held else None  # m′ of the whole batch, or None: m′ is the call's mask
        self.bonus_count = torch.count_nonzero(step.kept)
        self.final: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    ratio = property(lambda self: self.loss.ratio)
    select = property(lambda self: self.loss.select)
    correction = property(lambda self: self.loss.correction)

    def __call__(self, logp, old, advantages, mask, *, entropy, **kw):
        step = self.step
        kw.update(batch_num_tokens=step.tokens, global_batch_size=step.sequences)
        old = logp.detach() if step.old is None else old
        out = self.loss(logp, old, advantages, mask, entropy=entropy, **kw)
        policy_loss = out.loss
        if step.bonus_coef is not None:
            kept = mask.bool() if self.held is None else self.held
            if kept.shape != mask.shape:  # pragma: no cover - compute_loss passes no counts to FusedLinearLoss then
                raise RuntimeError("_StepLoss with a held token mask was called on a row shard")
            out.loss = out.loss - _trl_step.bonus(step.bonus_coef, entropy, kept, self.bonus_count, step.steps)
        if not logp.requires_grad:
            self.final = (logp, entropy, policy_loss.detach())
        return out


def _policy_values(trainer, hidden, weight, bias, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's ``(logp, entropy)`` ``[B, T]`` without gradient (one head pass, no logits kept): what
    TRL's masks read before the loss."""
    with torch.no_grad(), _no_autocast(hidden.device):
        logp, entropy = from_hidden(
            hidden.detach(),
            weight.detach(),
            tokens,
            bias=None if bias is None else bias.detach(),
            temperature=trainer.temperature,
            return_entropy=True,
        )
    return logp, entropy


def compute_loss(trainer, model, inputs):
    """``RPGGRPOTrainer._compute_loss`` with the fused head (see the module docstring)."""
    _refuse_extras(inputs)
    if trainer.aux_loss_enabled:
        raise ValueError("fused_head=True does not compute the MoE router load-balancing loss")
    completion_ids = inputs["completion_ids"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    hidden = _backbone_hidden(trainer, model, input_ids, attention_mask, completion_ids.size(1))
    weight, bias = _head(trainer, model)
    values = (None, None)
    if _trl_step.needs_policy_values(trainer._rpg_plan, inputs):
        values = _policy_values(trainer, hidden, weight, bias, completion_ids)
    step = _trl_step.prepare(trainer, inputs, *values)
    held = step.bonus_coef is not None and trainer._rpg_plan.entropy_quantile is not None
    step_loss = _StepLoss(trainer.rpg_loss, step, held)
    kwargs = step.loss_kwargs()
    if held:  # the bonus's m′ is not the mask: no counts, so every call covers the whole batch
        kwargs.update(batch_num_tokens=None, global_batch_size=None)
    fused = FusedLinearLoss(step_loss, chunk_size=trainer._rpg_fused_chunk_size)
    old = step.old
    if old is None:  # on-policy: π_old = sg(π_θ) in each call (_StepLoss); the tokens outside a chunk hold these
        # placeholders, which a rollout correction reads: a sequence-level ρ of a response that a chunk cuts needs
        # the policy's own values there (computed above whenever there is a correction), else they are unread
        old = values[0] if values[0] is not None else torch.zeros_like(step.mask, dtype=hidden.dtype)
    with _no_autocast(hidden.device):
        out = fused(
            hidden,
            weight,
            completion_ids,
            old,
            step.advantages,
            step.mask,
            bias=bias,
            temperature=trainer.temperature,
            **kwargs,
        )
    if step_loss.final is None:  # pragma: no cover - FusedLinearLoss ends with the value call
        raise RuntimeError("FusedLinearLoss made no value call")
    logp, entropy, policy_loss = step_loss.final
    _trl_step.log_metrics(trainer, step, out, logp, logp if step.old is None else step.old, entropy, policy_loss)
    if step.bonus_coef is not None:
        _trl_step.entropy_controller(trainer, step, entropy)
    return out.loss
