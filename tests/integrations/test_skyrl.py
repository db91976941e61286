"""rpg.integrations.skyrl against the installed SkyRL (Python >= 3.12; `.ci/skyrl` builds its environment).

Every loss is called the way SkyRL's policy worker calls it: ``PolicyLossRegistry.get(policy_loss_type)(
log_probs, old_log_probs, advantages, config=AlgorithmConfig, loss_mask=..., rollout_logprobs=...)`` on
advantages already scaled by ``apply_loss_reduction_to_advantages_minibatch``. The main suite (Python 3.11,
no SkyRL) skips this module."""

import dataclasses

import pytest
import torch

pytest.importorskip(
    "skyrl.backends.skyrl_train.utils.ppo_utils", reason="SkyRL (Python >= 3.12) is not installed: run .ci/skyrl"
)

from skyrl.backends.skyrl_train.utils import off_policy_correction_utils as opc_utils
from skyrl.backends.skyrl_train.utils import ppo_utils, torch_utils
from skyrl.train.config.config import AlgorithmConfig, CISPOConfig, DPPOConfig, OffPolicyCorrectionConfig

import rpg
from rpg.integrations import skyrl as rpg_skyrl

from ..conftest import make_batch

Registry = ppo_utils.PolicyLossRegistry
scale_advantages = ppo_utils.apply_loss_reduction_to_advantages_minibatch
TOL = dict(rtol=1e-10, atol=1e-12)
LOW, HIGH, DUAL = 0.2, 0.28, 3.0


@pytest.fixture(autouse=True)
def exact_exp(monkeypatch):
    """SkyRL exponentiates log-ratios in float32 (``safe_exp_delta`` casts to float32, then back); the
    comparisons at 1e-10 use the same clamp and exp in the input's dtype. ``test_float32_exp_difference``
    measures what SkyRL's own float32 exp changes."""

    def exp_in_dtype(delta, clip=20.0, out_dtype=None):
        return torch.clamp(delta, -clip, clip).exp().to(out_dtype or delta.dtype)

    monkeypatch.setattr(ppo_utils, "safe_exp_delta", exp_in_dtype)
    monkeypatch.setattr(opc_utils, "safe_exp_delta", exp_in_dtype)


def _config(**kw):
    base = dict(eps_clip_low=LOW, eps_clip_high=HIGH, clip_ratio_c=DUAL, use_kl_loss=False, kl_loss_coef=0.0)
    base.update(kw)
    return AlgorithmConfig(**base)


def _batch(b=6, t=7, seed=3, spread=0.4):
    logp, old, adv, mask, ref = make_batch(b, t, seed=seed, spread=spread, adv_shape="tok")
    g = torch.Generator().manual_seed(seed + 100)
    rollout = (old + 0.3 * torch.randn(old.shape, generator=g, dtype=old.dtype)).clamp(max=-1e-3)
    logp = logp.detach().clamp(max=-1e-3)  # probabilities <= 1 (DPPO's binary KL reads 1 - p)
    return logp, old, adv, mask.to(old.dtype), ref, rollout


def _call(name, logp, old, adv, mask, config, rollout=None):
    x = logp.detach().clone().requires_grad_(True)
    loss, metrics = Registry.get(name)(x, old, adv, config=config, loss_mask=mask, rollout_logprobs=rollout)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, metrics


def _register(name, loss, **kw):
    return rpg_skyrl.register(name, loss, replace=True, **kw)


def _close(a, b):
    torch.testing.assert_close(a, b, **TOL)


# --- registration ---------------------------------------------------------------------------


def test_import_registers_every_rpg_loss():
    available = set(Registry.list_available())
    expected = {f"rpg_{d}" for d in rpg.DIVERGENCES} | {f"rpg_rf_{d}" for d in rpg.DIVERGENCES} | {"rpg_distill"}
    assert expected <= available
    assert {"regular", "dual_clip", "gspo", "cispo", "dppo"} <= available  # SkyRL's own are untouched


