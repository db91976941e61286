"""RPGGRPOTrainer against TRL's own GRPOTrainer._compute_loss: same loss and gradient on identical inputs.

Both trainers' real ``_compute_loss`` run on a stub ``self`` whose log-probs and entropies come from fixed
float64 logits (no model, one process), configured from one real ``GRPOConfig``. For every GRPOConfig
setting the adapter maps — loss types, clip bounds, delta, the KL with and without the bias correction,
sequence-level ratios, the vLLM importance-sampling correction in all four modes, the high-entropy token
mask, the off-policy sequence mask, the static and adaptive entropy bonus, eval mode, tool masks — the loss
and d loss / d logits agree to 1e-12. Settings rpg cannot express exactly are refused with the reason.
"""

import math
import types
from collections import defaultdict

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from trl import GRPOConfig, GRPOTrainer

import rpg
from rpg.integrations.trl import RPGGRPOTrainer, _plan, loss_from_grpo_config

DT = torch.float64
B, T, V = 6, 7, 5
LENGTHS = [7, 5, 3, 1, 0, 6]  # ragged, with an empty row


class _Accelerator:
    """One process: gather/reduce are identities."""

    num_processes = 1

    def __init__(self):
        self.sync_gradients = True

    def gather(self, x):
        return x.reshape(-1) if x.dim() == 0 else x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def _config(**kw):
    kw = {
        "output_dir": "unused",
        "report_to": "none",
        "use_cpu": True,
        "gradient_accumulation_steps": 2,
        "max_completion_length": T,
        **kw,
    }
    return GRPOConfig(**kw)


def _stub(args, logits, ids, training=True):
    """A ``self`` with the attributes GRPOTrainer.__init__ derives from ``args`` (the ones _compute_loss reads)."""
    s = types.SimpleNamespace(args=args)
    s.loss_type, s.beta = args.loss_type, args.beta
    s.epsilon_low = args.epsilon
    s.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    s.importance_sampling_level = args.importance_sampling_level
    s.top_entropy_quantile, s.off_policy_mask_threshold = args.top_entropy_quantile, args.off_policy_mask_threshold
    s.use_vllm, s.vllm_importance_sampling_correction = args.use_vllm, args.vllm_importance_sampling_correction
    s.max_completion_length = args.max_completion_length
    s.entropy_coef, s.use_adaptive_entropy = args.entropy_coef, args.use_adaptive_entropy
    s._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    s._last_world_entropy, s._entropy_window_stats = float("inf"), None
    s.aux_loss_enabled, s.router_aux_loss_coef = False, 0.0
    s.model = types.SimpleNamespace(training=training)
    s.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    s.accelerator = _Accelerator()
    s._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    s.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, s)
    s.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    s.get_gamma_weights = GRPOTrainer.get_gamma_weights

    def logps_and_entropies(
        model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, compute_aux_loss=False, **kw
    ):
        lsm = torch.log_softmax(logits, -1)
        entropy = -(lsm.exp() * lsm).sum(-1) if compute_entropy else None
        return lsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1), entropy, None

    s._get_per_token_logps_and_entropies = logps_and_entropies
    return s


def _ours(args, logits, ids, loss=None, training=True):
    return _as_rpg_trainer(_stub(args, logits, ids, training), args, loss)


def _as_rpg_trainer(s, args, loss=None, has_rollout_logprobs=False):
    """``s`` with RPGGRPOTrainer's plan, loss and every ``_rpg_*`` method bound."""
    s._rpg_plan = _plan(args, loss, has_rollout_logprobs=has_rollout_logprobs)
    s.rpg_loss = s._rpg_plan.loss
    for name in vars(RPGGRPOTrainer):
        if name.startswith("_rpg_") and callable(getattr(RPGGRPOTrainer, name)):
            setattr(s, name, types.MethodType(getattr(RPGGRPOTrainer, name), s))
    return s


