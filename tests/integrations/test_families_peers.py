"""GMPO, Clip-Cov, KL-Cov against verl's own registered policy losses and VESPO against TRL's ``_compute_loss``.

Same float64 off-policy inputs, loss and gradient to 1e-10 (Clip-Cov with the same seed: verl draws from
torch's default generator, rpg from the call's ``generator=``).
"""

import types
from collections import defaultdict

import pytest
import torch

import rpg

B, T = 6, 9


def _batch(seed=0, spread=0.6, adv_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 4.0  # log-probs stay < 0 after the noise
    logp = (old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = adv_scale * torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 7, 4, 9, 1, 6])
    mask = torch.arange(T)[None] < lengths[:, None]
    return logp, old, adv, mask


def _verl_config(policy_loss=None, **kw):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    base = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1)
    base.update(kw)
    if policy_loss is not None:
        base["policy_loss"] = PolicyLossConfig(**policy_loss)
    return ActorConfig(**base)


def _verl(name, logp, old, adv, mask, config, agg="token-mean", weights=None, mask_scale=1.0):
    """verl's registered loss and its gradient. ``mask_scale``: geo_mean divides by Σ mask + 1e-8 (twice);
    a float mask scaled by 1e8 leaves every other computation of it unchanged (its sums scale and divide
    out) and shrinks that guard to 1e-16 relative, so the formula itself is compared."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    loss, _ = get_policy_loss_fn(name)(
        old_log_prob=old,
        log_prob=logp,
        advantages=adv[:, None].expand(B, T) if adv.dim() == 1 else adv,
        response_mask=mask.double() * mask_scale,
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=weights,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad


def _guard(mask, agg):
    """verl's seq-mean-token-mean divides row b by n_b + 1e-8: rpg's with the row weight n_b / (n_b + 1e-8)."""
    if agg != "seq-mean-token-mean":
        return {}
    n = mask.sum(-1, keepdim=True).double()
    return {"weights": (n / (n + 1e-8)).expand(mask.shape)}


def _rpg(fn, logp, old, adv, mask, **kw):
    out = fn(logp, old, adv, mask, **kw)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return out.loss, grad


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eps", [(0.4, 0.4), (0.2, 0.3), (0.1, 0.05)])
def test_gmpo_equals_verls_geo_mean(eps):
    pytest.importorskip("verl")
    logp, old, adv, mask = _batch(1)
    config = _verl_config(clip_ratio_low=eps[0], clip_ratio_high=eps[1])
    want, g_want = _verl("geo_mean", logp, old, adv, mask, config, mask_scale=1e8)
    got, g_got = _rpg(rpg.GMPOLoss(*eps), logp, old, adv, mask)
    w = (logp - old).exp()
    assert ((w > 1.1) & mask).any() and ((w < 0.9) & mask).any()  # both bounds bind somewhere
    _close(got, want)
    _close(g_got, g_want)
    guarded, g_guarded = _verl("geo_mean", logp, old, adv, mask, config)  # verl's own 1e-8 guard: within it
    torch.testing.assert_close(got, guarded, rtol=0, atol=1e-8 * adv.abs().max().item() * 2)
    torch.testing.assert_close(g_got, g_guarded, rtol=0, atol=1e-8 * adv.abs().max().item() * 2)


def test_gmpo_verls_default_clip_and_rollout_weights():
    """verl's generic clip_ratio (0.2) in log space; its rollout weights enter as each sequence's geometric
    mean, which rpg reproduces by passing that mean as every token's weight (the adapter does this)."""
    pytest.importorskip("verl")
    logp, old, adv, mask = _batch(2)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    want, g_want = _verl("geo_mean", logp, old, adv, mask, _verl_config(), weights=weights, mask_scale=1e8)
    log_w = torch.where(mask, torch.log(weights + 1e-10), 0).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
    seq_w = log_w.exp().expand(B, T)
    got, g_got = _rpg(rpg.GMPOLoss(0.2, 0.2), logp, old, adv, mask, weights=seq_w)
    _close(got, want)
    _close(g_got, g_want)


