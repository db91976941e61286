"""rpg.integrations.areal against the installed AReaL (`.ci/skyrl` builds its Python 3.12 environment).

The rpg drop-in and AReaL's own ``areal.utils.functional.ppo_actor_loss_fn`` are called with the same arguments
(the actor's call in ``areal/trainer/ppo/actor.py``); the main suite, without AReaL, skips this module."""

import pytest
import torch

pytest.importorskip("areal.utils.functional", reason="AReaL is not installed: run .ci/skyrl")

from areal.api.cli_args import RejectionSamplingConfig
from areal.utils.functional import ppo_actor_loss_fn

import rpg
from rpg.integrations import areal as rpg_areal

from ..conftest import make_batch

TOL = dict(rtol=1e-10, atol=1e-12)


def _batch(seed=0, spread=0.4):
    logp, prox, adv, mask, _ = make_batch(6, 8, seed=seed, spread=spread, adv_shape="tok")
    g = torch.Generator().manual_seed(seed + 9)
    behave = prox + 0.3 * torch.randn(prox.shape, generator=g, dtype=prox.dtype)
    return logp.detach(), prox, behave, adv, mask


def _run(fn, logp, prox, behave, adv, mask, **kw):
    x = logp.detach().clone().requires_grad_(True)
    loss, stat = fn(logprobs=x, proximal_logprobs=prox, old_logprobs=behave, advantages=adv, loss_mask=mask, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, stat


SETTINGS = [
    dict(eps_clip=0.2),
    dict(eps_clip=0.2, eps_clip_higher=0.28),
    dict(eps_clip=0.2, eps_clip_higher=0.28, c_clip=3.0),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_ppo_at_beta0_is_areal_decoupled_ppo(settings):
    logp, prox, behave, adv, mask = _batch()
    ours = _run(rpg_areal.actor_loss_fn(None), logp, prox, behave, adv, mask, **settings)
    theirs = _run(ppo_actor_loss_fn, logp, prox, behave, adv, mask, **settings)
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    torch.testing.assert_close(ours[1], theirs[1], **TOL)
    for key in ("clip_mask", "dual_clip_mask"):
        assert torch.equal(ours[2][key], theirs[2][key].bool()), key
    assert theirs[2]["clip_mask"].any()
    torch.testing.assert_close(ours[2]["importance_weight"], theirs[2]["importance_weight"], **TOL)


@pytest.mark.parametrize("divergence", rpg.DIVERGENCES)
def test_rpg_at_beta0_has_areal_gradient(divergence):
    """Every RPG loss at beta = 0: the dual-clip PPO gradient of AReaL (REINFORCE values are surrogates)."""
    logp, prox, behave, adv, mask = _batch(seed=2)
    kw = dict(eps_clip=0.2, eps_clip_higher=0.28, c_clip=3.0)
    for style in rpg.STYLES:
        ours = _run(rpg_areal.actor_loss_fn(divergence, style, beta=0.0), logp, prox, behave, adv, mask, **kw)
        theirs = _run(ppo_actor_loss_fn, logp, prox, behave, adv, mask, **kw)
        torch.testing.assert_close(ours[1], theirs[1], **TOL)


def test_sequence_ratio_is_areal_gspo():
    logp, prox, behave, adv, mask = _batch(seed=3, spread=0.05)
    adv = adv[:, :1].expand_as(logp).contiguous()  # one advantage per sequence
    kw = dict(eps_clip=3e-3, eps_clip_higher=4e-3, importance_sampling_level="sequence")
    ours = _run(rpg_areal.actor_loss_fn(None), logp, prox, behave, adv, mask, **kw)
    theirs = _run(ppo_actor_loss_fn, logp, prox, behave, adv, mask, **kw)
    torch.testing.assert_close(ours[1], theirs[1], **TOL)


@pytest.mark.parametrize("action, lower, upper", [("clamp", None, 1.3), ("clamp", 0.8, 1.3), ("mask", 0.7, 1.4)])
def test_rejection_sampling_is_rpg_rollout_correction(action, lower, upper):
    """AReaL computes the behaviour weight in float32 (apply_rejection_sampling upcasts to float32): the two
    agree to float32 rounding of that weight, here measured below 1e-6 relative."""
    logp, prox, behave, adv, mask = _batch(seed=4)
    rs = RejectionSamplingConfig(level="token", action=action, metric="ratio", lower=lower, upper=upper)
    kw = dict(eps_clip=0.2, eps_clip_higher=0.28, c_clip=3.0, rejection_sampling=rs)
    ours = _run(rpg_areal.actor_loss_fn("urkl", "reinforce", beta=0.1), logp, prox, behave, adv, mask, **kw)
    plain = _run(rpg_areal.actor_loss_fn(None), logp, prox, behave, adv, mask, **kw)
    theirs = _run(ppo_actor_loss_fn, logp, prox, behave, adv, mask, **kw)
    torch.testing.assert_close(plain[0], theirs[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(plain[1], theirs[1], rtol=1e-6, atol=1e-9)
    assert torch.isfinite(ours[0])
    unweighted = _run(ppo_actor_loss_fn, logp, prox, behave, adv, mask, **{**kw, "rejection_sampling": None})
    assert not torch.allclose(unweighted[1], theirs[1], rtol=1e-3)  # the weight acts on this batch


def test_urkl_matches_rpg_with_the_mapped_correction():
    logp, prox, behave, adv, mask = _batch(seed=5)
    rs = RejectionSamplingConfig(level="token", action="clamp", metric="ratio", upper=1.5)
    fn = rpg_areal.actor_loss_fn("urkl", "reinforce", beta=0.1)
    ours = _run(fn, logp, prox, behave, adv, mask, eps_clip=0.2, rejection_sampling=rs)
    expected_loss = rpg.RPGLoss(
        "urkl",
        style="reinforce",
        beta=0.1,
        clip=rpg.Clip(0.2, 0.2, dual=None),
        correction=rpg.RolloutCorrection("token", "truncate", upper=1.5),
    )
    y = logp.detach().clone().requires_grad_(True)
    out = expected_loss(y, prox, adv, mask, behavior_logp=behave).loss
    (g,) = torch.autograd.grad(out, y)
    torch.testing.assert_close(ours[0], out.detach(), **TOL)
    torch.testing.assert_close(ours[1], g, **TOL)


def test_refusals():
    logp, prox, behave, adv, mask = _batch()
    fn = rpg_areal.actor_loss_fn()
    for rs in (
        RejectionSamplingConfig(level="sequence", action="mask", metric="ratio", upper=2.0),
        RejectionSamplingConfig(level="token", action="mask", metric="kl_k3", upper=2.0),
    ):
        with pytest.raises(ValueError, match="rejection_sampling"):
            fn(logp, prox, behave, adv, 0.2, mask, rejection_sampling=rs)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fn(logp, prox, behave, adv, 0.2, mask, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="divergence"):
        rpg_areal.actor_loss_fn("k3")
