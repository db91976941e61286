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
    want = [
        (1 - m1) / (s1 + 1e-6),
        -m1 / (s1 + 1e-6),
        -m1 / (s1 + 1e-6),
        (1 - m2) / (s2 + 1e-6),
        (2 - m2) / (s2 + 1e-6),
        (2 - m2) / (s2 + 1e-6),
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        adv.grpo(r, 3, scale="none"), torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3], dtype=F64)
    )
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
        (
            lambda: adv.reinforce_pp(torch.zeros(2), torch.ones(2, 3), torch.zeros(2, 2), torch.zeros(2, 3)),
            "old_logp has shape",
        ),
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
    got = adv.reinforce_pp(
        torch.tensor([1.0], dtype=torch.bfloat16), mask, old, ref, beta=0.01, whiten_advantages=False
    )
    assert got.dtype == torch.float32
    assert got[0, 0].item() == pytest.approx(1.0 - 0.01 * 0.013 * T, rel=1e-4)


def test_reinforce_pp_empty_responses():
    assert adv.reinforce_pp(torch.tensor([1.0, 2.0]), torch.ones(2, 0, dtype=torch.bool)).shape == (2, 0)


# ---- eps, non-finite rewards, number types, scale robustness, whitening convention ----

import numpy as np  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NAN, INF = float("nan"), float("inf")


