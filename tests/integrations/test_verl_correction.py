"""verl's rollout correction (algorithm.rollout_correction) against rpg.RolloutCorrection, with the real verl.

The table in rpg.integrations.verl's docstring and docs/integrations.md says which rpg correction gives
the weights and the kept tokens of which verl setting; these tests check every row on the same log-probs,
and that verl's computed weights and rejection mask, fed through a registered rpg loss, give the rpg loss
called with ``behavior_logp`` and that correction.
"""

import math

import pytest
import torch

pytest.importorskip("verl", reason="the verl extra is not installed")

from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.trainer.ppo.rollout_corr_helper import (
    compute_rollout_correction_and_rejection_mask,
    compute_rollout_correction_weights,
    compute_rollout_rejection_mask,
)
from verl.workers.config import ActorConfig

import rpg
from rpg.integrations import verl as rpg_verl

B, T = 16, 8


def _logps(seed=0, spread=0.5):
    """π_old and μ log-probs of sampled tokens (≤ 0), a padded mask; log ρ ~ N(0, spread²) per token."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1.5
    beh = (old - spread * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    mask[1, 0] = False  # an interior masked token (e.g. a tool output)
    mask[2] = False  # an empty row
    return old, beh, mask


def _verl_weights(old, beh, mask, level, threshold):
    w, _ = compute_rollout_correction_weights(old - beh, mask.float(), rollout_is=level, rollout_is_threshold=threshold)
    return w


def _verl_keep(old, beh, mask, rs, threshold):
    keep, _ = compute_rollout_rejection_mask(old - beh, mask.float(), rollout_rs=rs, rollout_rs_threshold=threshold)
    return keep.bool()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_is_weights(level):
    """rollout_is=<level>, threshold U (TIS) = RolloutCorrection(level, mode="truncate", upper=U)."""
    old, beh, mask = _logps()
    want = _verl_weights(old, beh, mask, level, 2.0)
    c = rpg.RolloutCorrection(level=level, mode="truncate", upper=2.0)
    got = c.weight(old, beh, mask)
    assert (want == 2.0).any() and ((want > 0) & (want < 2.0)).any()  # the bound binds on some, not all
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_icepop_weights(level):
    """rollout_is=<level>, threshold "L_U" (IcePop) = RolloutCorrection(level, mode="mask", lower=L, upper=U)."""
    old, beh, mask = _logps(1)
    want = _verl_weights(old, beh, mask, level, "0.5_1.8")
    c = rpg.RolloutCorrection(level=level, mode="mask", lower=0.5, upper=1.8)
    got = c.weight(old, beh, mask)
    rejected = mask & (want == 0)
    assert rejected.any() and (want[mask] > 0).any()
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    # IcePop keeps the zero-weighted tokens in verl's response_mask: count_rejected=True is rpg's default
    assert c.count_rejected and torch.equal(c.keep(old, beh, mask) | rejected, mask)


def test_seq_mean_k1_keeps_the_inverted_band():
    """verl's seq_mean_k1 "L_U" keeps 1/U <= geometric-mean ρ <= 1/L: rpg's geo_lower=1/U, geo_upper=1/L."""
    old, beh, mask = _logps(2, spread=0.8)
    low, high = 0.9, 1.25
    want = _verl_keep(old, beh, mask, "seq_mean_k1", f"{low}_{high}")
    c = rpg.RolloutCorrection(
        mode="truncate", lower=1.0, upper=1.0, geo_lower=1 / high, geo_upper=1 / low, count_rejected=False
    )
    assert (mask & ~want).any() and want.any()
    assert torch.equal(c.keep(old, beh, mask), want)
    torch.testing.assert_close(c.weight(old, beh, mask), want.double())  # weight 1 where kept (RS alone)
    literal = rpg.RolloutCorrection(geo_lower=low, geo_upper=high, count_rejected=False)
    assert not torch.equal(literal.keep(old, beh, mask), want)  # the band as verl's docs read it is another one


def test_seq_max_k2_and_k3_are_worst_token_filters():
    old, beh, mask = _logps(3)
    u = 0.18
    want = _verl_keep(old, beh, mask, "seq_max_k2", u)
    bound = math.sqrt(2 * u)
    c = rpg.RolloutCorrection(token_lower=math.exp(-bound), token_upper=math.exp(bound), count_rejected=False)
    assert (mask & ~want).any() and want.any()
    assert torch.equal(c.keep(old, beh, mask), want)

    def root(sign):  # e^x − 1 − x = u on the side of 0 given by sign, by bisection
        lo, hi = 0.0, sign * 10.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if math.expm1(mid) - mid < u else (lo, mid)
        return (lo + hi) / 2

    want = _verl_keep(old, beh, mask, "seq_max_k3", u)
    c = rpg.RolloutCorrection(token_lower=math.exp(root(-1)), token_upper=math.exp(root(1)), count_rejected=False)
    assert (mask & ~want).any() and want.any()
    assert torch.equal(c.keep(old, beh, mask), want)


def _config(info):
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        ppo_mini_batch_size=1,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        kl_loss_coef=0.05,
        global_batch_info=info,
    )


VERL_SETTINGS = {  # verl's (rollout_is, threshold, rollout_rs, rs threshold) and the rpg correction it is
    "token_tis": (("token", 2.0, None, None), rpg.RolloutCorrection(level="token", upper=2.0)),
    "seq_tis": (("sequence", 2.0, None, None), rpg.RolloutCorrection(level="sequence", upper=2.0)),
    "token_icepop": (("token", "0.5_1.8", None, None), rpg.RolloutCorrection(mode="mask", lower=0.5, upper=1.8)),
    "token_tis_geo_rs": (
        ("token", 2.0, "seq_mean_k1", "0.8_1.1"),
        rpg.RolloutCorrection(upper=2.0, geo_lower=1 / 1.1, geo_upper=1 / 0.8, count_rejected=False),
    ),
}


@pytest.mark.parametrize("name", sorted(VERL_SETTINGS))
@pytest.mark.parametrize("loss_mode", ["rpg_rf_urkl", "rpg_fkl"])
def test_verl_correction_through_the_adapter_is_the_rpg_correction(name, loss_mode):
    """verl's decoupled flow — weights and rejection mask from π_old and μ, global token count of the
    modified mask, the registered rpg loss — gives the rpg loss called with behavior_logp and the
    correction of the table (and the same gradient)."""
    (is_level, is_thr, rs, rs_thr), correction = VERL_SETTINGS[name]
    old, beh, mask = _logps(4)
    g = torch.Generator().manual_seed(7)
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3).requires_grad_(True)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    proto, verl_mask, _ = compute_rollout_correction_and_rejection_mask(
        old,
        beh,
        mask.float(),
        rollout_is=is_level,
        rollout_is_threshold=is_thr,
        rollout_rs=rs,
        rollout_rs_threshold=rs_thr,
    )
    weights = proto.batch["rollout_is_weights"]
    info = dict(dp_size=1, batch_num_tokens=int(verl_mask.sum()), global_batch_size=B)
    ours, _ = get_policy_loss_fn(loss_mode)(
        old_log_prob=old,
        log_prob=logp,
        advantages=adv,
        response_mask=verl_mask,
        loss_agg_mode="token-mean",
        config=_config(info),
        rollout_is_weights=weights,
    )
    divergence, style = rpg_verl.LOSS_MODES[loss_mode]
    fn = rpg.RPGLoss(divergence, style=style, beta=0.05, clip=rpg.Clip(0.2, 0.28, 3.0), correction=correction)
    counted = mask if correction.count_rejected else correction.keep(old, beh, mask)
    want = fn(logp, old, adv, mask, behavior_logp=beh, batch_num_tokens=int(counted.sum())).loss
    assert (weights[mask] != 1).any()
    if rs is not None:
        assert (mask & ~verl_mask.bool()).any()  # the rejection acts
    torch.testing.assert_close(ours, want, rtol=1e-13, atol=1e-15)
    g1, g2 = (torch.autograd.grad(x, logp)[0] for x in (ours, want))
    torch.testing.assert_close(g1, g2, rtol=1e-13, atol=1e-15)
