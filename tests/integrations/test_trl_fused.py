"""RPGGRPOTrainer(fused_head=True): the same loss, every parameter's gradient and every logged metric as unfused.

Both paths run RPGGRPOTrainer's real ``_compute_loss`` on a stub ``self`` (one process, the attributes
GRPOTrainer derives from a real ``GRPOConfig``, every ``_rpg_*`` method bound) with a tiny float64 Llama: the
unfused one with the model's full logits, the fused one from its backbone's hidden states and its head. Inputs
are real log-probs (≤ 0). The grid covers every GRPOConfig setting the trainer maps (``MAPPED`` of
test_trl_equivalence, which checks those against TRL's own loss), a sample of test_trl_grid's grid, the vLLM
correction modes with an unscored token (off- and on-policy), given rpg losses, the adaptive entropy bonus,
eval mode, tool masks and on-policy batches, over temperatures, tied/untied embeddings and a head with a bias;
each compares the loss (1e-12), the gradients (1e-10) and the logged metrics (the same keys, values to 1e-9).
Real training runs end at the unfused run's parameters, and what the fused path cannot reproduce is refused.
"""

import contextlib
import types

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")


import rpg
from rpg.integrations import _trl_fused
from rpg.integrations.trl import RPGGRPOTrainer, _plan
from tests.integrations.test_trl_equivalence import (
    MAPPED,
    VLLM_MODES,
    _Accelerator,
    _as_rpg_trainer,
    _config,
    _is_ratio,
)
from tests.integrations.test_trl_equivalence import _stub as _trl_stub

DT = torch.float64
B, P, T, V, H = 6, 3, 7, 13, 16
LENGTHS = [7, 5, 3, 1, 0, 6]