def test_named_loss_reads_the_algorithm_config():
    cfg = _config(kl_loss_coef=0.03, eps_clip_low=0.1, eps_clip_high=0.3, clip_ratio_c=4.0)
    loss = rpg_skyrl.loss_from_config("rpg_rf_ufkl", cfg)
    assert loss == rpg.RPGLoss("ufkl", style="reinforce", beta=0.03, clip=rpg.Clip(0.1, 0.3, dual=4.0))
    with pytest.raises(ValueError, match="unknown rpg policy_loss_type"):
        rpg_skyrl.loss_from_config("rpg_nope", cfg)


# --- beta = 0: SkyRL's own losses, loss and gradient --------------------------------------


@pytest.mark.parametrize("name", [f"rpg_{d}" for d in rpg.DIVERGENCES])
def test_differentiable_rpg_at_beta0_is_skyrl_dual_clip(name):
    logp, old, adv, mask, _, _ = _batch()
    adv_s = scale_advantages(adv, mask, "token_mean", 2, None)
    ours = _call(name, logp, old, adv_s, mask, _config(policy_loss_type=name))
    theirs = _call("dual_clip", logp, old, adv_s, mask, _config(policy_loss_type="dual_clip"))
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    assert ours[2]["clip_ratio"] > 0  # the clip binds on this batch: the comparison covers it


def test_float32_exp_difference(monkeypatch):
    """With SkyRL's own float32 exp of the ratio, its dual-clip loss and gradient differ from the float64
    rpg ones by float32 rounding of w: measured below 1e-6 relative, and not 0."""
    monkeypatch.setattr(ppo_utils, "safe_exp_delta", torch_utils.safe_exp_delta)
    logp, old, adv, mask, _, _ = _batch()
    adv_s = scale_advantages(adv, mask, "token_mean", 2, None)
    ours = _call("rpg_rkl", logp, old, adv_s, mask, _config(policy_loss_type="rpg_rkl"))
    theirs = _call("dual_clip", logp, old, adv_s, mask, _config(policy_loss_type="dual_clip"))
    rel = ((ours[1] - theirs[1]).abs().max() / theirs[1].abs().max()).item()
    assert 0 < rel < 1e-6
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", [f"rpg_rf_{d}" for d in rpg.DIVERGENCES])
def test_reinforce_rpg_at_beta0_has_skyrl_dual_clip_gradient(name):
    logp, old, adv, mask, _, _ = _batch()
    adv_s = scale_advantages(adv, mask, "sequence_mean", 2, None)
    value, grad, _ = _call(name, logp, old, adv_s, mask, _config(policy_loss_type=name))
    _, their_grad, _ = _call("dual_clip", logp, old, adv_s, mask, _config(policy_loss_type="dual_clip"))
    _close(grad, their_grad)
    assert torch.isfinite(value)  # the REINFORCE surrogate -sg(g)·logp: not SkyRL's value, same gradient


def test_ppo_clip_is_skyrl_regular():
    logp, old, adv, mask, _, _ = _batch(seed=5)
    adv_s = scale_advantages(adv, mask, "token_mean", 2, None)
    _register("t_regular", rpg.PolicyLoss(clip=rpg.Clip(LOW, HIGH, dual=None)))
    ours = _call("t_regular", logp, old, adv_s, mask, _config(policy_loss_type="t_regular"))
    theirs = _call("regular", logp, old, adv_s, mask, _config(policy_loss_type="regular"))
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    assert ours[2]["clip_ratio"] == pytest.approx(theirs[2]["clip_ratio"], abs=0.5)


