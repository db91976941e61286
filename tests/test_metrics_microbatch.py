"""Metrics of a micro-batched / sharded step: ``metrics`` are per-call means, ``summable_metrics`` add up.

The recipe documented in rpg.metrics: every micro-batch passes the step's ``batch_num_tokens``; summing
``summable_metrics`` over the calls gives the full-batch call's ``summable_metrics`` (for every key, including
the ``rollout_corr/*`` token means with ``count_rejected`` either way), which is the full-batch mean in
``metrics`` whenever ``batch_num_tokens`` counts the tokens the mean runs over.
"""

import pytest
import torch

import rpg

F64 = torch.float64
B, T = 8, 6
SHARDS = (slice(0, 3), slice(3, 4), slice(4, 8))  # uneven, one of a single row


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2 - 3.0  # log-probs stay < 0 after the noise
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    beh = old - 0.6 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[3] = False  # an empty row, alone in its shard
    ent = torch.rand(B, T, generator=g, dtype=F64)
    return logp, old, ref, beh, adv, mask, ent


def _call(fn, rows, batch, **kw):
    logp, old, ref, beh, adv, mask, ent = (x[rows] for x in batch)
    return fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh, entropy=ent, **kw)


def _step_sum(outs):
    total = {}
    for out in outs:
        for k, v in out.summable_metrics.items():
            total[k] = total.get(k, 0.0) + v
    return total


@pytest.mark.parametrize("count_rejected", [True, False])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_summable_metrics_add_up_over_shards(count_rejected, level):
    batch = _batch(1)
    corr = rpg.RolloutCorrection(
        level=level, mode="mask", lower=0.4, upper=2.5, geo_lower=0.6, count_rejected=count_rejected
    )
    fn = rpg.GRPOLoss(beta=0.05, correction=corr)
    everything = slice(0, B)
    _, old, _, beh, _, mask, _ = batch
    n = int(corr.keep(old, beh, mask).sum()) if not count_rejected else int(mask.sum())
    full = _call(fn, everything, batch, batch_num_tokens=n)
    parts = [_call(fn, rows, batch, batch_num_tokens=n) for rows in SHARDS]
    step = _step_sum(parts)
    want = full.summable_metrics
    assert set(step) == set(want)
    assert any(k.startswith("rollout_corr/") for k in want) and "rollout_corr/rollout_rs_masked_fraction" in want
    for k in want:
        assert step[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), k
    rejected = full.metrics["rollout_corr/rollout_rs_masked_fraction"]
    assert 0 < rejected < 1  # the correction rejects some tokens: the two conventions differ
    # the full-batch means: summable = metrics for every token mean over the loss's tokens, and for the
    # rollout_corr/* means too when batch_num_tokens counts the response tokens (count_rejected=True)
    for k in want:
        ratio = 1.0
        if k.startswith("rollout_corr/") and not count_rejected:  # documented: × response / kept tokens
            ratio = int(mask.sum()) / n
        assert step[k] == pytest.approx(full.metrics[k] * ratio, rel=1e-12, abs=1e-15), k


def test_metrics_are_per_call_means_whatever_batch_num_tokens():
    batch = _batch(2)
    fn = rpg.DAPOLoss()
    rows = SHARDS[0]
    plain = _call(fn, rows, batch).metrics
    for bnt in (1, 37, 10_000, torch.tensor(37)):
        out = _call(fn, rows, batch, batch_num_tokens=bnt)
        assert out.metrics == plain
        assert out.local_metrics is out.metrics
    # on-policy, ratio/mean is 1 in a micro-batch however large the step (the trap of dividing by the step count)
    _, old, _, _, adv, mask, _ = batch
    on = rpg.DAPOLoss()(old[rows], old[rows], adv[rows], mask[rows], batch_num_tokens=10_000)
    assert on.metrics["ratio/mean"] == 1.0 and on.summable_metrics["ratio/mean"] < 0.01


def test_summable_without_batch_num_tokens_equals_the_means():
    batch = _batch(3)
    out = _call(rpg.GRPOLoss(beta=0.05), slice(0, B), batch)
    for k, v in out.summable_metrics.items():
        assert v == pytest.approx(out.metrics[k], rel=1e-12, abs=1e-15), k
    assert set(out.summable_metrics) < set(out.metrics)
    assert {"ratio/min", "ratio/max", "ratio/ess", "rollout_corr/chi2_seq"} <= set(out.metrics) - set(
        out.summable_metrics
    )


def test_empty_call_gives_zeros():
    batch = _batch(4)
    out = _call(rpg.GRPOLoss(beta=0.05), slice(3, 4), batch, batch_num_tokens=20)  # the empty row alone
    assert all(v == 0.0 for v in out.metrics.values())
    assert all(v == 0.0 for v in out.summable_metrics.values())
