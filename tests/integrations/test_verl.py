"""rpg.integrations.verl against the real verl package: the registered names give rpg.RPGLoss's loss."""

import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl", reason="the verl extra is not installed")

from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, get_policy_loss_fn
from verl.workers.config import ActorConfig
from verl.workers.config.actor import PolicyLossConfig

import rpg
from rpg.integrations import verl as rpg_verl

from ..conftest import make_batch

BETA = 0.05
AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _config(**overrides):
    kw = dict(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        ppo_mini_batch_size=1,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        kl_loss_coef=BETA,
        policy_loss=PolicyLossConfig(dro_beta=0.2),  # read by rpg_dro only
    )
    kw.update(overrides)
    return ActorConfig(**kw)


def _batch():
    logp, old, adv, mask, _ = make_batch(5, 7, seed=21, spread=0.5, adv_shape="tok")
    return logp, old, adv, mask.float()  # verl passes float masks and [B, T] advantages


@pytest.mark.parametrize("loss_mode", sorted(rpg_verl.LOSS_MODES))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_registered_loss_equals_rpg_loss(loss_mode, agg):
    divergence, style = rpg_verl.LOSS_MODES[loss_mode]
    logp, old, adv, mask = _batch()
    loss, metrics = get_policy_loss_fn(loss_mode)(
        old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=_config()
    )
    (g_verl,) = torch.autograd.grad(loss, logp)
    want = rpg.RPGLoss(divergence, style=style, beta=BETA, clip=rpg.Clip(0.2, 0.28, 3.0), agg=agg)(logp, old, adv, mask)
    (g_want,) = torch.autograd.grad(want.loss, logp)
    torch.testing.assert_close(loss, want.loss, rtol=0, atol=1e-14)
    torch.testing.assert_close(g_verl, g_want, rtol=0, atol=1e-14)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(want.metrics["clip_frac/low"] + want.metrics["clip_frac/high"])
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(want.metrics["clip_frac/dual"])
    assert metrics["actor/ppo_kl"] == pytest.approx(((old - logp) * mask).sum().item() / mask.sum().item())
    assert all(isinstance(v, float) for v in metrics.values())


def test_global_batch_info_and_rollout_weights():
    logp, old, adv, mask = _batch()
    info = dict(dp_size=2, batch_num_tokens=100, global_batch_size=9, loss_scale_factor=None)
    config = _config(global_batch_info=info)
    weights = torch.rand(logp.shape, dtype=logp.dtype, generator=torch.Generator().manual_seed(3))
    loss, _ = get_policy_loss_fn("rpg_rf_urkl")(
        old_log_prob=old,
        log_prob=logp,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode="token-mean",
        config=config,
        rollout_is_weights=weights,
    )
    fn = rpg.RPGLoss("urkl", style="reinforce", beta=BETA, clip=rpg.Clip(0.2, 0.28, 3.0))
    per_token = fn(logp, old, adv, mask).per_token
    want = 2 * (per_token * weights * mask).sum() / 100
    torch.testing.assert_close(loss, want, rtol=1e-14, atol=1e-14)


ALL_MODES = sorted([*rpg_verl.LOSS_MODES, *rpg_verl.DPPO_MODES, *rpg_verl.FAMILY_MODES])


@pytest.mark.parametrize("loss_mode", ALL_MODES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_rollout_weights_nan_inf_at_padding_are_inert(loss_mode, agg):
    """verl's rollout_is_weights enter as the loss's weights=: garbage at padding changes nothing."""
    logp, old, adv, mask = _batch()
    weights = torch.rand(logp.shape, dtype=logp.dtype, generator=torch.Generator().manual_seed(4)) + 0.5
    clean = torch.where(mask.bool(), weights, torch.zeros(()))
    dirty = clean.clone()
    pad = ~mask.bool()
    assert pad.sum() >= 3
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dirty.dtype)
    dirty[pad] = garbage.repeat(int(pad.sum()))[: int(pad.sum())]
    fn = get_policy_loss_fn(loss_mode)
    config = _config(global_batch_info=dict(dp_size=2, batch_num_tokens=60, global_batch_size=9))
    results = []
    for w in (clean, dirty):
        loss, _ = fn(
            old_log_prob=old,
            log_prob=logp,
            advantages=adv,
            response_mask=mask,
            loss_agg_mode=agg,
            config=config,
            rollout_is_weights=w,
        )
        (grad,) = torch.autograd.grad(loss, logp)
        results.append((loss, grad))
    (l_clean, g_clean), (l_dirty, g_dirty) = results
    assert torch.isfinite(l_dirty) and torch.isfinite(g_dirty).all()
    torch.testing.assert_close(l_dirty, l_clean, rtol=0, atol=0)
    torch.testing.assert_close(g_dirty, g_clean, rtol=0, atol=0)
    unweighted, _ = fn(
        old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=config
    )
    assert not torch.allclose(unweighted, l_clean)  # the weights do act on the response tokens