def _is_ratio(args, old, mu, mask):
    """TRL's vLLM importance-sampling ratio, as _generate_and_score_completions computes it."""
    diff = torch.nan_to_num((old - mu) * mask, nan=0.0)
    mode = args.vllm_importance_sampling_mode
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    rho = torch.exp(diff)
    lo, hi = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    if mode.endswith("truncate"):
        return torch.clamp(rho, min=lo, max=hi)
    return rho.masked_fill((rho < (-math.inf if lo is None else lo)) | (rho > (math.inf if hi is None else hi)), 0.0)


def _inputs(args, seed=0, old=True, tool=False, nan_token=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, dtype=DT, generator=g).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    cm = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).long()
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": cm,
        "advantages": torch.tensor([1.0, -0.5, 0.3, -1.2, 0.7, -0.1], dtype=DT),
        "num_items_in_batch": (cm.sum() + 9).to(DT),  # the generation batch had 9 more tokens elsewhere
    }
    with torch.no_grad():
        logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    mask = cm
    if tool:
        inputs["tool_mask"] = torch.ones(B, T, dtype=torch.long)
        inputs["tool_mask"][0, 2:4] = 0
        mask = cm * inputs["tool_mask"]
    if old:  # off-policy: clips and masks bind
        inputs["old_per_token_logps"] = (logp + 0.3 * torch.randn(B, T, dtype=DT, generator=g)).clamp(max=0)
    if args.beta != 0:
        inputs["ref_per_token_logps"] = (logp + 0.5 * torch.randn(B, T, dtype=DT, generator=g)).clamp(max=0)
    if args.use_vllm:
        ref = inputs.get("old_per_token_logps", logp)
        mu = (ref + 0.4 * torch.randn(B, T, dtype=DT, generator=g)).clamp(max=0) * cm  # right-padded with 0.0, as TRL
        if nan_token:
            mu[1, 1] = float("nan")  # a token vLLM could not score
        inputs["sampling_per_token_logps"] = mu
        if args.vllm_importance_sampling_correction:
            inputs["importance_sampling_ratio"] = _is_ratio(args, ref, mu, mask)
    return logits, ids, inputs


def _compare(args, loss=None, training=True, seed=0, **mk):
    logits, ids, inputs = _inputs(args, seed=seed, **mk)
    want = GRPOTrainer._compute_loss(_stub(args, logits, ids, training), None, dict(inputs))
    (want_grad,) = torch.autograd.grad(want, logits)
    got = RPGGRPOTrainer._compute_loss(_ours(args, logits, ids, loss, training), None, dict(inputs))
    (got_grad,) = torch.autograd.grad(got, logits)
    assert want_grad.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)


