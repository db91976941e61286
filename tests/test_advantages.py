"""rpg.advantages: hand-computed cases, degenerate groups, masking, errors."""

import math

import pytest
import torch

from rpg import advantages as adv

F64 = torch.float64


def test_grpo_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0], dtype=F64)  # groups of 3
    got = adv.grpo(r, 3)
    m1, s1 = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    m2, s2 = 5 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    want = [(1 - m1) / (s1 + 1e-6), -m1 / (s1 + 1e-6), -m1 / (s1 + 1e-6),
            (1 - m2) / (s2 + 1e-6), (2 - m2) / (s2 + 1e-6), (2 - m2) / (s2 + 1e-6)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv.grpo(r, 3, scale="none"), torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3], dtype=F64))
    batch_std = r.std()
    torch.testing.assert_close(adv.grpo(r, 3, scale="batch"), adv.grpo(r, 3, scale="none") / (batch_std + 1e-6))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("value", [0.1, 1.0, 0.0, 1e6])
def test_grpo_equal_group_is_exactly_zero(scale, value):
    r = torch.tensor([value] * 4 + [0.0, 1.0, 1.0, 0.0], dtype=torch.float32)
    got = adv.grpo(r, 4, scale=scale)
    assert (got[:4] == 0).all() and torch.isfinite(got).all()
    assert (got[4:] != 0).all()


def test_grpo_group_of_one_is_zero():
    assert (adv.grpo(torch.tensor([3.0, -1.0]), 1) == 0).all()


def test_rloo_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 3.0], dtype=F64)  # groups of 2
    torch.testing.assert_close(adv.rloo(r, 2), torch.tensor([1.0, -1.0, -3.0, 3.0], dtype=F64))
    r = torch.tensor([1.0, 2.0, 6.0], dtype=F64)
    torch.testing.assert_close(adv.rloo(r, 3), torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5], dtype=F64))


def _whiten_ref(x, m):
    v = x[m]
    return (x - v.mean()) / torch.sqrt(v.var(unbiased=True) + 1e-8) * m


def test_reinforce_pp_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([1.0, -1.0], dtype=F64)
    old = torch.tensor([[-1.0, -2.0, -0.5, 9.0], [-1.0, -1.0, 7.0, 7.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-2.0, -1.0, 0.0, 0.0]], dtype=F64)
    beta, gamma = 0.1, 0.9
    # per-token rewards: -beta*(old-ref), plus R on the last token
    r0 = [-0.05, 0.1, 1.0]
    r1 = [-0.1, -1.0]
    g0 = [r0[0] + gamma * (r0[1] + gamma * r0[2]), r0[1] + gamma * r0[2], r0[2], 0.0]
    g1 = [r1[0] + gamma * r1[1], r1[1], 0.0, 0.0]
    want = torch.tensor([g0, g1], dtype=F64)
    got = adv.reinforce_pp(rewards, mask, old, ref, beta=beta, gamma=gamma, whiten_advantages=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    got_w = adv.reinforce_pp(rewards, mask, old, ref, beta=beta, gamma=gamma)
    torch.testing.assert_close(got_w, _whiten_ref(want, mask), rtol=0, atol=1e-12)
    # k2 estimator
    got2 = adv.reinforce_pp(rewards, mask, old, ref, beta=beta, estimator="k2", whiten_advantages=False)
    k2 = 0.5 * (old - ref) ** 2
    assert got2[0, 2].item() == pytest.approx(1.0 - beta * k2[0, 2].item())
    assert got2[0, 0].item() == pytest.approx(1.0 - beta * k2[0, :3].sum().item())


def test_reinforce_pp_skips_interior_masked_tokens():
    """A masked token inside a response (tool output) neither earns a return nor cuts the chain."""
    mask = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    got = adv.reinforce_pp(torch.tensor([2.0]), mask, gamma=0.5, whiten_advantages=False)
    assert got.tolist() == [[1.0, 0.0, 2.0, 0.0]]


def test_reinforce_pp_masked_nan_does_not_leak():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    old = torch.tensor([[-1.0, -1.0, float("nan")]])
    ref = torch.tensor([[-1.0, -2.0, float("nan")]])
    got = adv.reinforce_pp(torch.tensor([1.0]), mask, old, ref, beta=0.1, whiten_advantages=False)
    assert torch.isfinite(got).all() and got[0, 2] == 0


def test_reinforce_pp_baseline_by_hand():
    r = torch.tensor([1.0, 0.0, 3.0, 3.0], dtype=F64)  # groups of 2: centered [0.5,-0.5,0,0]
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    base = torch.tensor([[0.5, 0.5], [-0.5, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(adv.reinforce_pp_baseline(r, 2, mask), _whiten_ref(base, mask), rtol=0, atol=1e-12)


def test_whiten_edge_cases():
    x = torch.tensor([[1.0, 5.0]])
    assert (adv.whiten(x, torch.zeros(1, 2, dtype=torch.bool)) == 0).all()
    assert adv.whiten(x, torch.tensor([[True, False]])).tolist() == [[0.0, 0.0]]


def test_dapo_overlong_penalty():
    got = adv.dapo_overlong_penalty(torch.tensor([10, 16, 18, 20, 21]), max_len=20, cache_len=4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_informative_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert adv.informative_groups(r, 2).tolist() == [False, False, True, True, False, False]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: adv.grpo(torch.zeros(5), 2), "multiple of group_size"),
        (lambda: adv.grpo(torch.zeros(4), 0), "group_size"),
        (lambda: adv.grpo(torch.zeros(4, 1), 2), "1-D"),
        (lambda: adv.grpo(torch.zeros(4), 2, scale="std"), "valid options"),
        (lambda: adv.rloo(torch.zeros(4), 1), "group_size >= 2"),
        (lambda: adv.reinforce_pp(torch.zeros(2), torch.ones(2, 3), beta=0.1), "old_logp and ref_logp"),
        (lambda: adv.reinforce_pp(torch.zeros(3), torch.ones(2, 3)), r"shape \[B\]"),
        (lambda: adv.reinforce_pp(torch.zeros(2), torch.ones(2, 3), estimator="k3"), "valid options"),
        (lambda: adv.reinforce_pp(torch.zeros(2), torch.ones(2, 3), torch.zeros(2, 2), torch.zeros(2, 3)), "old_logp has shape"),
        (lambda: adv.reinforce_pp(torch.zeros(2), torch.ones(2, 3), gamma=1.5), "gamma"),
        (lambda: adv.dapo_overlong_penalty(torch.tensor([1]), max_len=4, cache_len=5), "cache_len"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_reinforce_pp_upcasts_half_precision():
    """bf16 rewards must not swallow a small KL shaping over a long response."""
    T = 2000
    mask = torch.ones(1, T, dtype=torch.bool)
    old, ref = torch.zeros(1, T), torch.full((1, T), -0.013)
    got = adv.reinforce_pp(torch.tensor([1.0], dtype=torch.bfloat16), mask, old, ref, beta=0.01,
                           whiten_advantages=False)
    assert got.dtype == torch.float32
    assert got[0, 0].item() == pytest.approx(1.0 - 0.01 * 0.013 * T, rel=1e-4)


def test_reinforce_pp_empty_responses():
    assert adv.reinforce_pp(torch.tensor([1.0, 2.0]), torch.ones(2, 0, dtype=torch.bool)).shape == (2, 0)