class _Acc(_Accelerator):
    def unwrap_model(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext()


def _model(tied=False, bias=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).to(DT)
    if bias:
        head = torch.nn.Linear(H, V, bias=True, dtype=DT)
        with torch.no_grad():
            head.bias.normal_(0, 0.5)
            head.weight.normal_(0, 0.3)
        if tied:
            head.weight = model.model.embed_tokens.weight
        model.lm_head = head
    return model


def _unfused_logps(model, temperature):
    """The materialised path: the model's full ``[B, L, V]`` logits."""

    def get(m, input_ids, attention_mask, logits_to_keep, compute_entropy=False, compute_aux_loss=False, **kw):
        logits = m(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1 : -1]
        lsm = torch.log_softmax(logits / temperature, -1)
        entropy = -(lsm.exp() * lsm).sum(-1) if compute_entropy else None
        return lsm.gather(-1, input_ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1), entropy, None

    return get


def _stub(args, model, fused, training=True, chunk=8, loss=None):
    """test_trl_equivalence's ``self`` (GRPOTrainer's attributes from ``args``) with every ``_rpg_*`` method, the
    fused head's settings and the unfused path's log-probs from the model's full logits."""
    s = _as_rpg_trainer(_trl_stub(args, None, None, training), args, loss, has_rollout_logprobs=True)
    s.temperature = args.temperature
    s.accelerator = _Acc()
    s._rpg_fused, s._rpg_fused_chunk_size = fused, chunk
    if fused:
        s._get_per_token_logps_and_entropies = types.MethodType(RPGGRPOTrainer._get_per_token_logps_and_entropies, s)
    else:
        s._get_per_token_logps_and_entropies = _unfused_logps(model, args.temperature)
    return s


def _inputs(args, model, seed=0, old=True, tool=False, nan_token=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    cm = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).long()
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[2, 0] = 0  # a left-padded prompt
    inputs = {
        "prompt_ids": torch.randint(1, V, (B, P), generator=g),
        "prompt_mask": prompt_mask,
        "completion_ids": ids,
        "completion_mask": cm,
        "advantages": torch.tensor([1.0, -0.5, 0.3, -1.2, 0.7, -0.1], dtype=DT),
        "num_items_in_batch": (cm.sum() + 9).to(DT),
    }
    with torch.no_grad():
        get = _unfused_logps(model, args.temperature)
        logp = get(
            model,
            torch.cat([inputs["prompt_ids"], ids], 1),
            torch.cat([prompt_mask, cm], 1),
            T,
        )[0]
    mask = cm
    if tool:
        inputs["tool_mask"] = torch.ones(B, T, dtype=torch.long)
        inputs["tool_mask"][0, 2:4] = 0
        mask = cm * inputs["tool_mask"]
    if old:  # off-policy: clips and masks bind (log-probs, ≤ 0)
        inputs["old_per_token_logps"] = (logp + 0.3 * torch.randn(B, T, dtype=DT, generator=g)).clamp(max=0)
    if args.beta != 0:
        inputs["ref_per_token_logps"] = (logp + 0.5 * torch.randn(B, T, dtype=DT, generator=g)).clamp(max=0)
    if args.use_vllm:
        ref = inputs.get("old_per_token_logps", logp)
        mu = (ref + 0.4 * torch.randn(B, T, dtype=DT, generator=g)).clamp(max=0) * cm  # right-padded with 0.0
        if nan_token:
            mu[1, 1] = float("nan")
        inputs["sampling_per_token_logps"] = mu
        if args.vllm_importance_sampling_correction:
            inputs["importance_sampling_ratio"] = _is_ratio(args, ref, mu, mask)
    return inputs


def _loss_and_grads(args, model, inputs, fused, training=True, chunk=8, loss=None):
    model.zero_grad(set_to_none=True)
    s = _stub(args, model, fused, training, chunk, loss)
    value = RPGGRPOTrainer._compute_loss(s, model, dict(inputs))
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads, s


def _same_metrics(got, want):
    """The same keys, TRL's names among them, and the same values to float tolerance (NaN where NaN)."""
    assert set(got) == set(want), set(got) ^ set(want)
    assert {"entropy", "policy_loss"} <= set(want) and any(k.startswith("rpg/") for k in want)
    for key, values in want.items():
        torch.testing.assert_close(
            torch.tensor(got[key], dtype=DT),
            torch.tensor(values, dtype=DT),
            rtol=1e-9,
            atol=1e-12,
            equal_nan=True,
            msg=key,
        )


def _compare(args, *, tied=False, bias=False, training=True, chunk=8, loss=None, **mk):
    model = _model(tied, bias)
    inputs = _inputs(args, model, **mk)
    want, want_g, ws = _loss_and_grads(args, model, inputs, False, training, loss=loss)
    got, got_g, gs = _loss_and_grads(args, model, inputs, True, training, chunk, loss=loss)
    assert set(got_g) == set(want_g) == {n for n, _ in model.named_parameters()}
    assert sum(g.abs().max() for g in want_g.values()) > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-10, atol=1e-12, msg=name)
    mode = "train" if training else "eval"
    _same_metrics(gs._metrics[mode], ws._metrics[mode])
    return gs, ws


# Model variants rotated over the settings: (temperature, tied embeddings, bias on the head).
VARIANTS = [(1.0, False, False), (0.7, True, False), (1.3, False, True), (0.9, True, True)]


@pytest.mark.parametrize("i,kw", list(enumerate(MAPPED.values())), ids=MAPPED.keys())
def test_fused_head_equals_the_unfused_trainer(i, kw):
    """Loss, every parameter's gradient and every logged metric (TRL's names, rpg/*) over GRPOConfig's grid."""
    temperature, tied, bias = VARIANTS[i % len(VARIANTS)]
    _compare(_config(temperature=temperature, **kw), tied=tied, bias=bias)