EPS = {"epsilon_high": 0.28}
MAPPED = {
    "dapo": {**EPS},
    "dapo-default-eps": {},
    "grpo": {"loss_type": "grpo", **EPS},
    "grpo-kl-bias-corrected": {"loss_type": "grpo", "beta": 0.04, **EPS},
    "grpo-kl-k3": {"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False},
    "bnpo": {"loss_type": "bnpo", **EPS},
    "bnpo-kl": {"loss_type": "bnpo", "beta": 0.04},
    "dr_grpo": {"loss_type": "dr_grpo", "max_completion_length": 9, **EPS},
    "luspo": {"loss_type": "luspo", **EPS},
    "luspo-sequence": {"loss_type": "luspo", "importance_sampling_level": "sequence", **EPS},
    "cispo": {"loss_type": "cispo", "epsilon_high": 5.0},
    "cispo-cap-below-1": {"loss_type": "cispo", "epsilon_high": 0.9},
    "cispo-default-cap": {"loss_type": "cispo"},
    "epsilon-above-1": {"epsilon": 1.5, **EPS},
    "delta-dual": {"delta": 1.5, **EPS},
    "delta-dual-grpo-kl": {"loss_type": "grpo", "delta": 1.3, "beta": 0.04, **EPS},
    "delta-below-1+eps_high": {"delta": 1.1, **EPS},
    "delta-below-1+eps_high-grpo": {"loss_type": "grpo", "delta": 1.05, "epsilon_high": 0.5},
    "sequence-grpo": {"loss_type": "grpo", "importance_sampling_level": "sequence", **EPS},
    "sequence-dapo": {"importance_sampling_level": "sequence", **EPS},
    "sequence-kl-k3": {
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "beta": 0.04,
        "use_bias_correction_kl": False,
    },
    "sequence-delta-opsm": {
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "delta": 1.4,
        "off_policy_mask_threshold": 0.05,
    },
    "entropy-quantile": {"top_entropy_quantile": 0.3, **EPS},
    "entropy-quantile-grpo-kl": {"loss_type": "grpo", "top_entropy_quantile": 0.5, "beta": 0.04},
    "opsm": {"off_policy_mask_threshold": 0.05, **EPS},
    "opsm-grpo-kl": {"loss_type": "grpo", "off_policy_mask_threshold": 0.0, "beta": 0.04},
    "entropy-bonus-dapo": {"entropy_coef": 0.01, **EPS},
    "entropy-bonus-grpo": {"loss_type": "grpo", "entropy_coef": 0.01},
    "entropy-bonus-quantile": {"loss_type": "bnpo", "entropy_coef": 0.01, "top_entropy_quantile": 0.4},
    "entropy-bonus-dr_grpo-sequence-k3": {
        "loss_type": "dr_grpo",
        "entropy_coef": 0.02,
        "beta": 0.1,
        "importance_sampling_level": "sequence",
        "use_bias_correction_kl": False,
    },
    "steps_per_generation": {"steps_per_generation": 4, **EPS},
    # δ < 1: the cap for A > 0 lies below 1 (DeltaClip); below and above the lower bound 1 − ε
    "delta-below-1": {"delta": 0.9, **EPS},
    "delta-below-1-epsilon": {"loss_type": "grpo", "delta": 0.7, "epsilon": 0.5, "beta": 0.04},
    "delta-below-1-sequence": {"loss_type": "luspo", "delta": 0.95, "importance_sampling_level": "sequence"},
    # CISPO with a KL term: REINFORCE policy term, differentiable KL beside it (weight_kl=False)
    "cispo-kl-bias-corrected": {"loss_type": "cispo", "beta": 0.04, "epsilon_high": 1.1},
    "cispo-kl-k3": {"loss_type": "cispo", "beta": 0.1, "epsilon_high": 1.1, "use_bias_correction_kl": False},
    # CISPO on the sequence ratio: −sg(min(s, cap))·A·logp
    "cispo-sequence": {"loss_type": "cispo", "importance_sampling_level": "sequence", "epsilon_high": 1.05},
    "cispo-sequence-kl-k3": {
        "loss_type": "cispo",
        "importance_sampling_level": "sequence",
        "epsilon_high": 1.05,
        "beta": 0.04,
        "use_bias_correction_kl": False,
        "top_entropy_quantile": 0.5,
    },
    # epsilon and delta are unused by TRL's cispo: accepted (and logged)
    "cispo-epsilon-delta": {"loss_type": "cispo", "epsilon": 0.3, "delta": 2.0, "epsilon_high": 1.1},
    # SAPO: rpg.SAPOLoss (the soft gate), with TRL's temperatures, KL terms and sequence ratio
    "sapo": {"loss_type": "sapo"},
    "sapo-temperatures-kl": {
        "loss_type": "sapo",
        "sapo_temperature_pos": 2.0,
        "sapo_temperature_neg": 0.5,
        "beta": 0.04,
    },
    "sapo-sequence-k3-quantile": {
        "loss_type": "sapo",
        "importance_sampling_level": "sequence",
        "beta": 0.04,
        "use_bias_correction_kl": False,
        "top_entropy_quantile": 0.5,
        "entropy_coef": 0.01,
    },
    "sapo-epsilon-delta-unused": {"loss_type": "sapo", "epsilon": 0.3, "epsilon_high": 0.4, "delta": 0.9},
    # VESPO: rpg.VESPOLoss (W = Π_t r_t, the Gamma kernel), with TRL's parameters and a KL term beside it
    "vespo": {"loss_type": "vespo"},
    "vespo-params-kl": {
        "loss_type": "vespo",
        "vespo_k_pos": 1.5,
        "vespo_lambda_pos": 2.0,
        "vespo_k_neg": 2.5,
        "vespo_lambda_neg": 1.0,
        "beta": 0.04,
    },
    "vespo-sequence-k3-quantile-opsm": {
        "loss_type": "vespo",
        "importance_sampling_level": "sequence",
        "beta": 0.04,
        "use_bias_correction_kl": False,
        "top_entropy_quantile": 0.5,
        "off_policy_mask_threshold": 0.05,
        "entropy_coef": 0.01,
    },
    "vespo-epsilon-unused": {"loss_type": "vespo", "epsilon": 0.3, "delta": 2.0},
    # a token-varying weight on a sequence-level term: the weight's mean over the response
    "sequence-entropy-quantile": {"importance_sampling_level": "sequence", "top_entropy_quantile": 0.5, **EPS},
    "sequence-entropy-quantile-grpo-k3": {
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "top_entropy_quantile": 0.3,
        "beta": 0.04,
        "use_bias_correction_kl": False,
        "off_policy_mask_threshold": 0.05,
        "entropy_coef": 0.01,
    },
}


@pytest.mark.parametrize("kw", MAPPED.values(), ids=MAPPED.keys())
def test_loss_built_from_grpo_config_is_trls(kw):
    _compare(_config(**kw))


@pytest.mark.parametrize(
    "kw",
    [MAPPED["grpo-kl-bias-corrected"], MAPPED["dapo"], MAPPED["entropy-bonus-quantile"], MAPPED["luspo-sequence"]],
    ids=["grpo-kl", "dapo", "entropy", "luspo-sequence"],
)
def test_eval_mode_is_trls(kw):
    _compare(_config(**kw), training=False)


@pytest.mark.parametrize("kw", [{"loss_type": "grpo", "beta": 0.04}, {"loss_type": "dapo"}], ids=["grpo-kl", "dapo"])
def test_tool_mask_and_on_policy_inputs_are_trls(kw):
    args = _config(**kw)
    _compare(args, tool=True)
    _compare(args, old=False)


VLLM_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize("mode", VLLM_MODES)
@pytest.mark.parametrize(
    "kw",
    [
        {"loss_type": "dapo", **EPS},
        {"loss_type": "grpo", "beta": 0.04},
        {"loss_type": "cispo", "epsilon_high": 5.0},
        {"loss_type": "bnpo", "off_policy_mask_threshold": 0.02, "entropy_coef": 0.01},
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "top_entropy_quantile": 0.5},
        {"loss_type": "dr_grpo", "importance_sampling_level": "sequence", "delta": 0.9, **EPS},
        {
            "loss_type": "cispo",
            "importance_sampling_level": "sequence",
            "beta": 0.04,
            "use_bias_correction_kl": False,
            "epsilon_high": 1.05,
        },
        {"loss_type": "cispo", "beta": 0.04, "epsilon_high": 1.1},
        {"loss_type": "sapo", "beta": 0.04, "off_policy_mask_threshold": 0.05},
        {"loss_type": "sapo", "importance_sampling_level": "sequence"},
        {"loss_type": "vespo"},
        {"loss_type": "vespo", "beta": 0.04, "entropy_coef": 0.01},
    ],
    ids=[
        "dapo",
        "grpo-kl",
        "cispo",
        "bnpo-opsm-entropy",
        "sequence-quantile",
        "sequence-delta<1",
        "cispo-seq-k3",
        "cispo-kl",
        "sapo-kl-opsm",
        "sapo-sequence",
        "vespo",
        "vespo-kl-entropy",
    ],
)
def test_vllm_importance_sampling_correction_is_trls(mode, kw):
    # clip_max 1.5: truncation and rejection both happen on these inputs; clip_min in half the cases
    lower = 0.6 if mode.startswith("token") else None
    args = _config(
        use_vllm=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=1.5,
        vllm_importance_sampling_clip_min=lower,
        **kw,
    )
    _compare(args, nan_token=True)
    if not kw.get("off_policy_mask_threshold"):
        _compare(args, seed=1)