@pytest.mark.parametrize("tis", ["token", "sequence"])
def test_rollout_logprobs_become_the_behaviour_policy(tis):
    logp, old, adv, mask, _, rollout = _batch(seed=8)
    adv_s = scale_advantages(adv, mask, "token_mean", 2, None)
    opc = OffPolicyCorrectionConfig(tis_ratio_type=tis, token_tis_ratio_clip_high=1.5, sequence_tis_ratio_clip_high=3.0)
    _register("t_regular_tis", rpg.PolicyLoss(clip=rpg.Clip(LOW, HIGH, dual=None)))
    ours = _call("t_regular_tis", logp, old, adv_s, mask, _config(off_policy_correction=opc), rollout)
    theirs = _call(
        "regular", logp, old, adv_s, mask, _config(policy_loss_type="regular", off_policy_correction=opc), rollout
    )
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    plain = _call("t_regular_tis", logp, old, adv_s, mask, _config(), rollout)  # no correction configured
    assert not torch.allclose(plain[1], ours[1])  # the weight does act


def test_gspo_is_skyrl_gspo():
    logp, old, adv, mask, _, _ = _batch(seed=11, spread=0.05)
    adv_s = scale_advantages(adv, mask, "sequence_mean", 2, None)
    cfg = dict(eps_clip_low=3e-3, eps_clip_high=4e-3, loss_reduction="sequence_mean")
    _register("t_gspo", rpg.PolicyLoss(ratio="sequence", clip=rpg.Clip(3e-3, 4e-3, dual=None)))
    ours = _call("t_gspo", logp, old, adv_s, mask, _config(policy_loss_type="t_gspo", **cfg))
    theirs = _call("gspo", logp, old, adv_s, mask, _config(policy_loss_type="gspo", **cfg))
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    assert 0 < theirs[2]["clip_ratio"] < 1


def test_cispo_is_skyrl_cispo():
    logp, old, adv, mask, _, _ = _batch(seed=12)
    adv_s = scale_advantages(adv, mask, "token_mean", 2, None)
    cispo = CISPOConfig(cispo_eps_clip_low=0.3, cispo_eps_clip_high=0.2)
    _register("t_cispo", rpg.CISPOLoss(rpg.Truncate(0.3, 0.2)))
    ours = _call("t_cispo", logp, old, adv_s, mask, _config(policy_loss_type="t_cispo"))
    theirs = _call("cispo", logp, old, adv_s, mask, _config(policy_loss_type="cispo", cispo=cispo))
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    assert theirs[2]["clip_ratio"] > 0


@pytest.mark.parametrize("divergence", ["tv", "kl"])
def test_dppo_has_skyrl_dppo_gradient(divergence):
    """SkyRL's dppo anchors ratio and region on rollout_logprobs: rpg.DPPOLoss with anchor='rollout'.
    The values differ by construction (SkyRL's −w·A·M against rpg's REINFORCE −sg(w)·A·M·logp)."""
    logp, old, adv, mask, _, rollout = _batch(seed=13, spread=0.6)
    adv_s = scale_advantages(adv, mask, "token_mean", 2, None)
    dppo = DPPOConfig(dppo_type=f"binary_{divergence}", delta_low=0.05, delta_high=0.08)
    _register(f"t_dppo_{divergence}", rpg.DPPOLoss(0.05, 0.08, divergence), anchor="rollout")
    value, grad, m = _call(f"t_dppo_{divergence}", logp, old, adv_s, mask, _config(), rollout)
    _, their_grad, theirs = _call("dppo", logp, old, adv_s, mask, _config(policy_loss_type="dppo", dppo=dppo), rollout)
    _close(grad, their_grad)
    assert 0 < theirs["clip_ratio"] < 1
    assert m["clip_ratio"] == pytest.approx(theirs["clip_ratio"], abs=1e-12)
    assert torch.isfinite(value)


# --- reduction modes x micro-batches: the sum of the micro-batch losses is the mini-batch loss ------------

_AGG = {
    "token_mean": "token-mean",
    "sequence_mean": "seq-mean-token-mean",
    "seq_mean_token_sum_norm": "seq-mean-token-sum-norm",
}
L = 9