def test_fused_head_equals_the_unfused_trainer_on_a_sample_of_the_grpo_config_grid():
    """test_trl_grid's grid (loss type × clip × δ × KL × ratio level × vLLM mode × entropy options), a fixed
    sample of the settings the trainer accepts: the same loss, gradients and metrics, fused or not."""
    import random

    from tests.integrations.test_trl_grid import grid

    compared = 0
    for i, kw in enumerate(random.Random(1).sample(list(grid()), 160)):
        try:
            args = _config(temperature=VARIANTS[i % len(VARIANTS)][0], **kw)
            _plan(args, log=False)
        except (ValueError, TypeError):  # GRPOConfig rejects it, or the trainer refuses it (test_trl_grid)
            continue
        _, tied, bias = VARIANTS[i % len(VARIANTS)]
        _compare(args, tied=tied, bias=bias, nan_token=args.use_vllm)
        compared += 1
    assert compared >= 100, compared


VLLM_SETTINGS = {
    "grpo-kl": {"loss_type": "grpo", "beta": 0.04},
    "bnpo-opsm-bonus-quantile": {
        "loss_type": "bnpo",
        "off_policy_mask_threshold": 0.02,
        "entropy_coef": 0.01,
        "top_entropy_quantile": 0.6,
    },
    # a sequence-level term: the token-level weight folded into the response-averaged weights
    "sequence-quantile": {"loss_type": "grpo", "importance_sampling_level": "sequence", "top_entropy_quantile": 0.5},
    "cispo-kl": {"loss_type": "cispo", "beta": 0.04, "epsilon_high": 1.1},
    "vespo-kl-bonus": {"loss_type": "vespo", "beta": 0.04, "entropy_coef": 0.01},
}


@pytest.mark.parametrize("mode", VLLM_MODES)
@pytest.mark.parametrize("kw", VLLM_SETTINGS.values(), ids=VLLM_SETTINGS.keys())
def test_fused_head_with_the_vllm_correction(mode, kw):
    """vLLM's correction in its four modes, with a token vLLM could not score (NaN: ρ = 1)."""
    lower = 0.6 if mode.startswith("token") else None
    args = _config(
        use_vllm=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=1.5,
        vllm_importance_sampling_clip_min=lower,
        temperature=0.8,
        **kw,
    )
    gs, _ = _compare(args, tied=mode.endswith("mask"), bias=mode.startswith("token"), nan_token=True)
    assert any(k.startswith("rollout_corr/") for k in gs._metrics["train"])


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask", "sequence_truncate"])
@pytest.mark.parametrize("kw", [VLLM_SETTINGS["grpo-kl"], VLLM_SETTINGS["sequence-quantile"]], ids=["grpo-kl", "fold"])
@pytest.mark.parametrize("chunk", [8, 3])
def test_fused_head_with_the_vllm_correction_on_policy(mode, kw, chunk):
    """No old log-probs (π_old = sg(π_θ)): the unscored token's ρ = 1 and a folded token-level weight need the
    policy's log-probs before the loss, which the fused path takes from its pass without gradient. A
    sequence-level ρ reads π_old at every token of its response, also where a chunk of 3 tokens cuts it."""
    args = _config(use_vllm=True, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=1.5, **kw)
    _compare(args, old=False, nan_token=True, bias=True, chunk=chunk)


GIVEN_LOSSES = {
    "grpo-trl-convention-vllm-masks": (
        {
            "loss_type": "grpo",
            "beta": 0.04,
            "epsilon_high": 0.28,
            "use_vllm": True,
            "vllm_importance_sampling_mode": "token_mask",
            "top_entropy_quantile": 0.5,
            "off_policy_mask_threshold": 0.05,
        },
        rpg.GRPOLoss(beta=0.04, clip=rpg.Clip(0.2, 0.28, dual=None), importance_weighted_kl=True).replace(
            weight_kl=False
        ),
    ),
    "rpg-urkl-reinforce": ({"beta": 0.1}, rpg.RPGLoss("urkl", style="reinforce", beta=0.1)),
    "rpg-own-entropy-bonus": ({}, rpg.DAPOLoss(entropy_coef=0.02)),
    "cispo-preset": ({"loss_type": "cispo", "epsilon_high": 1.5}, rpg.CISPOLoss(clip=rpg.Truncate(None, 0.5))),
}