@pytest.mark.parametrize("agg", AGGS)
def test_rollout_weights_equal_verls_own_vanilla_loss(agg):
    """At β = 0, rpg_urkl with rollout_is_weights is verl's vanilla PPO loss with the same weights."""
    logp, old, adv, mask = _batch()
    weights = torch.rand(logp.shape, dtype=logp.dtype, generator=torch.Generator().manual_seed(5)) * 2
    weights = weights * mask  # verl's weights are 0 at padding
    info = dict(dp_size=3, batch_num_tokens=50, global_batch_size=11, loss_scale_factor=9)
    config = _config(kl_loss_coef=0.0, global_batch_info=info)
    ours, _ = get_policy_loss_fn("rpg_urkl")(
        old_log_prob=old,
        log_prob=logp,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=weights,
    )
    theirs, _ = compute_policy_loss_vanilla(old, logp, adv, mask, agg, config, rollout_is_weights=weights)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g1, g2 = (torch.autograd.grad(x, logp)[0] for x in (ours, theirs))
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("missing", ["batch_num_tokens", "global_batch_size"])
def test_dp_size_without_global_count_raises_as_verls_agg_loss(agg, missing):
    """dp_size > 1 without the count the mode needs: verl's agg_loss raises, and so does the rpg loss, with
    verl's message; where verl computes a loss, it is the same."""
    logp, old, adv, mask = _batch()
    info = dict(dp_size=2, batch_num_tokens=50, global_batch_size=11, loss_scale_factor=None)
    info[missing] = None
    config = _config(kl_loss_coef=0.0, global_batch_info=info)
    per_token = -adv * (logp - old).exp()
    try:
        theirs = agg_loss(per_token, mask, agg, **info)
    except ValueError as e:
        theirs = e
    for loss_mode in ("rpg_urkl", "rpg_rf_fkl", "rpg_dppo_tv"):
        call = dict(
            old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=config
        )
        if isinstance(theirs, ValueError):
            with pytest.raises(ValueError, match=re.escape(str(theirs))):
                get_policy_loss_fn(loss_mode)(**call)
        else:
            loss, _ = get_policy_loss_fn(loss_mode)(**call)
            assert torch.isfinite(loss)
    if not isinstance(theirs, ValueError):  # the value where verl has one: vanilla PPO at β = 0
        ours, _ = get_policy_loss_fn("rpg_urkl")(**call)
        want, _ = compute_policy_loss_vanilla(old, logp, adv, mask, agg, config)
        torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)


def test_dp_size_must_be_a_positive_int():
    logp, old, adv, mask = _batch()
    for dp, err in ((0, ValueError), (-2, ValueError), (2.5, TypeError)):
        config = _config(global_batch_info=dict(dp_size=dp, batch_num_tokens=50))
        with pytest.raises(err, match="dp_size"):
            get_policy_loss_fn("rpg_urkl")(
                old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=config
            )


def test_metrics_hold_no_extremes_verl_would_average():
    """verl averages policy-loss metrics over micro-batches: no min/max may be logged through it."""
    logp, old, adv, mask = _batch()
    for loss_mode in ALL_MODES:
        _, metrics = get_policy_loss_fn(loss_mode)(
            old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=_config()
        )
        assert not [k for k in metrics if "min" in k or "max" in k], loss_mode
        assert {"actor/rpg/ratio/mean", "actor/rpg/ratio/ess"} <= set(metrics)


def _dppo_batch(seed=3):
    logp, old, adv, mask, _ = make_batch(6, 9, seed=seed, spread=0.5, adv_shape="tok")
    # log-probs of sampled tokens are <= 0 (verl's binary KL is NaN for a "probability" above 1)
    logp = logp.detach().clamp(max=-1e-3).requires_grad_(True)
    old = old.clamp(max=-1e-3)
    adv[0, 1] = 0.0  # a zero advantage takes verl's lower branch
    return logp, old, adv, mask.float()


@pytest.mark.parametrize("divergence,delta", [("tv", 0.05), ("kl", 0.01)])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("weighted", [False, True])
def test_dppo_equals_verls_own_dppo(divergence, delta, agg, weighted):
    """rpg_dppo_tv / rpg_dppo_kl give verl's dppo_tv / dppo_kl loss, gradient and metrics on the same inputs."""
    logp, old, adv, mask = _dppo_batch()
    info = dict(dp_size=2, batch_num_tokens=70, global_batch_size=13, loss_scale_factor=None)
    config = _config(clip_ratio_low=delta, clip_ratio_high=1.5 * delta, clip_ratio_c=1.5, global_batch_info=info)
    weights = None
    if weighted:
        weights = (torch.rand(logp.shape, dtype=logp.dtype, generator=torch.Generator().manual_seed(6)) + 0.5) * mask
    call = dict(
        old_log_prob=old,
        log_prob=logp,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=weights,
    )
    ours, m_ours = get_policy_loss_fn(f"rpg_dppo_{divergence}")(**call)
    theirs, m_theirs = get_policy_loss_fn(f"dppo_{divergence}")(**call)
    assert 0.1 < m_theirs["actor/pg_clipfrac"] < 0.9 and m_theirs["actor/pg_clipfrac_lower"] > 0  # mask and cap bind
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-14)
    g1, g2 = (torch.autograd.grad(x, logp)[0] for x in (ours, theirs))
    torch.testing.assert_close(g1, g2, rtol=1e-13, atol=1e-14)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
        assert m_ours[key] == pytest.approx(m_theirs[key], rel=1e-6, abs=1e-7), key