@pytest.mark.parametrize("reduction", list(_AGG))
@pytest.mark.parametrize("micro", [1, 2, 3, 6])
@pytest.mark.parametrize("name", ["rpg_urkl", "rpg_rf_fkl", "rpg_rf_rkl", "rpg_ufkl"])
def test_microbatch_sum_is_minibatch_loss(reduction, micro, name):
    logp, old, adv, mask, _, _ = _batch(b=6, t=7, seed=21)
    beta = 0.07
    cfg = _config(policy_loss_type=name, kl_loss_coef=beta, loss_reduction=reduction, max_seq_len=L)
    adv_s = scale_advantages(adv, mask, reduction, micro, L)
    scale = rpg_skyrl.advantage_scale(mask, reduction, micro, L)
    x = logp.detach().clone().requires_grad_(True)
    total = 0.0
    for start in range(0, 6, micro):
        rows = slice(start, start + micro)
        with rpg_skyrl.batch_inputs(advantage_scale=scale[rows]):
            loss, _ = Registry.get(name)(x[rows], old[rows], adv_s[rows], config=cfg, loss_mask=mask[rows])
        total = total + loss
    (grad,) = torch.autograd.grad(total, x)
    ref_loss = rpg_skyrl.loss_from_config(name, cfg).replace(agg=_AGG[reduction], max_len=L)
    y = logp.detach().clone().requires_grad_(True)
    expected = ref_loss(y, old, adv, mask.bool()).loss
    (expected_grad,) = torch.autograd.grad(expected, y)
    _close(total.detach(), expected.detach())
    _close(grad, expected_grad)


def test_prompt_mean_scale_is_skyrl_s():
    _, _, adv, mask, _, _ = _batch(b=6, seed=2)
    bounds = [(0, 2), (2, 5), (5, 6)]
    scale = rpg_skyrl.advantage_scale(mask, "prompt_mean", prompt_boundaries=bounds)
    _close(scale * adv, scale_advantages(adv, mask, "prompt_mean", 1, None, bounds))


def test_frozen_reference_through_the_hook():
    logp, old, adv, mask, ref, _ = _batch(seed=30)
    beta = 0.2
    cfg = _config(kl_loss_coef=beta)
    scale = rpg_skyrl.advantage_scale(mask, "token_mean")
    adv_s = scale * adv
    _register("t_urkl_ref", rpg.RPGLoss("urkl", style="reinforce", beta=beta), reference="model")
    x = logp.detach().clone().requires_grad_(True)
    with rpg_skyrl.batch_inputs(ref_logp=ref, advantage_scale=scale):
        loss, _ = Registry.get("t_urkl_ref")(x, old, adv_s, config=cfg, loss_mask=mask)
    (grad,) = torch.autograd.grad(loss, x)
    y = logp.detach().clone().requires_grad_(True)
    expected = rpg.RPGLoss("urkl", style="reinforce", beta=beta)(y, old, adv, mask.bool(), ref_logp=ref).loss
    (expected_grad,) = torch.autograd.grad(expected, y)
    _close(loss.detach(), expected.detach())
    _close(grad, expected_grad)
    with rpg_skyrl.batch_inputs(advantage_scale=scale):  # the reference read is the hook's, not pi_old
        loss_old, _ = Registry.get("rpg_rf_urkl")(logp, old, adv_s, config=cfg, loss_mask=mask)
    assert not torch.allclose(loss_old.detach(), expected.detach())


# --- refusals ---------------------------------------------------------------------------------


def test_beta_without_the_scale_is_refused():
    logp, old, adv, mask, _, _ = _batch()
    with pytest.raises(ValueError, match="advantage_scale"):
        Registry.get("rpg_rf_urkl")(logp, old, adv, config=_config(kl_loss_coef=0.1), loss_mask=mask)


