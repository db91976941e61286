"""rpg.integrations.nemo_rl against NeMo-RL's documented LossFunction interface.

NeMo-RL does not install from the package index, so its interface is re-stated here from NVIDIA-NeMo/RL at commit
7ea279abfbeb698b092856d0dab61e7cf39bc909: the call ``loss_fn(next_token_logprobs, data, global_valid_seqs,
global_valid_toks) -> (loss, metrics)`` (nemo_rl/algorithms/loss/interfaces.py); the data keys ``advantages``,
``prev_logprobs``, ``generation_logprobs``, ``reference_policy_logprobs``, ``token_mask``, ``sample_mask``
(``[B, T]``, read as ``[:, 1:]``), the mask ``token_mask[:, 1:] * sample_mask[:, None]``, the TOKEN_LEVEL and
SEQUENCE_LEVEL reductions and the PPO / dual-clip / truncated-IS actor loss of ``ClippedPGLossFn``
(nemo_rl/algorithms/loss/loss_functions.py), and ``masked_mean`` with its global normalisation factor and
``+ 1e-8`` (nemo_rl/algorithms/utils.py)."""

import pytest
import torch

import rpg
from rpg.integrations.nemo_rl import RPGLossFn

from ..conftest import make_batch

TOL = dict(rtol=1e-10, atol=1e-12)
LOW, HIGH, DUAL = 0.2, 0.28, 3.0


def masked_mean(values, mask, dim=None, global_normalization_factor=None, eps=1e-8):
    """NeMo-RL's masked_mean; ``eps`` is its 1e-8 (0 here: the exact global normalisation)."""
    factor = torch.sum(mask, dim=dim) if global_normalization_factor is None else global_normalization_factor
    return torch.sum(values * mask, dim=dim) / (factor + eps)


def clipped_pg_loss(logp, data, seqs, toks, level, tis=None, eps=1e-8):
    """ClippedPGLossFn's actor loss with beta = 0 (ratio_clip_min/max = LOW/HIGH, ratio_clip_c = DUAL)."""
    token_mask, sample_mask = data["token_mask"][:, 1:], data["sample_mask"]
    adv, prev, gen = data["advantages"][:, 1:], data["prev_logprobs"][:, 1:], data["generation_logprobs"][:, 1:]
    mask = token_mask * sample_mask.unsqueeze(-1)
    ratios = (logp - prev).exp()
    clip_loss = torch.max(-adv * ratios, -adv * ratios.clamp(1 - LOW, 1 + HIGH))
    clip_loss = torch.where(adv < 0, torch.min(clip_loss, -adv * DUAL), clip_loss)
    weight = torch.ones_like(prev)
    if tis is not None:  # use_importance_sampling_correction + truncated_importance_sampling_type="tis"
        weight = torch.exp(prev - gen).clamp(min=0.0, max=tis)
    if level == "token_level":
        return masked_mean(weight * clip_loss, mask, global_normalization_factor=toks, eps=eps)
    inner = masked_mean(weight * clip_loss, token_mask, dim=-1, eps=eps)
    return masked_mean(inner, sample_mask, global_normalization_factor=seqs, eps=eps)


def _data(b=6, t=9, seed=0):
    logp, prev, _, token_mask, ref = make_batch(b, t, seed=seed, spread=0.4, adv_shape="tok")
    g = torch.Generator().manual_seed(seed + 5)
    pad = lambda x: torch.cat([torch.zeros(b, 1, dtype=x.dtype), x], dim=1)  # noqa: E731  (aligned with input_ids)
    sample_mask = torch.ones(b, dtype=prev.dtype)
    sample_mask[2] = 0.0  # a sample the trainer excluded
    data = {
        "advantages": pad(torch.randn(b, t, generator=g, dtype=prev.dtype)),
        "prev_logprobs": pad(prev),
        "generation_logprobs": pad(prev + 0.3 * torch.randn(b, t, generator=g, dtype=prev.dtype)),
        "reference_policy_logprobs": pad(ref),
        "token_mask": pad(token_mask.to(prev.dtype)),
        "sample_mask": sample_mask,
    }
    mask = (data["token_mask"][:, 1:] * sample_mask[:, None]) != 0
    return logp.detach(), data, mask


def _rows(data, rows):
    return {k: v[rows] for k, v in data.items()}


def _grad(f, logp):
    x = logp.detach().clone().requires_grad_(True)
    value = f(x)
    (g,) = torch.autograd.grad(value, x)
    return value.detach(), g


def _micro_sum(loss_fn, logp, data, seqs, toks, micro):
    def f(x):
        total = 0.0
        for s in range(0, logp.shape[0], micro):
            rows = slice(s, s + micro)
            total = total + loss_fn(x[rows], _rows(data, rows), seqs, toks)[0]
        return total

    return _grad(f, logp)


