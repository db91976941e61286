"""rpg.integrations.prime_rl against prime-rl's documented custom-loss interface.

prime-rl does not install from the package index, so the interface is re-stated here from
PrimeIntellect-ai/prime-rl, src/prime_rl/trainer/rl/loss.py at commit 559b44772e471d1538537b8805cc77f3824a5e64:
``LossInputs(trainer_logprobs, inference_logprobs, ref_logprobs | None, advantages, loss_mask, loss_weights)``,
one sample at a time, and ``compute_loss``'s reduction for the rl component: a sample with a weight stream
runs on ``loss_mask & (rl_weights != 0)`` (and is skipped when that is empty), the sample losses are summed
and divided by ``rl_scale``, the global count of rl tokens. ``default_loss_fn`` (DPPO-Binary-TV + the
squared log-ratio KL) is re-stated from the same file."""

from dataclasses import dataclass

import pytest
import torch

import rpg
from rpg.integrations import prime_rl

from ..conftest import make_batch

TOL = dict(rtol=1e-10, atol=1e-12)


@dataclass
class LossInputs:  # prime-rl's field names and order
    trainer_logprobs: torch.Tensor
    inference_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    loss_weights: torch.Tensor | None = None


def compute_loss(trainer, inference, ref, advantages, loss_mask, rl_weights, loss_fn, rl_scale):
    """prime-rl's compute_loss, rl component only: per-sample calls, sum, / rl_scale."""
    total = trainer[0].sum() * 0.0
    for i in range(len(trainer)):
        w = None if rl_weights is None else rl_weights[i]
        mask = loss_mask[i] if w is None else loss_mask[i] & (w != 0)
        if w is not None and not bool(mask.any()):
            continue
        inputs = LossInputs(trainer[i], inference[i], None if ref is None else ref[i], advantages[i], mask, w)
        total = total + loss_fn(inputs).loss
    return total / rl_scale


def default_loss_fn(inputs, dppo_mask_low, dppo_mask_high, adv_tau, kl_tau):
    """prime-rl's default_loss_fn (loss only)."""
    log_ratio = inputs.trainer_logprobs - inputs.inference_logprobs
    ratio = torch.exp(log_ratio)
    diff = torch.exp(inputs.trainer_logprobs) - torch.exp(inputs.inference_logprobs)
    invalid = torch.where(inputs.advantages > 0, diff > dppo_mask_high, diff < -dppo_mask_low)
    keep = inputs.loss_mask & ~invalid
    per_token = -(keep * adv_tau * inputs.advantages * ratio) + kl_tau * (inputs.loss_mask * log_ratio**2)
    if inputs.loss_weights is not None:
        per_token = per_token * inputs.loss_weights
    return prime_rl.LossOutputs(per_token.sum(), {})


def _data(seed=0, weights=True):
    logp, old, _, mask, ref = make_batch(5, 8, seed=seed, spread=0.4, adv_shape="tok")
    logp = logp.detach().clamp(max=-1e-3)
    g = torch.Generator().manual_seed(seed + 7)
    adv = torch.randn(logp.shape, generator=g, dtype=logp.dtype)
    w = torch.rand(logp.shape, generator=g, dtype=logp.dtype) if weights else None
    if w is not None:
        w[1, 2] = 0.0  # a zero weight drops the token from the rl mask and the count
        w[4] = 0.0  # and a sample with no rl token is skipped
    return logp, old, ref, adv, mask, w


def _grad(f, logp):
    x = logp.detach().clone().requires_grad_(True)
    value = f(x)
    (g,) = torch.autograd.grad(value, x)
    return value.detach(), g


