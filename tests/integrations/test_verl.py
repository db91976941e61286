"""rpg.integrations.verl against the real verl package: the registered names give rpg.RPGLoss's loss."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl", reason="the verl extra is not installed")

import rpg  # noqa: E402
from rpg.integrations import verl as rpg_verl  # noqa: E402
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from ..conftest import make_batch  # noqa: E402

BETA = 0.05


def _config(**overrides):
    kw = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1,
              clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, kl_loss_coef=BETA)
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
    loss, metrics = get_policy_loss_fn(loss_mode)(old_log_prob=old, log_prob=logp, advantages=adv,
                                                  response_mask=mask, loss_agg_mode=agg, config=_config())
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
    loss, _ = get_policy_loss_fn("rpg_rf_urkl")(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                                               loss_agg_mode="token-mean", config=config, rollout_is_weights=weights)
    fn = rpg.RPGLoss("urkl", style="reinforce", beta=BETA, clip=rpg.Clip(0.2, 0.28, 3.0))
    per_token = fn(logp, old, adv, mask).per_token
    want = 2 * (per_token * weights * mask).sum() / 100
    torch.testing.assert_close(loss, want, rtol=1e-14, atol=1e-14)


def test_beta_zero_differentiable_equals_verls_own_ppo_loss():
    """Algorithm 1's dual clip is verl's vanilla PPO loss when β = 0 (ratios well inside verl's ±20 clamp)."""
    logp, old, adv, mask = _batch()
    config = _config(kl_loss_coef=0.0)
    ours, _ = get_policy_loss_fn("rpg_urkl")(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                                            loss_agg_mode="token-mean", config=config)
    theirs, _ = compute_policy_loss_vanilla(old, logp, adv, mask, "token-mean", config)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g1, g2 = (torch.autograd.grad(x, logp)[0] for x in (ours, theirs))
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_loss_from_config_reads_the_clip_fallback():
    fn = rpg_verl.loss_from_config("rpg_rkl", _config(clip_ratio=0.1, clip_ratio_low=None, clip_ratio_high=None))
    assert fn.clip == rpg.Clip(0.1, 0.1, 3.0) and fn.beta == BETA and fn.style == "differentiable"


def test_import_verl_loads_the_plugin():
    """The verl.plugins entry point registers the losses in any process that imports verl."""
    code = ("from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; "
            "print(sorted(k for k in R if k.startswith('rpg_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(rpg_verl.LOSS_MODES))


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
