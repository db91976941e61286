"""Regression tests from an adversarial review of the input checks and the micro-batch metrics."""

import math

import pytest
import torch

import rpg
from rpg.fused import FusedLinearLoss

F64 = torch.float64


@pytest.mark.parametrize("bad", [math.nan, -math.inf, 3.0])
def test_fused_ignore_index_positions_are_padding_for_the_value_checks(bad):
    """Positions whose token is ``ignore_index`` are outside the loss (padding): the log-prob value
    checks never look at padding, so a NaN / −inf / positive ``old_logp`` or ``ref_logp`` there is
    accepted and changes nothing (the loss equals the one with finite values there)."""
    g = torch.Generator().manual_seed(0)
    b, t, h, v = 2, 5, 8, 11
    hidden = torch.randn(b, t, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64)
    tokens = torch.randint(0, v, (b, t), generator=g)
    tokens[:, -2:] = -100
    old = -torch.rand(b, t, generator=g, dtype=F64) - 0.5
    ref = old - 0.1
    adv = torch.randn(b, generator=g, dtype=F64)
    fn = FusedLinearLoss(rpg.GRPOLoss(beta=0.1), ignore_index=-100)
    want = fn(hidden, weight, tokens, old, adv, ref_logp=ref).loss
    bad_old, bad_ref = old.clone(), ref.clone()
    bad_old[:, -2:] = bad
    bad_ref[:, -2:] = bad
    got = fn(hidden, weight, tokens, bad_old, adv, ref_logp=bad_ref).loss
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # a response token is still checked
    bad_old[0, 0] = math.nan
    with pytest.raises(ValueError, match="old_logp"):
        fn(hidden, weight, tokens, bad_old, adv, ref_logp=ref)


def test_metrics_have_no_nan_where_old_logp_is_minus_inf_under_a_behavior_policy():
    """``old_logp = −∞`` at a response token is accepted with ``behavior_logp`` (π_old = 0 where μ
    sampled: ρ = 0) and the loss is finite; its metrics must not be NaN. Under μ the KL estimators
    weigh a token by ρ·w = π_θ/μ (finite), so kl/ref_* (π_ref given, finite there) stay finite and
    equal their value computed with the token's ρ·w directly; kl/old_* are +∞ (KL(π_θ‖π_old) with
    π_old = 0 where π_θ > 0); ratio/ess with k infinite weights among n tokens is its limit k/n."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(2, 3, generator=g, dtype=F64) - 0.2
    old = logp - 0.1
    beh = old - 0.3
    ref = old - 0.2
    old_inf = old.clone()
    old_inf[0, 1] = -math.inf
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    out = rpg.PolicyLoss(kl="k3", beta=0.1)(logp, old_inf, adv, ref_logp=ref, behavior_logp=beh)
    assert torch.isfinite(out.loss)
    for name, m in (("metrics", out.metrics), ("summable_metrics", out.summable_metrics)):
        assert not any(math.isnan(v) for v in m.values()), (name, {k: v for k, v in m.items() if math.isnan(v)})
    m = out.metrics
    assert m["kl/old_k1"] == math.inf and m["kl/old_k3"] == math.inf
    assert m["ratio/ess"] == pytest.approx(1 / 6, rel=1e-12)
    # kl/ref_k1 = mean over tokens of (π_θ/μ)·log(π_θ/π_ref), the π_old = 0 token included
    want = ((logp - beh).exp() * (logp - ref)).mean().item()
    assert m["kl/ref_k1"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("arg", ["batch_num_tokens", "global_batch_size"])
def test_a_one_element_count_tensor_gives_a_scalar_loss_and_readable_metrics(arg):
    """A one-element count tensor (``[1]``, e.g. the result of an all-reduce) is accepted as a
    scalar count: the loss stays a 0-dim tensor equal to the one with the plain number, and the
    metrics are readable (they raised a stacking error)."""
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(2, 3, generator=g, dtype=F64) - 0.1
    old = logp - 0.05
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    fn = rpg.DAPOLoss() if arg == "batch_num_tokens" else rpg.GRPOLoss(beta=0.0)
    count = 12 if arg == "batch_num_tokens" else 4
    want = fn(logp, old, adv, **{arg: count})
    got = fn(logp, old, adv, **{arg: torch.tensor([count])})
    assert got.loss.shape == ()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-14, atol=0)
    assert got.metrics == want.metrics
    assert got.summable_metrics == pytest.approx(want.summable_metrics, rel=1e-14)


def test_a_user_subclass_with_a_non_function_init_can_be_defined():
    """The unknown-argument wrapper applies to plain ``__init__`` functions only: a user subclass
    whose ``__init__`` is another callable descriptor (a ``functools.partialmethod``) is defined
    and works as Python defines it (the wrapper raised at class creation)."""
    import functools

    class NoKL(rpg.GRPOLoss):
        __init__ = functools.partialmethod(rpg.GRPOLoss.__init__, beta=0.0)

    loss = NoKL()
    assert isinstance(loss, rpg.GRPOLoss) and loss.beta == 0.0
    assert NoKL(clip=None).loss_config.clip is None
    with pytest.raises(TypeError, match="epsilon"):  # the parent's wrapper still names the argument
        NoKL(epsilon=0.2)


@pytest.mark.parametrize("kl", ["rkl", "urkl"])
@pytest.mark.parametrize("style", ["differentiable", "reinforce"])
def test_logp_and_ref_logp_both_minus_inf_at_a_token_give_the_limit_not_nan(kl, style):
    """``logp = −∞`` and ``ref_logp = −∞`` are each accepted at a response token (documented
    limits). At the same token (π_θ = π_ref = 0, the token sampled by π_old > 0) the reverse-KL
    terms E_old[w·log(π_θ/π_ref)] (+ c − w) have weight w = π_θ/π_old = 0 and c = π_ref/π_old = 0:
    the token's term is 0 and so is its gradient. It was NaN (0·∞), loss and gradient."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(2, 3, generator=g, dtype=F64) - 0.2
    old, adv = logp - 0.1, torch.tensor([1.0, -1.0], dtype=F64)
    ref = old - 0.2
    at = torch.zeros(2, 3, dtype=torch.bool)
    at[0, 1] = True
    lp = logp.masked_fill(at, -math.inf).requires_grad_(True)
    out = rpg.PolicyLoss(kl=kl, beta=0.1, style=style)(lp, old, adv, ref_logp=ref.masked_fill(at, -math.inf))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(lp.grad).all()
    assert out.per_token[0, 1].item() == 0.0 and lp.grad[0, 1].item() == 0.0
    assert not any(math.isnan(v) for v in out.metrics.values())
    # under μ, old_logp = −∞ too: the kl/old and kl/ref estimators (weight π_θ/μ = 0) are finite
    beh = old - 0.3
    out = rpg.PolicyLoss(kl=kl, beta=0.1, style=style)(
        lp.detach(), old.masked_fill(at, -math.inf), adv, ref_logp=ref, behavior_logp=beh
    )
    assert torch.isfinite(out.loss)
    assert all(math.isfinite(v) for k, v in out.metrics.items() if k.startswith(("kl/old", "kl/ref"))), out.metrics