def test_reference_model_without_ref_is_refused():
    logp, old, adv, mask, _, _ = _batch()
    scale = rpg_skyrl.advantage_scale(mask, "token_mean")
    with rpg_skyrl.batch_inputs(advantage_scale=scale), pytest.raises(ValueError, match="ref_logp"):
        Registry.get("rpg_distill")(logp, old, adv, config=_config(kl_loss_coef=0.1), loss_mask=mask)


def test_skyrl_kl_term_on_top_is_refused():
    logp, old, adv, mask, _, _ = _batch()
    with pytest.raises(ValueError, match="use_kl_loss=False"):
        Registry.get("rpg_urkl")(logp, old, adv, config=_config(use_kl_loss=True, kl_loss_coef=0.1), loss_mask=mask)


def test_old_is_current_off_policy_is_refused():
    """SkyRL's fully asynchronous trap: old_log_probs is log_probs itself while the engine sampled."""
    logp, _, adv, mask, _, rollout = _batch()
    with pytest.raises(ValueError, match="allow_old_is_current"):
        Registry.get("rpg_rf_rkl")(logp, logp, adv, config=_config(), loss_mask=mask, rollout_logprobs=rollout)
    with pytest.raises(ValueError, match="allow_old_is_current"):  # a detached view shares the storage too
        Registry.get("rpg_rf_rkl")(logp, logp.detach(), adv, config=_config(), loss_mask=mask, rollout_logprobs=rollout)
    Registry.get("rpg_rf_rkl")(logp, logp.detach(), adv, config=_config(), loss_mask=mask)  # on-policy: fine
    _register("t_allow", rpg.RPGLoss("rkl", beta=0.0), allow_old_is_current=True)
    Registry.get("t_allow")(logp, logp, adv, config=_config(), loss_mask=mask, rollout_logprobs=rollout)
    _register("t_anchor", rpg.RPGLoss("rkl", beta=0.0), anchor="rollout")
    Registry.get("t_anchor")(logp, logp, adv, config=_config(), loss_mask=mask, rollout_logprobs=rollout)


def test_unsupported_corrections_are_refused():
    logp, old, adv, mask, _, rollout = _batch()
    masked = _config(off_policy_correction=OffPolicyCorrectionConfig(sequence_mask_metric="geometric"))
    with pytest.raises(ValueError, match="sequence_mask_metric"):
        Registry.get("rpg_rkl")(logp, old, adv, config=masked, loss_mask=mask, rollout_logprobs=rollout)
    _register("t_both", rpg.RPGLoss("rkl", beta=0.0, correction=rpg.RolloutCorrection()))
    tis = _config(off_policy_correction=OffPolicyCorrectionConfig(tis_ratio_type="token"))
    with pytest.raises(ValueError, match="both"):
        Registry.get("t_both")(logp, old, adv, config=tis, loss_mask=mask, rollout_logprobs=rollout)


def test_rollout_anchor_with_a_correction_is_refused():
    logp, old, adv, mask, _, rollout = _batch()
    _register("t_anchor_tis", rpg.RPGLoss("rkl", beta=0.0), anchor="rollout")
    tis = _config(off_policy_correction=OffPolicyCorrectionConfig(tis_ratio_type="token"))
    with pytest.raises(ValueError, match="twice"):
        Registry.get("t_anchor_tis")(logp, old, adv, config=tis, loss_mask=mask, rollout_logprobs=rollout)


def test_register_validates():
    with pytest.raises(ValueError, match="reference"):
        rpg_skyrl.register("t_bad", rpg.RPGLoss("rkl"), reference="frozen")
    with pytest.raises(ValueError, match="entropy"):
        rpg_skyrl.register("t_bad", rpg.RPGLoss("rkl", entropy_coef=0.1))
    with pytest.raises(TypeError, match="loss"):
        rpg_skyrl.register("t_bad", "rkl")
    assert dataclasses.is_dataclass(rpg_skyrl.BatchInputs)