@pytest.mark.parametrize("agg, level", [("token-mean", "token_level"), ("seq-mean-token-mean", "sequence_level")])
@pytest.mark.parametrize("micro", [1, 2, 6])
@pytest.mark.parametrize("tis", [None, 1.5])
def test_beta0_is_clipped_pg_loss_with_global_normalisation(agg, level, micro, tis):
    logp, data, mask = _data()
    toks, seqs = mask.sum().to(logp.dtype), (mask.sum(-1) > 0).sum().to(logp.dtype)
    correction = None if tis is None else rpg.RolloutCorrection("token", "truncate", upper=tis)
    fn = RPGLossFn(rpg.PolicyLoss(clip=rpg.Clip(LOW, HIGH, dual=DUAL), agg=agg, correction=correction))
    assert fn.loss_type == level and fn.input_type == "logprob"
    ours = _micro_sum(fn, logp, data, seqs, toks, micro)
    theirs = _micro_sum(
        lambda x, d, s, t: (clipped_pg_loss(x, d, s, t, level, tis, eps=0.0), {}), logp, data, seqs, toks, micro
    )
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    torch.testing.assert_close(ours[1], theirs[1], **TOL)
    # with NeMo-RL's own +1e-8 in every denominator: relative differences of 1e-8/count per division
    with_eps = _micro_sum(
        lambda x, d, s, t: (clipped_pg_loss(x, d, s, t, level, tis), {}), logp, data, seqs, toks, micro
    )
    rel = ((ours[1] - with_eps[1]).abs().max() / with_eps[1].abs().max()).item()
    n_min = int(mask.sum(-1)[mask.sum(-1) > 0].min())
    bound = 1e-8 / float(toks) if level == "token_level" else 1e-8 * (1 / n_min + 1 / float(seqs))
    assert 0 < rel < 1.001 * bound  # token level: rel = 1e-8/N itself


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("divergence", rpg.DIVERGENCES)
def test_four_streams_and_global_counts_give_the_batch_loss(agg, divergence):
    """Micro-batches summed = rpg's loss on the whole batch with the reference model's log-probs."""
    logp, data, mask = _data(seed=4)
    toks, seqs = mask.sum().to(logp.dtype), (mask.sum(-1) > 0).sum().to(logp.dtype)
    loss = rpg.RPGLoss(divergence, style="reinforce", beta=0.1, agg=agg)
    ours = _micro_sum(RPGLossFn(loss, reference="model"), logp, data, seqs, toks, 2)
    ref = data["reference_policy_logprobs"][:, 1:]
    adv, prev = data["advantages"][:, 1:], data["prev_logprobs"][:, 1:]
    expected = _grad(lambda x: loss(x, prev, adv, mask, ref_logp=ref).loss, logp)
    torch.testing.assert_close(ours[0], expected[0], **TOL)
    torch.testing.assert_close(ours[1], expected[1], **TOL)
    old_ref = _micro_sum(RPGLossFn(loss), logp, data, seqs, toks, 2)  # reference="old": pi_ref = pi_old
    assert not torch.allclose(old_ref[1], expected[1])


def test_metrics_sum_to_batch_means_and_refusals():
    logp, data, mask = _data(seed=6)
    toks, seqs = mask.sum().to(logp.dtype), (mask.sum(-1) > 0).sum().to(logp.dtype)
    fn = RPGLossFn(rpg.RPGLoss("rkl", beta=0.05))
    parts = [fn(logp[r], _rows(data, r), seqs, toks)[1] for r in (slice(0, 3), slice(3, 6))]
    full = rpg.RPGLoss("rkl", beta=0.05)(logp, data["prev_logprobs"][:, 1:], data["advantages"][:, 1:], mask).metrics
    assert parts[0]["rpg/ratio/mean"] + parts[1]["rpg/ratio/mean"] == pytest.approx(full["ratio/mean"], rel=1e-12)
    assert parts[0]["num_valid_samples"] + parts[1]["num_valid_samples"] == 5
    assert set(fn.metric_normalizations) >= {"loss", "num_valid_samples", "rpg/ratio/mean"}
    with pytest.raises(ValueError, match="agg"):
        RPGLossFn(rpg.RPGLoss("rkl", agg="token-sum"))
    with pytest.raises(ValueError, match="reference"):
        RPGLossFn(rpg.RPGLoss("rkl"), reference="frozen")
    with pytest.raises(TypeError, match="PolicyLoss"):
        RPGLossFn("rkl")
    no_ref = {k: v for k, v in data.items() if k != "reference_policy_logprobs"}
    with pytest.raises(ValueError, match="reference_policy_logprobs"):
        RPGLossFn(rpg.RPGLoss("rkl", beta=0.1), reference="model")(logp, no_ref, seqs, toks)
