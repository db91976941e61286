"""rpg.aggregation: hand-computed values, shard-sum = full batch, masking, errors."""

import pytest
import torch

import rpg
from rpg.aggregation import AGG_MODES, aggregate

from .conftest import F64, make_batch

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "agg,want",
    [
        ("token-mean", 10 / 4),
        ("token-sum", 10.0),
        ("seq-mean-token-mean", (6 / 3 + 4 / 1) / 2),  # the empty third row does not count
        ("seq-mean-token-sum", 10 / 2),
        ("seq-mean-token-sum-norm", 10 / (2 * 4)),
    ],
)
def test_values_by_hand(agg, want):
    assert aggregate(PER_TOKEN, MASK, agg).item() == pytest.approx(want, rel=1e-15)


def test_global_counts_replace_local_ones():
    assert aggregate(PER_TOKEN, MASK, "token-mean", batch_num_tokens=20).item() == pytest.approx(0.5)
    assert aggregate(PER_TOKEN, MASK, "seq-mean-token-sum", global_batch_size=5).item() == pytest.approx(2.0)
    assert aggregate(PER_TOKEN, MASK, "seq-mean-token-sum-norm", global_batch_size=5, max_len=10).item() == (
        pytest.approx(0.2)
    )
    assert aggregate(PER_TOKEN, MASK, "token-mean", batch_num_tokens=torch.tensor(20)).item() == pytest.approx(0.5)
    # token-sum ignores counts
    assert aggregate(PER_TOKEN, MASK, "token-sum", batch_num_tokens=20, global_batch_size=5).item() == 10.0


def test_masked_nan_does_not_leak():
    x = PER_TOKEN.clone().requires_grad_(True)
    for agg in AGG_MODES:
        loss = aggregate(torch.where(MASK, x, torch.full_like(x, float("nan"))), MASK, agg)
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[~MASK] == 0).all()


@pytest.mark.parametrize("agg", AGG_MODES)
def test_all_masked_gives_zero_and_zero_gradient(agg):
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    loss = aggregate(x, torch.zeros(3, 4, dtype=torch.bool), agg)
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and (g == 0).all()


def _split(x, sizes):
    return None if x is None else torch.split(x, sizes)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("style", rpg.STYLES)
@pytest.mark.parametrize("sizes", [(2, 4), (1, 2, 3), (3, 3)])
def test_shards_sum_to_the_full_batch(agg, style, sizes):
    """Micro-batches / DP shards with the full batch's counts sum to the full-batch loss and gradient."""
    logp, old, adv, mask, ref = make_batch(6, 5, seed=2)
    mask[4] = False  # an empty sequence in one shard: it must not count in S anywhere
    fn = rpg.RPGLoss("urkl", style=style, beta=0.2, agg=agg, max_len=8)
    full = fn(logp, old, adv, mask, ref_logp=ref).loss
    (g_full,) = torch.autograd.grad(full, logp)
    n_tok, n_seq = mask.sum(), (mask.sum(-1) > 0).sum()
    total = 0
    for parts in zip(*(_split(x, list(sizes)) for x in (logp, old, adv, mask, ref)), strict=False):
        total = total + fn(*parts[:4], ref_logp=parts[4], batch_num_tokens=n_tok, global_batch_size=n_seq).loss
    (g_shards,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_shards, g_full, rtol=0, atol=1e-12)


def test_local_counts_are_not_invariant():
    """Without global counts, token-mean of shards is a different loss (the test above can fail)."""
    logp, old, adv, mask, ref = make_batch(6, 5, seed=2)
    fn = rpg.RPGLoss("urkl", beta=0.2, agg="token-mean")
    full = fn(logp, old, adv, mask, ref_logp=ref).loss
    halves = sum(
        fn(*p[:4], ref_logp=p[4]).loss
        for p in zip(*(_split(x, [2, 4]) for x in (logp, old, adv, mask, ref)), strict=False)
    )
    assert abs((halves / 2 - full).item()) > 1e-6


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(agg="mean"), ValueError, "valid options"),
        (dict(batch_num_tokens=-3), ValueError, "batch_num_tokens must be finite and >= 0"),
        (dict(global_batch_size=True), TypeError, "global_batch_size"),
        (dict(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, r"\(3, 4\) and \(3, 5\)"),
    ],
)
def test_errors(kwargs, exc, match):
    args = dict(per_token=PER_TOKEN, mask=MASK, agg="token-mean")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        aggregate(**args)