@pytest.mark.parametrize("kw,loss", GIVEN_LOSSES.values(), ids=GIVEN_LOSSES.keys())
def test_fused_head_with_a_given_loss(kw, loss):
    _compare(_config(temperature=0.9, **kw), loss=loss, tied=True, bias=True, nan_token=True)


@pytest.mark.parametrize(
    "kw,mk",
    [
        ({"loss_type": "grpo", "beta": 0.04}, {"old": False, "tool": True}),
        ({"loss_type": "dapo", "entropy_coef": 0.02, "top_entropy_quantile": 0.5}, {"old": False}),
        ({"loss_type": "luspo", "importance_sampling_level": "sequence"}, {"training": False}),
        ({"loss_type": "bnpo", "entropy_coef": 0.01, "top_entropy_quantile": 0.4}, {"training": False, "bias": True}),
        ({"loss_type": "dapo"}, {"chunk": None, "tied": True}),
    ],
    ids=["on-policy-tool-mask", "on-policy-bonus-quantile", "eval-sequence", "eval-bonus-quantile", "default-chunk"],
)
def test_fused_head_on_policy_eval_and_default_chunk(kw, mk):
    _compare(_config(**kw), **mk)


@pytest.mark.parametrize(
    "kw",
    [{"loss_type": "grpo", "beta": 0.04}, {"entropy_coef": 0.01, "top_entropy_quantile": 0.5}],
    ids=["kl", "bonus"],
)
def test_fused_head_without_gradient_gives_the_same_loss_and_metrics(kw):
    """Evaluation runs compute_loss under torch.no_grad(): FusedLinearLoss's lean path, no gradient work."""
    args = _config(temperature=0.8, **kw)
    model = _model(bias=True)
    inputs = _inputs(args, model)
    want_s, got_s = _stub(args, model, False, False), _stub(args, model, True, False)
    with torch.no_grad():
        want = RPGGRPOTrainer._compute_loss(want_s, model, dict(inputs))
        got = RPGGRPOTrainer._compute_loss(got_s, model, dict(inputs))
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    _same_metrics(got_s._metrics["eval"], want_s._metrics["eval"])


@pytest.mark.parametrize(
    "kw,loss",
    [
        ({"loss_type": "dapo", "use_vllm": True}, rpg.PrimeRLLoss(kl_tau=0.05)),
        ({"loss_type": "dapo", "use_vllm": True}, rpg.DROLoss(beta=0.1)),
        ({"loss_type": "dapo"}, rpg.PrimeRLLoss(kl_tau=0.05)),
        ({"loss_type": "grpo", "beta": 0.04}, None),
    ],
    ids=["prime-rl-vllm", "dro-vllm", "prime-rl", "grpo-config"],
)
def test_the_logged_kl_is_the_losss_own_kl_term(kw, loss):
    """TRL's ``kl`` is the mean of the loss's KL term (β excluded), so it equals ``rpg/kl/term`` on a
    token-level loss: a behaviour-anchored loss (kl_anchor="behavior") compares π_θ with vLLM's μ, not with
    π_old (the value logged before differed: 0.027 against the term's 0.076 for prime-rl-vllm)."""
    gs, ws = _compare(_config(temperature=0.9, **kw), loss=loss, bias=True)
    for s in (gs, ws):
        metrics = s._metrics["train"]
        torch.testing.assert_close(
            torch.tensor(metrics["kl"], dtype=DT), torch.tensor(metrics["rpg/kl/term"], dtype=DT), rtol=1e-12, atol=0
        )
        assert metrics["kl"][0] > 1e-3