def test_vllm_sequence_level_with_sequence_ratio_is_trls():
    args = _config(
        use_vllm=True,
        vllm_importance_sampling_mode="sequence_truncate",
        loss_type="grpo",
        importance_sampling_level="sequence",
        vllm_importance_sampling_clip_max=2.0,
    )
    _compare(args)


def test_vllm_correction_inputs_bind():
    """The correction cases above are not vacuous: the weights truncate, reject and leave some tokens alone."""
    for mode in VLLM_MODES:
        args = _config(use_vllm=True, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=1.5)
        w = _inputs(args)[2]["importance_sampling_ratio"]
        assert ((w == 0) | (w == 1.5)).any() and ((w > 0) & (w < 1.5) & (w != 1)).any(), mode


def test_given_loss_with_trls_convention_is_trls():
    """A user's preset, made to follow TRL's multiplier convention, with TRL's correction filled in."""
    kw = dict(
        loss_type="grpo",
        beta=0.04,
        epsilon_high=0.28,
        use_vllm=True,
        vllm_importance_sampling_mode="token_mask",
        top_entropy_quantile=0.5,
        off_policy_mask_threshold=0.05,
    )
    loss = rpg.GRPOLoss(beta=0.04, clip=rpg.Clip(0.2, 0.28, dual=None), importance_weighted_kl=True)
    _compare(_config(**kw), loss=loss.replace(weight_kl=False))
    _compare(
        _config(loss_type="dapo", use_vllm=True, vllm_importance_sampling_mode="sequence_truncate"),
        loss=rpg.DAPOLoss(clip=rpg.Clip(0.2, 0.2, dual=None)),
    )