CONFIGS = [
    dict(divergence="urkl", style="reinforce", beta=0.1, clip="ppo", clip_low=0.2, clip_high=0.28, clip_dual=3.0),
    dict(divergence="fkl", beta=0.05, clip="ppo", clip_low=0.2, clip_high=0.28, clip_dual=3.0),
    dict(divergence="rkl", style="reinforce", beta=0.2, clip="truncate", clip_low=0.3, clip_high=0.5),
    dict(clip="trust_region", style="reinforce", clip_low=0.1, clip_high=0.1),
    dict(divergence="ufkl", beta=0.1, reference="model"),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("weights", [False, True])
def test_sample_sums_over_global_count_are_rpg_token_mean(kwargs, weights):
    logp, inference, ref, adv, mask, w = _data(weights=weights)
    rl_mask = mask if w is None else mask & (w != 0)
    rl_scale = int(rl_mask.sum())
    fn = lambda inputs: prime_rl.rpg_loss(inputs, **kwargs)  # noqa: E731  (prime-rl's kwargs binding)
    got = _grad(lambda x: compute_loss(x, inference, ref, adv, mask, w, fn, rl_scale), logp)

    loss = prime_rl.loss_from_kwargs(**kwargs).replace(agg="token-mean")
    ref_logp = ref if kwargs.get("reference") == "model" else None
    full = lambda x: loss(x, inference, adv, rl_mask, ref_logp=ref_logp, batch_num_tokens=rl_scale, weights=w).loss  # noqa: E731
    expected = _grad(full, logp)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1], expected[1], **TOL)
    assert got[1].abs().sum() > 0


def test_default_dppo_kl_loss_gradient():
    """prime-rl's default loss is rpg's trust region (anchored on the engine) plus beta·k2 with beta = 2·kl_tau,
    pi_ref = mu: the same gradient. Its value keeps a masked token at the region's edge (rpg) instead of 0."""
    logp, inference, _, adv, mask, w = _data(seed=3)
    rl_mask = mask & (w != 0)
    rl_scale = int(rl_mask.sum())
    low, high, kl_tau = 0.08, 0.12, 0.01
    theirs = _grad(
        lambda x: compute_loss(
            x, inference, None, adv, mask, w, lambda i: default_loss_fn(i, low, high, 1.0, kl_tau), rl_scale
        ),
        logp,
    )
    kw = dict(kl="k2", beta=2 * kl_tau, clip="trust_region", clip_low=low, clip_high=high)
    ours = _grad(
        lambda x: compute_loss(x, inference, None, adv, mask, w, lambda i: prime_rl.rpg_loss(i, **kw), rl_scale),
        logp,
    )
    torch.testing.assert_close(ours[1], theirs[1], **TOL)
    masked = torch.where(adv > 0, logp.exp() - inference.exp() > high, logp.exp() - inference.exp() < -low)
    assert bool((masked & rl_mask).any()) and bool((~masked & rl_mask).any())  # both kinds of tokens present


def test_metrics_and_refusals():
    logp, inference, _, adv, mask, _ = _data(weights=False)
    inputs = LossInputs(logp[0], inference[0], None, adv[0], mask[0])
    out = prime_rl.rpg_loss(inputs, divergence="rkl", beta=0.1, metrics=True)
    assert set(out.metrics) >= {"rpg/ratio/mean", "rpg/clip_frac"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.metrics.values())
    assert prime_rl.rpg_loss(inputs, divergence="rkl", beta=0.1).metrics == {}
    with pytest.raises(ValueError, match="ref_logprobs"):
        prime_rl.rpg_loss(inputs, divergence="rkl", beta=0.1, reference="model")
    with pytest.raises(ValueError, match="token-mean"):
        prime_rl.rpg_loss(inputs, agg="seq-mean-token-mean")
    with pytest.raises(TypeError, match="unknown"):
        prime_rl.rpg_loss(inputs, clip_ratio=0.2)
    with pytest.raises(ValueError, match="clip must be"):
        prime_rl.rpg_loss(inputs, clip="dual")
    with pytest.raises(ValueError, match="1-D"):
        prime_rl.rpg_loss(LossInputs(logp, inference, None, adv, mask))
    assert prime_rl.loss_from_kwargs(divergence="urkl", beta=0.1) == rpg.PolicyLoss(
        kl="urkl", beta=0.1, agg="token-sum"
    )