def _grpo_plain(r, g, scale, eps):
    """The textbook formula, no safeguards (the reference where it is finite)."""
    x = r.view(-1, g)
    c = x - x.mean(-1, keepdim=True)
    s = x.std(-1, keepdim=True) if scale == "group" else r.std()
    return (c / (s + eps)).reshape(-1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("value", [0.1, 1.0, 0.0, -3.7])
def test_grpo_eps_zero_equal_group_is_exactly_zero(scale, value):
    r = torch.tensor([value] * 3 + [0.0, 1.0, 1.0], dtype=torch.float32)
    got = adv.grpo(r, 3, scale=scale, eps=0)
    assert torch.isfinite(got).all() and (got[:3] == 0).all()
    if scale != "none":  # the other group is exactly standardised
        torch.testing.assert_close(got[3:], _grpo_plain(r, 3, scale, 0.0)[3:])
    everything_equal = torch.full((6,), value)
    assert (adv.grpo(everything_equal, 3, scale=scale, eps=0.0) == 0).all()


def test_equal_groups_exactly_zero_in_rloo_and_whiten():
    r = torch.full((3,), 0.1, dtype=F64)  # the mean of three 0.1 is not 0.1 in floating point
    assert (adv.rloo(r, 3) == 0).all()
    for eps in (0.0, 1e-8):
        assert (adv.whiten(r.view(1, 3), torch.ones(1, 3), eps=eps) == 0).all()
    assert (adv.reinforce_pp_baseline(r, 3, torch.ones(3, 4)) == 0).all()


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_grpo_equals_plain_formula_bit_for_bit(scale):
    g = torch.Generator().manual_seed(3)
    r = torch.randn(24, generator=g, dtype=F64) * 5
    assert torch.equal(adv.grpo(r, 4, scale=scale), _grpo_plain(r, 4, scale, 1e-6))


@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("factor", [2.0**-140, 2.0**-110, 1e-30, 1e30, 2.0**120])
def test_grpo_reward_scale_neither_underflows_nor_overflows(scale, factor):
    """float32: the squares of 1e-30 underflow and of 1e30 overflow; the standardised advantage does not care."""
    r = torch.tensor([1.0, 0.0, 0.5, -2.0, 3.0, 3.0, 1.0, 0.0])
    want = _grpo_plain(r.double(), 4, scale, 0.0).float()
    torch.testing.assert_close(adv.grpo(r * factor, 4, scale=scale, eps=0), want)
    x = r.view(2, 4) * factor
    torch.testing.assert_close(
        adv.whiten(x, torch.ones(2, 4), eps=0),
        _whiten_ref(r.view(2, 4).double(), torch.ones(2, 4, dtype=torch.bool)).float(),
        rtol=1e-6,
        atol=1e-6,
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=2, max_size=12),
    st.integers(-60, 60),
    st.sampled_from(["group", "batch", "none"]),
)
def test_grpo_property_finite_zero_for_equal_groups_scale_free(ints, shift, scale):
    g = 2
    r = torch.tensor(ints[: len(ints) // g * g], dtype=F64) / 3
    out = adv.grpo(r, g, scale=scale, eps=0)
    assert torch.isfinite(out).all()
    equal = (r.view(-1, g) == r.view(-1, g)[:, :1]).all(-1)
    assert (out.view(-1, g)[equal] == 0).all()
    if scale != "none":  # standardisation is invariant to the reward scale, exactly for powers of two
        assert torch.equal(adv.grpo(r * 2.0**shift, g, scale=scale, eps=0), out)


@pytest.mark.parametrize("eps", [-1e-6, NAN, INF, -INF])
def test_bad_eps_is_refused(eps):
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        adv.grpo(torch.zeros(4), 2, eps=eps)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        adv.whiten(torch.zeros(2, 2), torch.ones(2, 2), eps=eps)


NONFINITE_CALLS = {
    "grpo group": lambda r: adv.grpo(r, 2),
    "grpo batch": lambda r: adv.grpo(r, 2, scale="batch"),
    "grpo none": lambda r: adv.grpo(r, 2, scale="none"),
    "rloo": lambda r: adv.rloo(r, 2),
    "reinforce_pp": lambda r: adv.reinforce_pp(r, torch.ones(4, 3)),
    "reinforce_pp unwhitened": lambda r: adv.reinforce_pp(r, torch.ones(4, 3), whiten_advantages=False),
    "reinforce_pp_baseline": lambda r: adv.reinforce_pp_baseline(r, 2, torch.ones(4, 3)),
    "informative_groups": lambda r: adv.informative_groups(r, 2),
}


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("name", list(NONFINITE_CALLS))
def test_nonfinite_rewards_are_refused_naming_the_argument(name, bad):
    r = torch.tensor([1.0, 0.0, bad, 2.0])
    with pytest.raises(ValueError, match="rewards must be finite"):
        NONFINITE_CALLS[name](r)


def test_all_nan_group_is_not_informative():
    with pytest.raises(ValueError, match="rewards must be finite"):
        adv.informative_groups(torch.tensor([NAN, NAN, 0.0, 1.0]), 2)


@pytest.mark.parametrize("which", ["old_logp", "ref_logp"])
@pytest.mark.parametrize("bad", [NAN, -INF])
def test_reinforce_pp_refuses_nonfinite_logp_at_unmasked_tokens(which, bad):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    lp = {"old_logp": torch.full((2, 3), -1.0), "ref_logp": torch.full((2, 3), -1.5)}
    lp[which][1, 1] = bad  # masked: fine
    adv.reinforce_pp(torch.tensor([1.0, 0.0]), mask, beta=0.1, **lp)
    lp[which][0, 1] = bad  # unmasked: refused
    with pytest.raises(ValueError, match=f"{which} must be finite at unmasked tokens"):
        adv.reinforce_pp(torch.tensor([1.0, 0.0]), mask, beta=0.1, **lp)
    adv.reinforce_pp(torch.tensor([1.0, 0.0]), mask, beta=0.0, **lp)  # unused at beta = 0


def test_whiten_refuses_nonfinite_only_where_masked():
    x = torch.tensor([[1.0, 2.0, NAN]])
    got = adv.whiten(x, torch.tensor([[True, True, False]]))
    assert torch.isfinite(got).all() and got[0, 2] == 0
    with pytest.raises(ValueError, match="values must be finite where mask is set"):
        adv.whiten(x, torch.ones(1, 3))


def test_dapo_overlong_penalty_refuses_nonfinite_lengths():
    with pytest.raises(ValueError, match="lengths must be finite"):
        adv.dapo_overlong_penalty(torch.tensor([3.0, NAN]), max_len=4, cache_len=2)


SCALARS = {
    "numpy int": (np.int64(2), np.int32(2)),
    "0-dim tensor": (torch.tensor(2), torch.tensor(2, dtype=torch.int32)),
    "one-element tensor": (torch.tensor([2]),),
}


@pytest.mark.parametrize("kind", list(SCALARS))
def test_numpy_and_tensor_scalars_are_numbers(kind):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(8, generator=g, dtype=F64)
    mask = torch.rand(8, 5, generator=g) > 0.3
    old, ref = -torch.rand(8, 5, generator=g, dtype=F64), -torch.rand(8, 5, generator=g, dtype=F64)
    for two in SCALARS[kind]:
        as_real = np.float64(0.5) if kind == "numpy int" else torch.tensor(0.5)
        assert torch.equal(adv.grpo(r, two, eps=as_real), adv.grpo(r, 2, eps=0.5))
        assert torch.equal(adv.rloo(r, two), adv.rloo(r, 2))
        assert torch.equal(adv.informative_groups(r, two), adv.informative_groups(r, 2))
        assert torch.equal(adv.reinforce_pp_baseline(r, two, mask), adv.reinforce_pp_baseline(r, 2, mask))
        assert torch.equal(
            adv.reinforce_pp(r, mask, old, ref, beta=as_real, gamma=as_real),
            adv.reinforce_pp(r, mask, old, ref, beta=0.5, gamma=0.5),
        )
        assert torch.equal(adv.whiten(old, mask, eps=as_real), adv.whiten(old, mask, eps=0.5))
        lengths = torch.tensor([1, 5, 7, 9])
        assert torch.equal(adv.dapo_overlong_penalty(lengths, two * 4, two), adv.dapo_overlong_penalty(lengths, 8, 2))
    assert torch.equal(adv.grpo(r, 2, eps=np.float32(0.25)), adv.grpo(r, 2, eps=0.25))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: adv.grpo(torch.zeros(4), True), "group_size must be an integer"),
        (lambda: adv.grpo(torch.zeros(4), 2.0), "group_size must be an integer"),
        (lambda: adv.grpo(torch.zeros(4), np.float64(2.0)), "group_size must be an integer"),
        (lambda: adv.grpo(torch.zeros(4), torch.tensor(2.0)), "group_size must be an integer"),
        (lambda: adv.grpo(torch.zeros(4), "2"), "group_size must be an integer"),
        (lambda: adv.grpo(torch.zeros(4), 2, eps="0"), "eps must be a real number"),
        (lambda: adv.grpo(torch.zeros(4), 2, eps=False), "eps must be a real number"),
        (lambda: adv.grpo([0.0, 1.0], 2), "rewards must be a torch.Tensor"),
        (lambda: adv.rloo(torch.zeros(4), None), "group_size must be an integer"),
        (lambda: adv.reinforce_pp(torch.zeros(2), torch.ones(2, 3), gamma=True), "gamma must be a real number"),
        (lambda: adv.reinforce_pp(torch.zeros(2), torch.ones(2, 3), beta=None), "beta must be a real number"),
        (lambda: adv.reinforce_pp(torch.zeros(2), [[1, 1]]), "mask must be a"),
        (lambda: adv.whiten(torch.zeros(2, 2), torch.ones(2, 2), unbiased=1), "unbiased must be a bool"),
        (lambda: adv.dapo_overlong_penalty(torch.tensor([1]), max_len="4", cache_len=2), "max_len must be a real"),
    ],
)
def test_wrong_types_raise_type_error(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("beta", [NAN, INF, -0.1])
def test_reinforce_pp_refuses_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        adv.reinforce_pp(torch.zeros(2), torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), beta=beta)


