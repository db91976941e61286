"""SAPO and DRO against the peers that ship them, on identical off-policy float64 inputs: TRL 1.16's own
``GRPOTrainer._compute_loss`` (``loss_type="sapo"``, token and sequence level, with and without its k3 term)
and verl's registered ``sapo`` / ``dro`` policy losses (and rpg's ``rpg_sapo`` / ``rpg_dro`` registered in
verl). Loss and gradient agree to 1e-12."""

import pytest
import torch

import rpg

from ..conftest import make_batch

DT = torch.float64


# --- TRL -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("taus", [(1.0, 1.05), (2.0, 0.6)])
def test_trl_sapo_equals_rpg_sapo(level, beta, taus):
    pytest.importorskip("trl", reason="the trl extra is not installed")
    from trl import GRPOTrainer

    from .test_trl_equivalence import B, _config, _inputs, _stub

    args = _config(
        loss_type="sapo",
        importance_sampling_level=level,
        beta=beta,
        use_bias_correction_kl=False,
        sapo_temperature_pos=taus[0],
        sapo_temperature_neg=taus[1],
    )
    logits, ids, inputs = _inputs(args, seed=5)
    want = GRPOTrainer._compute_loss(_stub(args, logits, ids), None, dict(inputs))
    (g_want,) = torch.autograd.grad(want, logits)

    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    # TRL picks τ with torch.where on Python floats: a float32 tensor, so its τ is the float32 rounding of the
    # setting (1.05 → 1.0499999523...). The same τ here gives TRL's float64 loss to 1e-12.
    taus = tuple(float(torch.tensor(t, dtype=torch.float32)) for t in taus)
    loss_fn = rpg.SAPOLoss(*taus, ratio=level)
    if beta:
        loss_fn = loss_fn.replace(kl="k3", beta=beta)
    out = loss_fn(
        logp,
        inputs["old_per_token_logps"],
        inputs["advantages"],
        inputs["completion_mask"].bool(),
        ref_logp=inputs.get("ref_per_token_logps"),
        global_batch_size=B,  # TRL's mean over sequences counts the empty one
    )
    got = out.loss / args.gradient_accumulation_steps  # TRL divides by the accumulation steps in training
    (g_got,) = torch.autograd.grad(got, logits)
    assert g_want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


# --- verl ------------------------------------------------------------------------------------------------


def _verl():
    pytest.importorskip("verl", reason="the verl extra is not installed")
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    import rpg.integrations.verl  # noqa: F401  (registers rpg_sapo, rpg_dro)

    def config(**kw):
        base = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1)
        return ActorConfig(**base, **kw)

    return get_policy_loss_fn, config, PolicyLossConfig


def _verl_eps(mask, weights, agg):
    """verl's ``seq-mean-token-mean`` divides each sequence's sum by n_b + 1e-8 (rpg: by n_b): the per-row
    weight n_b/(n_b + 1e-8), passed to rpg as ``weights``, gives verl's aggregation exactly."""
    if agg != "seq-mean-token-mean":
        return weights
    n = mask.sum(-1, keepdim=True)
    eps = (n / (n + 1e-8)).expand_as(mask)
    return eps if weights is None else weights * eps


def _batch(seed):
    logp, old, adv, mask, _ = make_batch(5, 7, seed=seed, spread=0.6, adv_shape="tok")
    g = torch.Generator().manual_seed(seed)
    weights = 0.5 + torch.rand(5, 7, generator=g, dtype=DT)  # verl's rollout_is_weights
    return logp, old, adv, mask.to(DT), weights


@pytest.mark.parametrize("with_weights", [False, True])
def test_verl_sapo_equals_rpg_sapo(with_weights):
    get_policy_loss_fn, config, _ = _verl()
    cfg = config(tau_pos=1.3, tau_neg=0.8)
    logp, old, adv, mask, weights = _batch(31)
    weights = weights if with_weights else None
    call = dict(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=cfg)
    want, _ = get_policy_loss_fn("sapo")(**call, loss_agg_mode="token-mean", rollout_is_weights=weights)
    (g_want,) = torch.autograd.grad(want, logp)
    loss_fn = rpg.SAPOLoss(1.3, 0.8)  # seq-mean-token-mean, the aggregation verl's sapo always uses
    out = loss_fn(logp, old, adv, mask, weights=_verl_eps(mask, weights, loss_fn.agg))
    (g_out,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_out, g_want, rtol=0, atol=1e-12)
    # rpg's registered rpg_sapo is rpg's loss inside verl (its exact n_b, not verl's n_b + 1e-8)
    got, metrics = get_policy_loss_fn("rpg_sapo")(
        **call, loss_agg_mode="seq-mean-token-mean", rollout_is_weights=weights
    )
    exact = loss_fn(logp, old, adv, mask, weights=weights).loss
    g_got, g_exact = (torch.autograd.grad(x, logp)[0] for x in (got, exact))
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-14)
    torch.testing.assert_close(g_got, g_exact, rtol=0, atol=1e-14)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=0)  # verl's ε only
    assert metrics["actor/pg_clipfrac"] == 0.0


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_verl_dro_equals_rpg_dro(agg, with_weights):
    get_policy_loss_fn, config, PolicyLossConfig = _verl()
    cfg = config(policy_loss=PolicyLossConfig(loss_mode="dro", dro_beta=0.3))
    logp, old, adv, mask, weights = _batch(32)
    weights = weights if with_weights else None
    call = dict(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=cfg)
    want, _ = get_policy_loss_fn("dro")(**call, loss_agg_mode=agg, rollout_is_weights=weights)
    (g_want,) = torch.autograd.grad(want, logp)
    loss_fn = rpg.DROLoss(0.3, agg=agg)
    out = loss_fn(logp, old, adv, mask, weights=_verl_eps(mask, weights, agg))
    (g_out,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_out, g_want, rtol=0, atol=1e-12)
    got, _ = get_policy_loss_fn("rpg_dro")(**call, loss_agg_mode=agg, rollout_is_weights=weights)
    exact = loss_fn(logp, old, adv, mask, weights=weights).loss
    g_got, g_exact = (torch.autograd.grad(x, logp)[0] for x in (got, exact))
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-14)
    torch.testing.assert_close(g_got, g_exact, rtol=0, atol=1e-14)


def test_verl_rpg_dro_needs_dro_beta():
    get_policy_loss_fn, config, _ = _verl()
    logp, old, adv, mask, _ = _batch(33)
    with pytest.raises(ValueError, match="dro_beta"):
        get_policy_loss_fn("rpg_dro")(
            old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=config()
        )