def test_the_logged_kl_ignores_values_at_tokens_outside_the_mask():
    """A token outside the loss's mask (a tool's output, tool_mask 0) may hold any log-prob: an old log-prob of
    -1000 there gives an infinite ratio, which ``(x * mask).sum()`` turned into a NaN ``kl`` (0·inf) on both
    paths while the loss and ``rpg/kl/term`` ignore it. The logged ``kl`` is the mean over the masked tokens."""
    args = _config(loss_type="grpo", beta=0.04, temperature=0.9)  # use_bias_correction_kl: r·k3
    model = _model()
    inputs = _inputs(args, model, tool=True)
    inputs["old_per_token_logps"][0, 2:4] = -1000.0  # tool_mask is 0 at [0, 2:4]
    for fused in (False, True):
        _, _, s = _loss_and_grads(args, model, inputs, fused)
        metrics = s._metrics["train"]
        assert all(torch.isfinite(torch.tensor(v)).all() for v in metrics.values()), metrics
        torch.testing.assert_close(
            torch.tensor(metrics["kl"], dtype=DT), torch.tensor(metrics["rpg/kl/term"], dtype=DT), rtol=1e-12, atol=0
        )


def test_fused_head_runs_the_adaptive_entropy_controller_as_the_unfused_trainer():
    args = _config(
        loss_type="grpo",
        use_adaptive_entropy=True,
        entropy_coef=0.05,
        entropy_target=10.0,
        entropy_coef_delta=0.01,
        gradient_accumulation_steps=1,
    )
    gs, ws = _compare(args, bias=True)
    assert gs.entropy_coef == ws.entropy_coef != 0.05  # the controller moved the coefficient, the same way
    assert gs._last_world_entropy == pytest.approx(ws._last_world_entropy, rel=1e-12)
    assert "entropy_coef" in gs._metrics["train"]


def test_old_and_reference_log_probs_through_from_hidden_are_the_models():
    args = _config(temperature=0.7)
    for tied, bias in ((False, False), (True, True)):
        model = _model(tied, bias)
        s = _stub(args, model, True)
        ids = torch.randint(1, V, (B, P + T), generator=torch.Generator().manual_seed(1))
        am = torch.ones(B, P + T, dtype=torch.long)
        am[0, -2:] = 0  # right padding after EOS: log-prob 0, as TRL
        with torch.no_grad():
            got, ent, aux = s._get_per_token_logps_and_entropies(model, ids, am, T, batch_size=4, compute_entropy=True)
            want, want_ent, _ = _unfused_logps(model, 0.7)(model, ids, am, T, compute_entropy=True)
        assert aux is None
        torch.testing.assert_close(got, torch.where(am[:, -T:].bool(), want, 0), rtol=0, atol=1e-12)
        torch.testing.assert_close(ent, torch.where(am[:, -T:].bool(), want_ent, 0), rtol=0, atol=1e-12)


def _lora(model, **kw):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], **kw)
    return peft.get_peft_model(model, config)


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # q_proj has no bias; lm_head has one
def test_fused_head_with_lora_on_the_head_equals_the_unfused_path():
    model = _lora(_model(bias=True), lora_dropout=0.0, lora_bias=True)
    with torch.no_grad():  # LoRA's B starts at 0: move it so the adapter acts
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    args = _config(loss_type="grpo", beta=0.04, temperature=0.9)
    inputs = _inputs(args, model)
    want, want_g, ws = _loss_and_grads(args, model, inputs, False)
    got, got_g, gs = _loss_and_grads(args, model, inputs, True)
    assert any("lm_head.lora_A" in n for n in want_g) and set(got_g) == set(want_g)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-10, atol=1e-12, msg=name)
    _same_metrics(gs._metrics["train"], ws._metrics["train"])
    # With the adapter disabled (TRL's reference for a PEFT model) the head is the base layer's.
    head = model.get_base_model().lm_head
    with model.disable_adapter():
        w, b = _trl_fused.head_tensors(head)
        assert w is head.base_layer.weight and b is head.base_layer.bias


