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
