"""Regression tests for the failure classes an independent adversarial suite found (one test or more each).

(1) bypass mode with a −inf log-prob; (3) float32 overflow under a trust region; (4) float32 overflow
under a clip with no dual bound; (5) ``torch.compile(fullgraph=True)`` with a CPU-tensor count;
(6) the argument types of ``from_hidden`` and ``FusedLinearLoss``; (7) the functional module's example.
Where float32 and float64 can be compared, they are.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import rpg
import rpg.functional
from rpg.fused import FusedLinearLoss
from rpg.logprobs import from_hidden

F64 = torch.float64


# --- (1) bypass mode (old_logp = behavior_logp) with a −inf log-prob ----------------------------


@pytest.mark.parametrize(
    "fn", [rpg.RPGLoss("urkl", style="reinforce"), rpg.GRPOLoss(), rpg.DPPOLoss(), rpg.RPGLoss("rkl")], ids=repr
)
def test_bypass_mode_with_a_minus_inf_behavior_logp_is_refused_not_nan(fn):
    """μ = π_old gave a sampled token probability 0: ρ = exp(−inf + inf) = NaN made the loss NaN. Such a
    batch is refused, naming ``behavior_logp`` (the engine sampled the token, so μ > 0 there)."""
    old = torch.tensor([[-float("inf"), -0.7]])
    logp = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    with pytest.raises(ValueError, match="behavior_logp is -inf"):
        fn(logp, old, torch.tensor([1.0]), behavior_logp=old, ref_logp=old.clamp_min(-5))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_bypass_mode_with_a_minus_inf_logp_takes_the_limit(dtype):
    """A −inf in ``logp`` (π_θ cannot emit the token) keeps its limit semantics in bypass mode: finite."""
    old = torch.tensor([[-1.2, -0.7]], dtype=dtype)
    logp = torch.tensor([[-float("inf"), -0.5]], dtype=dtype, requires_grad=True)
    for fn in (rpg.RPGLoss("urkl", style="reinforce"), rpg.DPPOLoss(), rpg.RPGLoss("rkl")):
        out = fn(logp, old, torch.tensor([1.0], dtype=dtype), behavior_logp=old)
        (g,) = torch.autograd.grad(out.loss, logp)
        assert torch.isfinite(out.loss) and torch.isfinite(g).all()


# --- (3) float32 |log w| ≥ 88 under a trust region: every token masked, finite loss ---------------

TRUST_REGION = {
    "DPPO tv": rpg.DPPOLoss(),
    "DPPO kl": rpg.DPPOLoss(divergence="kl"),
    "differentiable tv": rpg.PolicyLoss(clip=rpg.TrustRegion()),
    "differentiable kl": rpg.PolicyLoss(clip=rpg.TrustRegion(divergence="kl")),
    "reinforce tv + urkl": rpg.PolicyLoss(kl="urkl", beta=1e-3, style="reinforce", clip=rpg.TrustRegion()),
}


@pytest.mark.parametrize("name", list(TRUST_REGION))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_trust_region_masking_every_token_gives_a_finite_loss(name, dtype):
    """q = e^-101, p = e^-1, A > 0: the token leaves the region and is masked (gradient 0). In float32
    w = e^100 overflows (and so does the region's edge 1 + δ/q): the masked token's value was ±inf;
    now 0 where its value is not representable. In float64 nothing overflows: finite too."""
    fn = TRUST_REGION[name]
    old = torch.tensor([[-101.0, -101.0]], dtype=dtype)
    logp = torch.tensor([[-1.0, -1.5]], dtype=dtype, requires_grad=True)  # p = 0.37, 0.22: p − q > 0.15
    out = fn(logp, old, torch.tensor([1.0], dtype=dtype))
    (g,) = torch.autograd.grad(out.loss, logp)
    assert not g.any()  # every token masked
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_token).all(), out.per_token
    if dtype == torch.float32:
        assert not out.per_token.any()  # the value of a masked token whose value overflows: 0
    assert out.metrics["clip_frac"] == 1.0


def test_trust_region_overflow_value_is_zero_only_where_it_overflows():
    """A masked token whose value is representable keeps it (−m·Â at the region's edge for tv)."""
    old = torch.tensor([[-101.0, -2.0]])
    logp = torch.tensor([[-1.0, -0.1]], requires_grad=True)  # both leave the region (p − q > 0.15)
    out = rpg.PolicyLoss(clip=rpg.TrustRegion())(logp, old, torch.tensor([1.0]))
    edge = 1 + 0.15 * math.exp(2.0)
    assert out.per_token[0, 0].item() == 0.0
    assert out.per_token[0, 1].item() == pytest.approx(-edge, rel=1e-6)


# --- (4) float32 overflow under a Clip with dual=None, REINFORCE style ------------------------------


@pytest.mark.parametrize("div", rpg.DIVERGENCES)
def test_no_dual_bound_keeps_an_overflowing_token_as_float64_does(div):
    """A′ < 0 and w = e^100 with ``dual=None``: no bound applies, float64 keeps the token's gradient.
    float32 compared the overflowed w = inf with the absent bound (+inf) and clipped it silently while
    ``clip_frac`` said 0. Both dtypes now keep it and agree on the clip fraction; float32's gradient is
    −inf there, the documented limit of an unclipped w the dtype cannot represent."""
    fn = rpg.RPGLoss(div, style="reinforce", beta=1e-3, clip=rpg.Clip(0.2, 0.28, None))
    got = {}
    for dtype in (torch.float32, F64):
        old = torch.tensor([[-101.0, -1.0]], dtype=dtype)
        logp = torch.tensor([[-1.0, -1.1]], dtype=dtype, requires_grad=True)
        out = fn(logp, old, torch.tensor([-1.0], dtype=dtype))
        (g,) = torch.autograd.grad(out.loss, logp)
        got[dtype] = (g, out.metrics["clip_frac"])
    g32, frac32 = got[torch.float32]
    g64, frac64 = got[F64]
    assert frac32 == frac64 == 0.0
    assert g64[0, 0].item() > 1e40  # kept, with the gradient of w = e^100
    assert g32[0, 0].item() == math.inf  # kept (not silently 0): w is not representable in float32
    torch.testing.assert_close(g32[0, 1].double(), g64[0, 1], rtol=1e-5, atol=0)


def test_float32_and_float64_clip_the_same_tokens_near_overflow():
    """Every combination of sign and bound at |log w| = 100: the same tokens lose their gradient."""
    log_w = torch.tensor([100.0, -100.0, 100.0, -100.0, 0.05, -0.05])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    for clip in (rpg.Clip(0.2, 0.28, None), rpg.Clip(0.2, 0.28, 3.0), rpg.Clip(None, 0.28, None), rpg.Clip(0.2, None)):
        zero = {}
        for dtype in (torch.float32, F64):
            old = torch.full((6, 1), -101.0, dtype=dtype)
            logp = (old + log_w[:, None].to(dtype)).requires_grad_(True)
            out = rpg.RPGLoss("urkl", style="reinforce", beta=0.0, clip=clip)(logp, old, adv.to(dtype))
            (g,) = torch.autograd.grad(out.loss, logp)
            zero[dtype] = (g == 0).squeeze(1).tolist()
        assert zero[torch.float32] == zero[F64], clip


# --- (5) torch.compile(fullgraph=True) with CPU-tensor counts ----------------------------------------


@pytest.mark.parametrize("count", [torch.tensor(30), torch.tensor(30.0), np.int64(30), 30])
def test_fullgraph_compile_with_a_cpu_tensor_count(count):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g) * 2 - 0.1
    logp = (old + 0.05 * torch.randn(3, 5, generator=g)).clamp(max=0).requires_grad_(True)
    adv = torch.randn(3, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    fn = rpg.RPGLoss("urkl", style="reinforce")

    @torch.compile(fullgraph=True, backend="eager")
    def f(logp, old, adv, mask, n, s):
        return fn(logp, old, adv, mask, batch_num_tokens=n, global_batch_size=s).loss

    got = f(logp, old, adv, mask, count, count)
    want = fn(logp, old, adv, mask, batch_num_tokens=30).loss
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="batch_num_tokens must be finite and >= 0"):  # eager still checks
        fn(logp, old, adv, mask, batch_num_tokens=torch.tensor(-1))


# --- (6) from_hidden and FusedLinearLoss take the same argument types --------------------------------

TOKEN_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]
TEMPERATURES = [1.5, np.float32(1.5), torch.tensor(1.5), torch.tensor([1.5], dtype=F64)]