class _Scaled(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _with_head(head):
    model = _model()
    model.lm_head = head
    return model


def _with_config(**kw):
    model = _model()
    for name, value in kw.items():
        setattr(model.config, name, value)
    return model


REFUSED_MODELS = {
    "sequential-head": (
        lambda: _with_head(torch.nn.Sequential(torch.nn.Linear(H, V))),
        r"plain linear map.*Sequential",
    ),
    "subclass-head": (lambda: _with_head(_Scaled(H, V)), r"plain linear map.*_Scaled"),
    "softcapping": (lambda: _with_config(final_logit_softcapping=30.0), r"final_logit_softcapping=30\.0"),
    "logit-scale": (lambda: _with_config(logit_scale=0.5), r"logit_scale=0\.5"),
    "router-loss": (lambda: _with_config(output_router_logits=True), r"router load-balancing loss"),
    "lora-dropout": (lambda: _lora(_model(), lora_dropout=0.1), r"lora_dropout=0\.1"),
    "dora": (lambda: _lora(_model(), lora_dropout=0.0, use_dora=True), "variant"),
    "prompt-tuning": (lambda: _prompt_tuning(_model()), r"prompt learning"),
    "recurrent-gemma-soft-cap": (lambda: _recurrent_gemma(), r"logits_soft_cap=30\.0"),
}


def _recurrent_gemma():
    """A tiny RecurrentGemma: its forward soft-caps the logits, tanh(z / 30)·30, by ``logits_soft_cap`` (30 by
    default), a config name other than ``final_logit_softcapping``."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(0)
    config = RecurrentGemmaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        lru_width=H,
        attention_window_size=8,
        block_types=["recurrent", "attention"],
    )
    return RecurrentGemmaForCausalLM(config).to(DT)


def _prompt_tuning(model):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))


def test_a_prompt_learning_adapter_is_refused_where_the_backbone_alone_would_drop_it():
    """PEFT's prompt tuning prepends its virtual tokens in PeftModel's forward: the backbone alone gives the
    log-probs of the model without them (measured: they differ by more than 1e-3), so the old/reference
    log-probs and the loss refuse such a model at every call, not only at construction."""
    model = _prompt_tuning(_model())
    args = _config()
    ids = torch.randint(1, V, (B, P + T), generator=torch.Generator().manual_seed(1))
    am = torch.ones(B, P + T, dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits[:, -T - 1 : -1]
        with_prompt = torch.log_softmax(logits, -1).gather(-1, ids[:, -T:, None])[..., 0]
        without = _unfused_logps(model.get_base_model(), 1.0)(model.get_base_model(), ids, am, T)[0]
    assert (with_prompt - without).abs().max() > 1e-3  # the adapter changes the log-probs
    s = _stub(args, model, True)
    with pytest.raises(ValueError, match="prompt learning"):
        s._get_per_token_logps_and_entropies(model, ids, am, T)
    with pytest.raises(ValueError, match="prompt learning"):
        RPGGRPOTrainer._compute_loss(s, model, _inputs(args, model.get_base_model()))


@pytest.mark.parametrize("make,match", REFUSED_MODELS.values(), ids=REFUSED_MODELS.keys())
def test_models_the_fused_path_cannot_reproduce_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        _trl_fused.check_model(make())


def test_multimodal_inputs_several_processes_and_router_losses_are_refused():
    args = _config()
    model = _model()
    inputs = _inputs(args, model)
    s = _stub(args, model, True)
    with pytest.raises(ValueError, match=r"text-only.*pixel_values"):
        RPGGRPOTrainer._compute_loss(s, model, {**inputs, "pixel_values": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"text-only.*image_grid_thw"):
        s._get_per_token_logps_and_entropies(
            model, inputs["completion_ids"], inputs["completion_mask"], 2, image_grid_thw=torch.ones(1)
        )
    s.aux_loss_enabled = True
    with pytest.raises(ValueError, match="router load-balancing loss"):
        RPGGRPOTrainer._compute_loss(s, model, dict(inputs))
    s.accelerator.num_processes = 2
    with pytest.raises(ValueError, match="one process; this run has 2"):
        _trl_fused.check_trainer(s)
    with pytest.raises(TypeError, match="fused_head must be a bool"):
        RPGGRPOTrainer(model=None, fused_head="yes")


def _train(tmp_path, fused, peft_config=None, beta=0.0):
    from tests.integrations.test_trl import PROMPTS, tiny_config, tiny_trainer

    args = tiny_config(tmp_path, max_steps=2, num_iterations=2, learning_rate=1e-2, beta=beta, entropy_coef=0.01)
    trainer = tiny_trainer(args, prompts=PROMPTS * 4, fused_head=fused, peft_config=peft_config)
    return trainer, trainer.model


@contextlib.contextmanager
def _spy_on_from_hidden_scoring(record):
    """Calls ``record(args)`` on each call of the fused path's no-grad scoring (old and reference log-probs)."""
    real = _trl_fused.per_token_logps_and_entropies

    def spy(*a, **kw):
        record(a)
        return real(*a, **kw)

    _trl_fused.per_token_logps_and_entropies = spy
    try:
        yield
    finally:
        _trl_fused.per_token_logps_and_entropies = real


def test_a_training_run_with_the_fused_head_learns(tmp_path):
    trainer, model = _train(tmp_path, True)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    with _spy_on_from_hidden_scoring(lambda a: calls.append(torch.is_grad_enabled())):
        trainer.train()
    assert calls and not any(calls), "old log-probs (num_iterations=2) go through from_hidden under no_grad"
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=False))
    assert changed, "the optimizer steps did not change the parameters"
    logged = [h for h in trainer.state.log_history if "rpg/ratio/mean" in h]
    assert logged and all(torch.isfinite(torch.tensor(h["rpg/ratio/mean"])) for h in logged)
    # The same run unfused (same seed, same completions) ends at the same parameters (float32 round-off).
    unfused, reference = _train(tmp_path, False)
    unfused.train()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_a_lora_training_run_with_the_fused_head_equals_the_unfused_one(tmp_path):
    """LoRA in the backbone and a trained copy of the head (PEFT's modules_to_save; TRL itself refuses LoRA on
    lm_head), β > 0: TRL's reference is the model with its adapters disabled, scored here through from_hidden
    with the original head."""
    peft = pytest.importorskip("peft")
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    trainer, model = _train(tmp_path, True, peft.LoraConfig(**config), beta=0.04)
    calls = []
    with _spy_on_from_hidden_scoring(lambda a: calls.append(bool(a[1].get_base_model().lm_head.disable_adapters))):
        trainer.train()
    assert True in calls and False in calls  # reference (adapters off) and old log-probs (on)
    unfused, reference = _train(tmp_path, False, peft.LoraConfig(**config), beta=0.04)
    unfused.train()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in n for n, _ in trained) and any("lora_B" in n for n, _ in trained)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_trl_clip_names_count_what_the_losss_clip_frac_counts():
    """TOPR with a KL term: TRL's clip_ratio/* read the loss's own codes, which for SignedTruncate follow the
    sign of A (not of the REINFORCE weight, which a large β·KL flips): region_mean equals rpg/clip_frac."""
    loss = rpg.TOPRLoss().replace(beta=3.0, kl="rkl")
    args = _config(beta=3.0)
    model = _model()
    _, _, s = _loss_and_grads(args, model, _inputs(args, model), False, loss=loss)
    m = s._metrics["train"]
    assert m["rpg/clip_frac"][0] > 0
    assert m["clip_ratio/region_mean"][0] == pytest.approx(m["rpg/clip_frac"][0], rel=1e-6)