def test_gmpo_verl_counts_an_empty_row():
    """verl's geo_mean averages over all B rows; rpg over rows with a token unless told B."""
    pytest.importorskip("verl")
    logp, old, adv, mask = _batch(3)
    mask = mask.clone()
    mask[4] = False
    want, g_want = _verl(
        "geo_mean", logp, old, adv, mask, _verl_config(clip_ratio_low=0.4, clip_ratio_high=0.4), mask_scale=1e8
    )
    got, g_got = _rpg(rpg.GMPOLoss(), logp, old, adv, mask, global_batch_size=B)
    _close(got, want)
    _close(g_got, g_want)
    local, _ = _rpg(rpg.GMPOLoss(), logp, old, adv, mask)
    _close(local * (B - 1) / B, want)


def test_registered_rpg_gmpo_equals_geo_mean():
    pytest.importorskip("verl")
    from rpg.integrations import verl as rpg_verl  # noqa: F401  (registers the losses)

    logp, old, adv, mask = _batch(4)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.5
    config = _verl_config(clip_ratio_low=0.3, clip_ratio_high=0.4)
    want, g_want = _verl("geo_mean", logp, old, adv, mask, config, weights=weights, mask_scale=1e8)
    got, g_got = _verl("rpg_gmpo", logp, old, adv, mask, config, weights=weights, mask_scale=1e8)
    _close(got, want)
    _close(g_got, g_want)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_cov_equals_verls_clip_cov(agg, seed):
    pytest.importorskip("verl")
    logp, old, adv, mask = _batch(10 + seed, adv_scale=3.0)
    # a large fraction and a low band, so the draw picks a proper random subset of many candidates
    policy = dict(loss_mode="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=-2.0, clip_cov_ub=5.0)
    config = _verl_config(clip_ratio=0.2, policy_loss=policy)
    torch.manual_seed(seed)
    want, g_want = _verl("clip_cov", logp, old, adv, mask, config, agg)
    fn = rpg.ClipCovLoss(rpg.Clip(0.2, 0.2, dual=None), fraction=0.1, low=-2.0, high=5.0, agg=agg)
    cov = rpg.selection.covariance(logp.detach(), adv[:, None], mask)
    candidates = int(((cov > -2.0) & (cov < 5.0)).sum())
    assert candidates > rpg.selection.count(0.1, mask) > 1  # a random subset, not all
    got, g_got = _rpg(fn, logp, old, adv, mask, generator=torch.Generator().manual_seed(seed), **_guard(mask, agg))
    _close(got, want)
    _close(g_got, g_want)
    others = [_rpg(fn, logp, old, adv, mask, generator=torch.Generator().manual_seed(s))[0] for s in range(50, 55)]
    assert max((o - got).abs() for o in others) > 1e-6  # other seeds drop other tokens


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("fraction", [0.0002, 0.1, 0.3])
def test_kl_cov_equals_verls_kl_cov(agg, fraction):
    pytest.importorskip("verl")
    logp, old, adv, mask = _batch(20)
    policy = dict(loss_mode="kl_cov", kl_cov_ratio=fraction, ppo_kl_coef=0.7)
    want, g_want = _verl("kl_cov", logp, old, adv, mask, _verl_config(policy_loss=policy), agg)
    got, g_got = _rpg(rpg.KLCovLoss(fraction, 0.7, agg=agg), logp, old, adv, mask, **_guard(mask, agg))
    _close(got, want)
    _close(g_got, g_want)


@pytest.mark.parametrize("mode", ["rpg_clip_cov", "rpg_kl_cov"])
def test_registered_cov_losses_equal_verls(mode):
    pytest.importorskip("verl")
    from rpg.integrations import verl as rpg_verl  # noqa: F401

    logp, old, adv, mask = _batch(30, adv_scale=3.0)
    policy = dict(loss_mode=mode[4:], clip_cov_ratio=0.1, clip_cov_lb=0.2, kl_cov_ratio=0.1, ppo_kl_coef=0.5)
    config = _verl_config(policy_loss=policy)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.5
    torch.manual_seed(3)
    want, g_want = _verl(mode[4:], logp, old, adv, mask, config, weights=weights)
    torch.manual_seed(3)
    got, g_got = _verl(mode, logp, old, adv, mask, config, weights=weights)
    _close(got, want)
    _close(g_got, g_want)


# --- TRL: VESPO -------------------------------------------------------------------------------


def _trl_vespo(args, logits, ids, inputs, vllm=False):
    from trl import GRPOTrainer

    s = types.SimpleNamespace(args=args, loss_type="vespo", beta=args.beta)
    s.epsilon_low, s.epsilon_high = args.epsilon, args.epsilon
    s.importance_sampling_level = args.importance_sampling_level
    s.top_entropy_quantile, s.off_policy_mask_threshold = 1.0, None
    s.use_vllm, s.vllm_importance_sampling_correction = vllm, vllm
    s._entropy_bonus_enabled = False
    s.aux_loss_enabled = False
    s.model = types.SimpleNamespace(training=True)
    s.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    s.accelerator = types.SimpleNamespace(
        num_processes=1,
        gather=lambda x: x.reshape(-1) if x.dim() == 0 else x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
    )
    s._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    s.get_gamma_weights = GRPOTrainer.get_gamma_weights

    def logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **kw):
        lsm = torch.log_softmax(logits, -1)
        ent = -(lsm.exp() * lsm).sum(-1) if compute_entropy else None
        return lsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1), ent, None

    s._get_per_token_logps_and_entropies = logps
    return GRPOTrainer._compute_loss(s, None, dict(inputs))