@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda t: type(t).__name__)
@pytest.mark.parametrize("token_dtype", TOKEN_DTYPES, ids=str)
def test_from_hidden_and_fused_accept_the_same_types(token_dtype, temperature):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 3, 8, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(11, 8, generator=g, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 3), generator=g).to(token_dtype)
    logp = from_hidden(h, w, tokens, temperature=temperature)
    old = logp.detach() - 0.05
    want = rpg.DAPOLoss()(logp, old, torch.ones(2, dtype=F64))
    got = FusedLinearLoss(rpg.DAPOLoss())(h, w, tokens, old, torch.ones(2, dtype=F64), temperature=temperature)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"tokens": torch.zeros(2, 3)}, TypeError, "tokens must be an integer tensor"),
        ({"tokens": torch.zeros(2, 3, dtype=torch.bool)}, TypeError, "tokens must be an integer tensor"),
        ({"temperature": 0.0}, ValueError, "temperature must be a positive finite number"),
        ({"temperature": torch.tensor([1.0, 2.0])}, TypeError, "temperature must be a real number"),
        ({"temperature": True}, TypeError, "temperature must be a real number"),
        ({"temperature": "1"}, TypeError, "temperature must be a real number"),
    ],
)
def test_from_hidden_and_fused_refuse_the_same_types(kwargs, error, match):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 3, 8, generator=g, dtype=F64)
    w = torch.randn(11, 8, generator=g, dtype=F64)
    args = {"tokens": torch.randint(0, 11, (2, 3), generator=g), "temperature": 1.0, **kwargs}
    old = torch.full((2, 3), -2.0, dtype=F64)
    with pytest.raises(error, match=match):
        from_hidden(h, w, args["tokens"], temperature=args["temperature"])
    with pytest.raises(error, match=match):
        FusedLinearLoss(rpg.DAPOLoss())(h, w, args["tokens"], old, None, temperature=args["temperature"])