def test_given_loss_weighting_the_kl_term_differs_from_trls_only_there():
    """With weight_kl=True (rpg's default) the vLLM weight multiplies the KL term too; the policy term is TRL's."""
    args = _config(loss_type="grpo", beta=0.04, use_vllm=True, vllm_importance_sampling_mode="token_truncate")
    logits, ids, inputs = _inputs(args)
    loss = rpg.GRPOLoss(beta=0.04, clip=rpg.Clip(0.2, 0.2, dual=None), importance_weighted_kl=True)
    ours = _ours(args, logits, ids, loss)
    assert ours.rpg_loss.weight_kl and ours.rpg_loss.correction == rpg.RolloutCorrection(upper=3.0)
    got = RPGGRPOTrainer._compute_loss(ours, None, dict(inputs))
    want = GRPOTrainer._compute_loss(_stub(args, logits, ids), None, dict(inputs))
    assert abs(got.item() - want.item()) > 1e-6


def test_adaptive_entropy_controller_is_trls():
    """Two optimizer steps of two micro-batches: the gate (closed in the first window), the coefficient update
    at each step and the loss of every micro-batch equal TRL's."""
    args = _config(
        use_adaptive_entropy=True,
        entropy_coef=0.02,
        entropy_target=5.0,
        entropy_coef_delta=0.01,
        top_entropy_quantile=0.5,
        **EPS,
    )
    logits, ids, _ = _inputs(args)
    theirs, ours = _stub(args, logits, ids), _ours(args, logits, ids)
    coefs = []
    for step in range(4):
        _, _, inputs = _inputs(args, seed=step)
        for s in (theirs, ours):
            s.accelerator.sync_gradients = step % 2 == 1
        want = GRPOTrainer._compute_loss(theirs, None, dict(inputs))
        got = RPGGRPOTrainer._compute_loss(ours, None, dict(inputs))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(
            torch.autograd.grad(got, logits)[0], torch.autograd.grad(want, logits)[0], rtol=0, atol=1e-12
        )
        assert ours.entropy_coef == theirs.entropy_coef and ours._last_world_entropy == theirs._last_world_entropy
        coefs.append(ours.entropy_coef)
    assert coefs == pytest.approx([0.02, 0.03, 0.03, 0.04])
    assert ours._metrics["train"]["entropy_coef"] == theirs._metrics["train"]["entropy_coef"]