VLLM = {
    "none": ({}, None),
    "token_truncate": (
        {"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": 1.5},
        rpg.RolloutCorrection(upper=1.5),
    ),
    "token_mask": (
        {
            "vllm_importance_sampling_mode": "token_mask",
            "vllm_importance_sampling_clip_min": 0.7,
            "vllm_importance_sampling_clip_max": 1.4,
        },
        rpg.RolloutCorrection(mode="mask", lower=0.7, upper=1.4),
    ),
}


def _trl_is_ratio(args, old, mu, mask):
    """TRL's token-level vLLM importance-sampling ratio, as _generate_and_score_completions computes it."""
    rho = torch.exp((old - mu) * mask)
    lo, hi = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    if args.vllm_importance_sampling_mode == "token_truncate":
        return torch.clamp(rho, min=lo, max=hi)
    return rho.masked_fill((rho < lo) | (rho > hi), 0.0)


OTHER = {"vespo_k_pos": 1.0, "vespo_lambda_pos": 0.5, "vespo_k_neg": 4.0, "vespo_lambda_neg": 1.5}


@pytest.mark.parametrize(
    "params, vllm",
    # not OTHER with token_mask: TRL clamps a masked token's log 0 to log 1e-8, so its sequence keeps
    # φ ≈ e^λ·1e-8^k — 1.6e-8 at k = 1 — where rpg's is 0 (at TRL's default k ≥ 2 it is below 1e-15)
    [({}, "none"), ({}, "token_truncate"), ({}, "token_mask"), (OTHER, "none"), (OTHER, "token_truncate")],
)
def test_vespo_equals_trls_compute_loss(params, vllm):
    """With vLLM's token-level correction TRL adds Σ_t log ρ̄_t into log W; so does rpg's ratio='product'."""
    pytest.importorskip("trl")
    from trl import GRPOConfig

    trl_vllm, correction = VLLM[vllm]
    args = GRPOConfig(
        output_dir="unused",
        report_to="none",
        use_cpu=True,
        loss_type="vespo",
        max_completion_length=T,
        **params,
        **trl_vllm,
    )
    g = torch.Generator().manual_seed(11)
    v = 5
    logits = torch.randn(B, T, v, dtype=torch.float64, generator=g).requires_grad_(True)
    ids = torch.randint(0, v, (B, T), generator=g)
    lengths = torch.tensor([9, 7, 4, 9, 1, 6])
    cm = (torch.arange(T)[None] < lengths[:, None]).long()
    with torch.no_grad():
        logp0 = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (logp0 + 0.3 * torch.randn(B, T, dtype=torch.float64, generator=g)).clamp(max=0.0)  # log-probs ≤ 0
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.7, -0.1], dtype=torch.float64)
    n_items = (cm.sum() + 5).double()
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": ids,
        "completion_mask": cm,
        "advantages": adv,
        "num_items_in_batch": n_items,
        "old_per_token_logps": old,
    }
    call = {}
    if correction is not None:
        mu = (old + 0.4 * torch.randn(B, T, dtype=torch.float64, generator=g)).clamp(max=0.0)
        inputs["importance_sampling_ratio"] = _trl_is_ratio(args, old, mu, cm)
        call["behavior_logp"] = mu
        assert ((inputs["importance_sampling_ratio"] != torch.exp((old - mu) * cm)) & cm.bool()).any()
    want = _trl_vespo(args, logits, ids, inputs, vllm=correction is not None)
    (g_want,) = torch.autograd.grad(want, logits)
    kw = {k.removeprefix("vespo_"): val for k, val in params.items()}
    fn = rpg.VESPOLoss(**kw, correction=correction)
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    got = fn(logp, old, adv, cm.bool(), batch_num_tokens=n_items, **call).loss
    (g_got,) = torch.autograd.grad(got, logits)
    w_seq = torch.where(cm.bool(), logp0 - old, 0).sum(-1).exp()
    assert (w_seq > 1.05).any() and (w_seq < 0.95).any()  # off-policy both ways
    assert g_want.abs().max() > 0
    _close(got, want)
    _close(g_got, g_want)