def test_fused_settings_take_from_hiddens_integer_types():
    f = FusedLinearLoss(rpg.DAPOLoss(), chunk_size=np.int64(4), vocab_chunk_size=torch.tensor(8), ignore_index=-100)
    assert (f.chunk_size, f.vocab_chunk_size, f.ignore_index) == (4, 8, -100)
    assert FusedLinearLoss(rpg.DAPOLoss(), ignore_index=np.int32(-100)).ignore_index == -100
    with pytest.raises(TypeError, match="ignore_index"):
        FusedLinearLoss(rpg.DAPOLoss(), ignore_index=1.5)


# --- (7) the functional module's docstring example runs ------------------------------------------------


def test_functional_docstring_examples_run():
    """The example used ``config_object`` (AttributeError); every line of it now runs."""
    doc = rpg.functional.__doc__
    lines = [m.strip() for m in re.findall(r"^\s+(out = rpg\.policy_loss\(.*\))$", doc, re.M)]
    assert len(lines) == 2 and "loss_config" in lines[1]
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(2, 4, generator=g, dtype=F64) - 0.1
    ns = {
        "rpg": rpg,
        "logp": (old + 0.05).requires_grad_(True),
        "old_logp": old,
        "advantages": torch.tensor([1.0, -1.0], dtype=F64),
        "mask": torch.ones(2, 4, dtype=torch.bool),
    }
    outs = []
    for line in lines:
        exec(line, ns)
        outs.append(ns["out"])
    rkl = rpg.RPGLoss("rkl")(ns["logp"], old, ns["advantages"], ns["mask"])
    torch.testing.assert_close(outs[1].loss, rkl.loss, rtol=0, atol=0)
    assert torch.isfinite(outs[0].loss)