def _whiten_population(x, m):
    v = x[m]
    return (x - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-8) * m


def test_whiten_variance_conventions():
    """unbiased=True divides by N − 1 (verl's masked_whiten); False by N (OpenRLHF 0.11's REINFORCE++)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, generator=g, dtype=F64) * 3 + 1
    m = torch.rand(5, 7, generator=g) > 0.3
    torch.testing.assert_close(adv.whiten(x, m), _whiten_ref(x, m), rtol=0, atol=1e-12)
    torch.testing.assert_close(adv.whiten(x, m, unbiased=False), _whiten_population(x, m), rtol=0, atol=1e-12)
    n = m.sum().item()
    torch.testing.assert_close(
        adv.whiten(x, m, eps=0, unbiased=False) * ((n - 1) / n) ** 0.5, adv.whiten(x, m, eps=0), rtol=1e-12, atol=1e-12
    )


def test_reinforce_pp_exposes_the_whitening_convention():
    g = torch.Generator().manual_seed(4)
    r = torch.randn(6, generator=g, dtype=F64)
    mask = torch.rand(6, 5, generator=g) > 0.3
    raw = adv.reinforce_pp(r, mask, gamma=0.9, whiten_advantages=False)
    for unbiased in (True, False):
        torch.testing.assert_close(
            adv.reinforce_pp(r, mask, gamma=0.9, unbiased=unbiased),
            adv.whiten(raw, mask, unbiased=unbiased),
            rtol=0,
            atol=0,
        )
        base = adv.grpo(r, 3, scale="none")[:, None] * mask
        torch.testing.assert_close(
            adv.reinforce_pp_baseline(r, 3, mask, unbiased=unbiased),
            adv.whiten(base, mask, unbiased=unbiased),
            rtol=0,
            atol=1e-15,
        )
    assert not torch.allclose(adv.reinforce_pp(r, mask, unbiased=False), adv.reinforce_pp(r, mask))
    with pytest.raises(ValueError, match="no effect with whiten_advantages=False"):
        adv.reinforce_pp(r, mask, whiten_advantages=False, unbiased=False)


def test_empty_inputs():
    assert adv.grpo(torch.zeros(0), 4, scale="batch", eps=0).shape == (0,)
    assert adv.whiten(torch.zeros(0, 3), torch.zeros(0, 3)).shape == (0, 3)
    assert (adv.whiten(torch.ones(2, 3), torch.zeros(2, 3), eps=0) == 0).all()


def test_half_precision_rewards_are_computed_in_float32():
    r = torch.tensor([1.0, 0.0, 0.25, 0.75], dtype=torch.bfloat16)
    got = adv.grpo(r, 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, adv.grpo(r.float(), 2))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_property_one_nonfinite_reward_is_always_refused(groups, size, data):
    """Wherever a NaN or ±inf lands, every estimator refuses the batch instead of spreading it."""
    r = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=groups * size, max_size=groups * size)))
    r[data.draw(st.integers(0, r.numel() - 1))] = data.draw(st.sampled_from([NAN, INF, -INF]))
    mask = torch.ones(r.numel(), 3)
    calls = [
        lambda: adv.grpo(r, size),
        lambda: adv.grpo(r, size, scale="batch"),
        lambda: adv.grpo(r, size, eps=0),
        lambda: adv.informative_groups(r, size),
        lambda: adv.reinforce_pp(r, mask),
        lambda: adv.reinforce_pp_baseline(r, size, mask),
    ]
    if size > 1:
        calls.append(lambda: adv.rloo(r, size))
    for call in calls:
        with pytest.raises(ValueError, match="rewards must be finite"):
            call()


def test_estimators_check_where_the_losses_check_and_run_under_torch_func():
    """The finite check runs as the losses' input checks do: eagerly on a CPU (raising), skipped under a
    torch.func transform, where a data-dependent branch cannot run (the estimator then still computes)."""
    rewards = torch.tensor([[1.0, 0.0, 2.0, 2.0], [0.5, -1.0, 3.0, 1.0]], dtype=torch.float64)
    for fn in (lambda r: adv.grpo(r, 2), lambda r: adv.rloo(r, 2)):
        got = torch.func.vmap(fn)(rewards)
        torch.testing.assert_close(got, torch.stack([fn(r) for r in rewards]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rewards must be finite"):
        adv.grpo(torch.tensor([1.0, math.nan]), 2)