REFUSED = {
    "sequence-bias-corrected-kl": ({"importance_sampling_level": "sequence", "beta": 0.04}, "use_bias_correction_kl"),
    "cispo-sequence-bias-corrected-kl": (
        {"loss_type": "cispo", "importance_sampling_level": "sequence", "beta": 0.04},
        "every token of its response",
    ),
}


@pytest.mark.parametrize("kw,match", REFUSED.values(), ids=REFUSED.keys())
def test_settings_rpg_cannot_express_exactly_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        loss_from_grpo_config(_config(**kw))


def test_built_losses_are_the_documented_configurations():
    assert loss_from_grpo_config(_config(loss_type="cispo", epsilon_high=5.0)).clip == rpg.Truncate.at(None, 5.0)
    assert loss_from_grpo_config(_config(delta=1.5, **EPS)).clip == rpg.Clip(0.2, 0.28, dual=1.5)
    grpo = loss_from_grpo_config(_config(loss_type="grpo", beta=0.04, use_vllm=True))
    assert (grpo.kl, grpo.beta, grpo.agg, grpo.weight_kl) == ("urkl", 0.04, "seq-mean-token-mean", False)
    assert grpo.correction == rpg.RolloutCorrection("sequence", "mask", None, 3.0, count_rejected=True)
    assert loss_from_grpo_config(_config(use_vllm=True, vllm_importance_sampling_correction=False)).correction is None


CONFLICTS = {
    "epsilon_high": ({"epsilon_high": 0.28}, rpg.DAPOLoss(clip=rpg.Clip(0.2, 0.2, dual=None)), "epsilon_high=0.28"),
    "loss_type": ({"loss_type": "grpo"}, rpg.DAPOLoss(), "loss_type='grpo'"),
    "sapo": ({"loss_type": "sapo"}, rpg.DAPOLoss(), "SoftGate"),
    "sapo-temperature": ({"sapo_temperature_pos": 2.0, "loss_type": "sapo"}, rpg.SAPOLoss(), "tau_pos=2.0"),
    "vespo": ({"loss_type": "vespo"}, rpg.DAPOLoss(), "kernel"),
    "vespo-params": ({"loss_type": "vespo", "vespo_k_pos": 1.0}, rpg.VESPOLoss(), "k_pos=1.0"),
    "delta": ({"delta": 2.0}, rpg.DAPOLoss(), "delta=2.0"),
    "beta": ({"beta": 0.04}, rpg.RPGLoss("urkl", beta=1e-3), "beta=0.04"),
    "k3": (
        {"beta": 0.04, "use_bias_correction_kl": False},
        rpg.GRPOLoss(beta=0.04, importance_weighted_kl=True),
        "use_bias_correction_kl",
    ),
    "level": ({"importance_sampling_level": "sequence"}, rpg.DAPOLoss(), "importance_sampling_level"),
    "dr_grpo": ({"loss_type": "dr_grpo"}, rpg.DrGRPOLoss(6), "max_completion_length"),
    "correction": ({"use_vllm": True}, rpg.DAPOLoss(correction=rpg.RolloutCorrection()), "disagrees"),
    "correction-off": (
        {"use_vllm": True, "vllm_importance_sampling_correction": False},
        rpg.DAPOLoss(correction=rpg.RolloutCorrection()),
        "vllm_importance_sampling_correction=False",
    ),
    "two-bonuses": ({"entropy_coef": 0.01}, rpg.DAPOLoss(entropy_coef=0.01), "entropy bonus"),
}