def _verl_metrics_of_both(mode, ours, logp, old, adv, mask, config):
    """``(theirs, ours)``: the ``actor/*`` metrics (rpg's own ``actor/rpg/*`` left out) of verl's registered
    ``mode`` and of rpg's registered ``ours`` on the same inputs (each after ``torch.manual_seed(3)``), checked
    to have the same keys and values (verl's masked_mean divides by Σ mask + 1e-8)."""
    pytest.importorskip("verl")
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from rpg.integrations import verl as rpg_verl  # noqa: F401  (registers the losses)

    got = []
    for name in (mode, ours):
        torch.manual_seed(3)
        _, metrics = get_policy_loss_fn(name)(
            old_log_prob=old,
            log_prob=logp,
            advantages=adv[:, None].expand(B, T),
            response_mask=mask.double(),
            config=config,
        )
        got.append({k: v for k, v in metrics.items() if not k.startswith("actor/rpg/")})
    theirs, mine = got
    assert theirs.keys() == mine.keys()
    for key in theirs:
        assert mine[key] == pytest.approx(theirs[key], rel=1e-8, abs=1e-12), key
    return theirs, mine


@pytest.mark.parametrize("mode", ["geo_mean", "kl_cov", "clip_cov"])
def test_registered_family_metrics_are_verls(mode):
    """The ``actor/*`` metrics rpg_gmpo / rpg_kl_cov / rpg_clip_cov log carry verl's geo_mean / kl_cov /
    clip_cov definitions (geo_mean's clip fractions by the sign of A, kl_cov's mean |log w|, clip_cov's
    share of dropped tokens): the same keys and values on the same inputs (clip_cov: the same seed)."""
    logp, old, adv, mask = _batch(30, adv_scale=3.0)
    policy = dict(loss_mode=mode, kl_cov_ratio=0.1, ppo_kl_coef=0.5, clip_cov_ratio=0.1, clip_cov_lb=0.2)
    config = _verl_config(policy_loss=policy, clip_ratio_low=0.3, clip_ratio_high=0.25)
    ours = {"geo_mean": "rpg_gmpo", "kl_cov": "rpg_kl_cov", "clip_cov": "rpg_clip_cov"}[mode]
    theirs, _ = _verl_metrics_of_both(mode, ours, logp, old, adv, mask, config)
    if mode != "kl_cov":
        assert 0 < theirs["actor/pg_clipfrac"]  # tokens are clipped / dropped here
    if mode == "geo_mean":
        assert 0 < theirs["actor/pg_clipfrac_lower"]


@pytest.mark.parametrize("mode", ["sapo", "dro", "dppo_tv", "dppo_kl"])
def test_registered_token_mode_metrics_are_verls(mode):
    """rpg_sapo / rpg_dro / rpg_dppo_* log the ``actor/*`` keys and values of the verl loss they mirror: verl's
    ``sapo`` and ``dppo_*`` take ``ppo_kl`` of log w clamped to [−20, 20] (a batch with |log w| > 20 here, as
    after a policy moved far from a stale π_old), verl's ``dro`` logs ``ppo_kl`` alone (it has no clip)."""
    logp, old, adv, mask = _batch(30, adv_scale=3.0)
    logp, old = logp.detach().clone(), old.clone()
    old[0, 0], logp[0, 0] = -25.0, -1.0  # log w = 24
    old[1, 1], logp[1, 1] = -0.5, -22.0  # log w = -21.5
    logp.requires_grad_(True)
    config = _verl_config(policy_loss=dict(loss_mode=mode, dro_beta=0.3), clip_ratio_low=0.3, clip_ratio_high=0.25)
    _verl_metrics_of_both(mode, f"rpg_{mode}", logp, old, adv, mask, config)
