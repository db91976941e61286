"""Per-token weights and the entropy bonus: value and gradient against plain autograd, shard
invariance with global counts, detachment, padding, and the errors."""

import pytest
import torch

import rpg

from . import reference
from .conftest import F64, make_batch

AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _plain_agg(per_token, mask, agg):
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    n_b = mask.sum(-1)
    seqs = (n_b > 0).sum()
    return {
        "token-mean": per_token.sum() / mask.sum(),
        "token-sum": per_token.sum(),
        "seq-mean-token-mean": (per_token.sum(-1) / n_b.clamp_min(1)).sum() / seqs,
        "seq-mean-token-sum": per_token.sum() / seqs,
        "seq-mean-token-sum-norm": per_token.sum() / (seqs * mask.shape[-1]),
    }[agg]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
def test_weights_and_entropy_against_plain_autograd(agg, style):
    logp, old, adv, mask, ref = make_batch(4, 6, seed=21, ref=True)
    g = torch.Generator().manual_seed(5)
    weights = torch.rand(4, 6, generator=g, dtype=F64) * 2
    weights[~mask] = float("nan")  # padding is inert
    entropy = (torch.rand(4, 6, generator=g, dtype=F64) * 3).requires_grad_(True)
    coef = 0.07
    clip = rpg.Clip(0.2, 0.28, 3.0)
    fn = rpg.PolicyLoss(kl="rkl", beta=0.3, style=style, clip=clip, agg=agg, entropy_coef=coef)
    out = fn(logp, old, adv, mask, ref_logp=ref, weights=weights, entropy=entropy)
    plain = reference.per_token(logp, old, adv, mask, kl="rkl", beta=0.3, style=style, clip=clip, ref_logp=ref)
    w = torch.where(mask, weights, torch.zeros_like(weights))
    want_tok = w * plain - coef * torch.where(mask, entropy, torch.zeros_like(entropy))
    want_tok = torch.where(mask, want_tok, torch.zeros_like(want_tok))
    want = _plain_agg(want_tok, mask, agg)
    torch.testing.assert_close(out.per_token, want_tok, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-12)
    got = torch.autograd.grad(out.loss, [logp, entropy])
    exp = torch.autograd.grad(want, [logp, entropy])
    for a, b in zip(got, exp, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert out.metrics["entropy/mean"] == pytest.approx(entropy[mask].mean().item())


def test_weights_never_receive_gradient():
    logp, old, adv, mask, _ = make_batch(3, 4, seed=22)
    weights = torch.rand(3, 4, dtype=F64, requires_grad=True)
    out = rpg.RPGLoss("urkl", beta=0.1)(logp, old, adv, mask, weights=weights)
    out.loss.backward()
    assert weights.grad is None and logp.grad is not None


def test_a_zero_weight_gives_exactly_zero_even_where_the_loss_is_not_finite():
    """float32, log w = 100: w overflows and −w·A + β·w·log ρ is ∞ − ∞; a weight of 0 there gives 0, not NaN."""
    old = torch.tensor([[-101.0, -1.0]])  # log-probs (<= 0) with log w = 100, 0
    logp = (old + torch.tensor([[100.0, 0.0]])).requires_grad_(True)
    weights = torch.tensor([[0.0, 1.0]])
    fn = rpg.RPGLoss("rkl", beta=0.5, clip=None)
    assert not torch.isfinite(fn(logp, old, torch.ones(1)).per_token[0, 0])  # the case is real
    out = fn(logp, old, torch.ones(1), weights=weights)
    assert out.per_token[0, 0].item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()


@pytest.mark.parametrize("agg", AGGS)
def test_shards_with_global_counts_sum_to_the_full_batch(agg):
    logp, old, adv, mask, ref = make_batch(6, 5, seed=23, ref=True)
    g = torch.Generator().manual_seed(6)
    weights = torch.rand(6, 5, generator=g, dtype=F64)
    entropy = torch.rand(6, 5, generator=g, dtype=F64).requires_grad_(True)
    beh = (old + 0.2 * torch.randn(6, 5, generator=g, dtype=F64)).clamp(max=0)
    fn = rpg.RPGLoss("rkl", beta=0.2, agg=agg, entropy_coef=0.05)
    kw = lambda s: dict(ref_logp=ref[s], behavior_logp=beh[s], weights=weights[s], entropy=entropy[s])  # noqa: E731
    full = fn(logp, old, adv, mask, **kw(slice(None)))
    counts = dict(batch_num_tokens=int(mask.sum()), global_batch_size=int((mask.sum(-1) > 0).sum()))
    parts = [fn(logp[s], old[s], adv[s], mask[s], **kw(s), **counts) for s in (slice(0, 2), slice(2, 6))]
    total = parts[0].loss + parts[1].loss
    torch.testing.assert_close(total, full.loss, rtol=0, atol=1e-13)
    ga = torch.autograd.grad(full.loss, [logp, entropy])
    gb = torch.autograd.grad(total, [logp, entropy])
    for a, b in zip(ga, gb, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_entropy_errors():
    logp, old, adv, mask, _ = make_batch(3, 4, seed=24)
    with pytest.raises(ValueError, match="entropy="):
        rpg.DAPOLoss(entropy_coef=0.01)(logp, old, adv, mask)
    with pytest.raises(ValueError, match="entropy_coef"):
        rpg.DAPOLoss(entropy_coef=-0.1)
    with pytest.raises(ValueError, match="entropy"):
        rpg.DAPOLoss(entropy_coef=0.01)(logp, old, adv, mask, entropy=torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="weights"):
        rpg.DAPOLoss()(logp, old, adv, mask, weights=torch.ones(3, 5, dtype=F64))
    with pytest.raises(TypeError, match="weights"):
        rpg.DAPOLoss()(logp, old, adv, mask, weights=torch.ones(3, 4, dtype=torch.bool))
    # entropy without a coefficient is reported, not added
    out = rpg.DAPOLoss()(logp, old, adv, mask, entropy=torch.ones(3, 4, dtype=F64))
    base = rpg.DAPOLoss()(logp, old, adv, mask)
    assert out.metrics["entropy/mean"] == 1.0 and torch.equal(out.loss, base.loss)


def test_advantages_of_shape_b_by_one_equal_b():
    logp, old, adv, mask, _ = make_batch(3, 4, seed=25)
    fn = rpg.RPGLoss("rkl", beta=0.1)
    torch.testing.assert_close(
        fn(logp, old, adv[:, None], mask).per_token, fn(logp, old, adv, mask).per_token, rtol=0, atol=0
    )