@pytest.mark.parametrize("kw,loss,match", CONFLICTS.values(), ids=CONFLICTS.keys())
def test_grpo_config_settings_a_given_loss_does_not_reproduce_are_refused(kw, loss, match):
    with pytest.raises(ValueError, match=match):
        _plan(_config(**kw), loss)


def test_grpo_config_settings_a_given_loss_reproduces_are_accepted():
    plan = _plan(
        _config(loss_type="grpo", beta=0.04, epsilon_high=0.28, delta=3.0),
        rpg.GRPOLoss(beta=0.04, clip=rpg.Clip(0.2, 0.28, dual=3.0), importance_weighted_kl=True),
    )
    assert plan.loss.kl == "urkl"
    plan = _plan(_config(loss_type="cispo", epsilon_high=5.0), rpg.CISPOLoss(clip=rpg.Truncate.at(None, 5.0)))
    assert plan.loss.style == "reinforce"
    # defaults do not constrain the loss: RPG's own clip, KL and aggregation
    assert _plan(_config(), rpg.RPGLoss("fkl", style="reinforce")).loss == rpg.RPGLoss("fkl", style="reinforce")


def test_a_given_correction_needs_behaviour_log_probs_and_trls_counts():
    mis = rpg.DAPOLoss(correction=rpg.RolloutCorrection(mode="mask", count_rejected=False))
    with pytest.raises(ValueError, match="count_rejected=False"):
        _plan(_config(), mis, has_rollout_logprobs=True)
    with pytest.raises(ValueError, match="rollout engine's log-probs"):
        _plan(_config(), rpg.DAPOLoss(correction=rpg.RolloutCorrection()))
    assert _plan(_config(), rpg.DAPOLoss(correction=rpg.RolloutCorrection()), has_rollout_logprobs=True).behavior