def test_dppo_loss_from_config():
    config = _config(clip_ratio_low=0.03, clip_ratio_high=0.05)
    fn = rpg_verl.loss_from_config("rpg_dppo_kl", config, "seq-mean-token-mean")
    assert fn == rpg.DPPOLoss(0.03, 0.05, "kl", cap=3.0, agg="seq-mean-token-mean")
    assert fn == rpg.PolicyLoss(
        style="reinforce", clip=rpg.TrustRegion(0.03, 0.05, "kl", cap=3.0), agg="seq-mean-token-mean"
    )
    info = dict(loss_scale_factor=17)
    fn = rpg_verl.loss_from_config("rpg_dppo_tv", _config(global_batch_info=info), "seq-mean-token-sum-norm")
    assert fn.max_len == 17 and fn.clip == rpg.TrustRegion(0.2, 0.28, "tv", cap=3.0)
    fn = rpg_verl.loss_from_config("rpg_dppo_tv", {"clip_ratio": 0.15})  # verl's dppo falls back to C = 20
    assert fn.clip == rpg.TrustRegion(0.15, 0.15, "tv", cap=20.0) and fn.kl is None
    with pytest.raises(ValueError, match="rpg_dppo_tv"):
        rpg_verl.loss_from_config("dppo_tv", {})


def test_beta_zero_differentiable_equals_verls_own_ppo_loss():
    """Algorithm 1's dual clip is verl's vanilla PPO loss when β = 0 (ratios well inside verl's ±20 clamp)."""
    logp, old, adv, mask = _batch()
    config = _config(kl_loss_coef=0.0)
    ours, _ = get_policy_loss_fn("rpg_urkl")(
        old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean", config=config
    )
    theirs, _ = compute_policy_loss_vanilla(old, logp, adv, mask, "token-mean", config)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g1, g2 = (torch.autograd.grad(x, logp)[0] for x in (ours, theirs))
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_loss_from_config_reads_the_clip_fallback():
    fn = rpg_verl.loss_from_config("rpg_rkl", _config(clip_ratio=0.1, clip_ratio_low=None, clip_ratio_high=None))
    assert fn.clip == rpg.Clip(0.1, 0.1, 3.0) and fn.beta == BETA and fn.style == "differentiable"


def test_import_verl_loads_the_plugin():
    """The verl.plugins entry point registers the losses in any process that imports verl."""
    code = (
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; "
        "print(sorted(k for k in R if k.startswith('rpg_')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted([*ALL_MODES, *rpg_verl.GEO_COV_MODES]))


def test_advantage_estimators_agree_with_verls():
    """rpg.advantages against verl's registered estimators on the same rollouts (groups contiguous)."""
    import numpy as np
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.core_algos import (
        compute_grpo_outcome_advantage,
        compute_reinforce_plus_plus_outcome_advantage,
        compute_rloo_outcome_advantage,
    )

    g = torch.Generator().manual_seed(5)
    b, t, group = 12, 7, 4
    rewards = torch.randint(0, 3, (b,), generator=g).to(torch.float32)
    rewards[:group] = 1.0  # one degenerate group
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    mask[0, 1] = 0.0  # an interior masked token (tool output)
    last = (torch.arange(t)[None] == (lengths - 1)[:, None]).float()
    token_rewards = last * rewards[:, None]
    index = np.repeat(np.arange(b // group), group)

    want, _ = compute_grpo_outcome_advantage(token_rewards, mask, index)
    torch.testing.assert_close(rpg.advantages.grpo(rewards, group)[:, None] * mask, want, rtol=1e-5, atol=1e-6)
    want, _ = compute_grpo_outcome_advantage(token_rewards, mask, index, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(rpg.advantages.grpo(rewards, group, scale="none")[:, None] * mask, want)
    want, _ = compute_rloo_outcome_advantage(token_rewards, mask, index)
    torch.testing.assert_close(rpg.advantages.rloo(rewards, group)[:, None] * mask, want)
    cfg = AlgoConfig(gamma=0.9)
    want, _ = compute_reinforce_plus_plus_outcome_advantage(token_rewards, mask, config=cfg)
    got = rpg.advantages.reinforce_pp(rewards, mask, gamma=0.9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