METRIC_SETTINGS = {
    name: MAPPED[name]
    for name in (
        "dapo",
        "grpo-kl-bias-corrected",
        "bnpo-kl",
        "dr_grpo",
        "luspo-sequence",
        "cispo-cap-below-1",
        "cispo-kl-bias-corrected",
        "delta-dual-grpo-kl",
        "delta-below-1+eps_high",
        "delta-below-1-epsilon",
        "sequence-kl-k3",
        "entropy-bonus-quantile",
        "sequence-entropy-quantile-grpo-k3",
        "sapo-temperatures-kl",
        "sapo-sequence-k3-quantile",
        "vespo-params-kl",
        "vespo-sequence-k3-quantile-opsm",
    )
}
METRIC_SETTINGS["cispo-sequence-cap-below-1"] = {
    "loss_type": "cispo",
    "importance_sampling_level": "sequence",
    "epsilon_high": 0.95,
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kw", METRIC_SETTINGS.values(), ids=METRIC_SETTINGS.keys())
def test_trls_metric_names_are_logged_with_trls_values(kw, training):
    """Every metric TRL's _compute_loss logs is logged by the trainer under the same name, with the same value
    (same reductions) on the same inputs; rpg's own come as rpg/... ."""
    args = _config(**kw)
    logits, ids, inputs = _inputs(args)
    theirs, ours = _stub(args, logits, ids, training), _ours(args, logits, ids, training=training)
    GRPOTrainer._compute_loss(theirs, None, dict(inputs))
    RPGGRPOTrainer._compute_loss(ours, None, dict(inputs))
    mode = "train" if training else "eval"
    want, got = theirs._metrics[mode], ours._metrics[mode]
    assert set(want) <= set(got), set(want) - set(got)
    assert any(k.startswith("rpg/") for k in got)
    for key, values in want.items():
        assert got[key] == pytest.approx(values, rel=0, abs=1e-12, nan_ok=True), key
    # the clip ratios are not vacuous on these inputs
    clipped = [want[k][0] for k in want if k.startswith("clip_ratio/") or k == "cispo_clip_ratio"]
    assert args.loss_type in ("sapo", "vespo") or (clipped and max(clipped) > 0)  # they clip nothing


def test_policy_loss_is_logged_without_an_entropy_bonus_too():
    args = _config(loss_type="grpo", beta=0.04)
    logits, ids, inputs = _inputs(args)
    ours = _ours(args, logits, ids)
    loss = RPGGRPOTrainer._compute_loss(ours, None, dict(inputs))
    # TRL's policy_loss is the micro-batch loss before the accumulation scale
    assert ours._metrics["train"]["policy_loss"] == pytest.approx([loss.item() * args.gradient_accumulation_steps])


def test_rollout_correction_metrics_are_logged_under_rollout_corr():
    for mode in ("token_truncate", "sequence_mask"):
        for level in ("token", "sequence"):
            args = _config(use_vllm=True, vllm_importance_sampling_mode=mode, importance_sampling_level=level)
            logits, ids, inputs = _inputs(args)
            ours = _ours(args, logits, ids)
            RPGGRPOTrainer._compute_loss(ours, None, dict(inputs))
            keys = set(ours._metrics["train"])
            assert {"rollout_corr/kl", "rollout_corr/rollout_is_mean"} <= keys, (mode, level, keys)
            assert not any(k.startswith("rpg/rollout_corr/") for k in keys)


@pytest.mark.parametrize(
    "kw,unused",
    [
        ({"loss_type": "cispo", "epsilon": 0.3, "delta": 2.0}, "epsilon=0.3, delta=2.0"),
        ({"loss_type": "sapo", "epsilon_high": 0.4}, "epsilon_high=0.4"),
        ({"loss_type": "vespo", "delta": 1.5}, "delta=1.5"),
    ],
    ids=["cispo", "sapo", "vespo"],
)
def test_clip_fields_a_loss_type_does_not_read_are_accepted_with_a_log_line(kw, unused, caplog):
    with caplog.at_level("WARNING", logger="rpg.integrations.trl"):
        _plan(_config(**kw))
    (record,) = caplog.records
    assert unused in record.getMessage() and "ignored" in record.getMessage()
    with caplog.at_level("WARNING", logger="rpg.integrations.trl"):
        caplog.clear()
        _plan(_config(loss_type=kw["loss_type"]))
    assert not caplog.records  # nothing set: nothing logged


def test_a_cap_given_as_truncate_offsets_agrees_with_trls_epsilon_high():
    """CISPOLoss(clip=Truncate(None, 4.0)) caps w at 5, as GRPOConfig(loss_type='cispo', epsilon_high=5.0):
    the agreement check compares what the rules do, not their fields."""
    args = _config(loss_type="cispo", epsilon_high=5.0)
    assert _plan(args, rpg.CISPOLoss(clip=rpg.Truncate(None, 4.0))).loss.clip == rpg.Truncate(None, 4.0)
    with pytest.raises(ValueError, match=r"epsilon_high=5\.0"):
        _plan(args, rpg.CISPOLoss(clip=rpg.Truncate(None, 3.0)))
    # PPO-style rules likewise: Clip(0.2, δ − 1, dual=1 + ε_high) is what delta in [1, 1 + ε_high) builds
    _plan(_config(delta=1.1, epsilon_high=0.28), rpg.DAPOLoss(clip=rpg.Clip(0.2, 0.1, dual=1.28)))
