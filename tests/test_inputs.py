"""Input rules: what rpg refuses (with an error naming the argument) and the edge cases it still accepts.

Every log-prob input is read at response tokens only (padding is never looked at): values above 0
beyond rounding (logits or probabilities), NaN, +inf are refused everywhere; −inf is a limit in
``logp`` and ``ref_logp``, and in ``old_logp`` only where ``behavior_logp`` is given (ρ = π_old/μ = 0).
A non-bool mask must hold only 0 and 1. Presets list their valid arguments, and a preset whose
published algorithm has a fixed reference warns once when called without ``ref_logp``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import rpg
from rpg import losses as rpg_losses
from rpg._util import LOGP_TOL, LOGP_TOL_HALF, trusted_inputs
from rpg.fused import FusedLinearLoss
from rpg.logprobs import from_hidden

F64 = torch.float64
B, T = 3, 5


def batch(dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2 - 0.3
    logp = (old + 0.1 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-0.01)
    ref = (old + 0.1 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-0.01)
    beh = (old + 0.1 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-0.01)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    adv = torch.tensor([1.0, -0.5, 0.25], dtype=F64)
    cast = lambda x: x.to(dtype)  # noqa: E731
    return dict(
        logp=cast(logp).requires_grad_(True),
        old_logp=cast(old),
        advantages=cast(adv),
        mask=mask,
        ref_logp=cast(ref),
        behavior_logp=cast(beh),
    )


LOSS = rpg.RPGLoss("urkl", style="reinforce", beta=0.1)


def call(d, fn=LOSS):
    d = dict(d)
    return fn(d.pop("logp"), d.pop("old_logp"), d.pop("advantages"), d.pop("mask"), **d)


def poke(d, name, value, where=(0, 1)):
    x = d[name].detach().clone()
    x[where] = value
    return {**d, name: x.requires_grad_(True) if name == "logp" else x}


# --- log-probabilities above 0: logits or probabilities ---------------------------------------


@pytest.mark.parametrize("name", ["logp", "old_logp", "ref_logp", "behavior_logp"])
def test_logits_or_probabilities_are_refused(name):
    d = batch()
    d = {**d, name: d[name].detach() + 4.0}  # logits of sampled tokens lie far above 0
    with pytest.raises(ValueError, match=rf"{name} has values > 0 .*looks like logits or probabilities.*from_logits"):
        call(d)
    probs = batch()
    probs = {**probs, name: probs[name].detach().exp()}  # probabilities in (0, 1)
    with pytest.raises(ValueError, match=rf"{name} has values > 0"):
        call(probs)


@pytest.mark.parametrize("dtype,tol", [(F64, LOGP_TOL), (torch.float32, LOGP_TOL), (torch.bfloat16, LOGP_TOL_HALF)])
def test_rounding_above_zero_is_accepted_and_the_tolerance_is_what_the_docs_say(dtype, tol):
    d = batch(dtype)
    ok = poke(d, "logp", torch.tensor(tol / 2).to(dtype))
    assert torch.isfinite(call(ok).loss)
    bad = poke(d, "logp", torch.tensor(tol * 4).to(dtype))
    with pytest.raises(ValueError, match="logp has values > 0"):
        call(bad)


def test_padding_is_never_read():
    """Anything at a masked position (logits, NaN, ±inf) passes: the loss never reads it."""
    d = batch()
    for name in ("logp", "old_logp", "ref_logp", "behavior_logp"):
        for v in (7.0, math.nan, math.inf, -math.inf):
            d = poke(d, name, v, where=(1, 4))
            assert torch.isfinite(call(d).loss)


# --- NaN and infinities --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["logp", "old_logp", "ref_logp", "behavior_logp"])
def test_nan_at_a_response_token_is_refused(name):
    with pytest.raises(ValueError, match=rf"{name} is NaN at 1 response token"):
        call(poke(batch(), name, math.nan))


@pytest.mark.parametrize("name", ["logp", "old_logp", "ref_logp", "behavior_logp"])
def test_plus_inf_is_refused(name):
    with pytest.raises(ValueError, match=rf"{name} is \+inf at 1 response token"):
        call(poke(batch(), name, math.inf))


def test_minus_inf_old_logp_is_refused_without_behavior_logp():
    d = poke(batch(), "old_logp", -math.inf)
    d.pop("behavior_logp")
    with pytest.raises(ValueError, match=r"old_logp is -inf at 1 response token.*sampled from π_old"):
        call(d)


def test_minus_inf_behavior_logp_is_refused():
    """Bypass mode (old_logp = behavior_logp) with a −inf log-prob: μ sampled a token it gives probability 0."""
    d = poke(batch(), "old_logp", -math.inf)
    d["behavior_logp"] = d["old_logp"]
    with pytest.raises(ValueError, match=r"behavior_logp is -inf at 1 response token.*rollout engine"):
        call(d)


def test_minus_inf_old_logp_with_behavior_logp_is_a_zero_weight():
    """π_old = 0 where μ sampled: ρ = π_old/μ = 0, the token's (truncated) correction weight is 0."""
    d = poke(batch(), "old_logp", -math.inf)
    out = call(d)
    out.loss.backward()
    assert out.per_token[0, 1].item() == 0.0 and d["logp"].grad[0, 1].item() == 0.0
    assert torch.isfinite(out.loss) and torch.isfinite(d["logp"].grad).all()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_minus_inf_logp_keeps_its_limit_semantics(dtype):
    d = poke(batch(dtype), "logp", -math.inf)
    out = call(d)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(d["logp"].grad).all()


def test_minus_inf_ref_logp_is_accepted():
    """π_ref = 0 at a sampled token: the KL to π_ref is infinite there, and the loss says so (never NaN)."""
    d = poke(batch(), "ref_logp", -math.inf)
    for fn in (LOSS, rpg.RPGLoss("rkl", beta=0.1), rpg.RPGLoss("ufkl", beta=0.1, style="reinforce")):
        out = call(d, fn)
        out.loss.backward()
        assert not torch.isnan(out.loss) and not torch.isnan(d["logp"].grad).any()
        d["logp"].grad = None
    urkl = call(d, rpg.RPGLoss("urkl", beta=0.1, clip=None))  # w·(1/ρ − 1 + log ρ) with log ρ = +∞
    assert urkl.per_token[0, 1].item() == math.inf


# --- masks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, math.nan])
def test_a_soft_mask_is_refused_and_points_to_weights(value):
    d = batch()
    mask = d["mask"].double()
    mask[0, 2] = value
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1.*weights="):
        call({**d, "mask": mask})


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.int64, torch.uint8, torch.bfloat16])
def test_a_zero_one_mask_of_any_dtype_equals_the_bool_mask(dtype):
    d = batch()
    want = call(d)
    got = call({**d, "mask": d["mask"].to(dtype)})
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)


def test_an_empty_mask_gives_zero():
    d = batch()
    out = call({**d, "mask": torch.zeros(B, T, dtype=torch.bool)})
    out.loss.backward()
    assert out.loss.item() == 0.0 and not d["logp"].grad.any()
    empty = {k: v[:0] for k, v in batch().items()}  # a [0, T] batch
    assert call(empty).loss.item() == 0.0


def test_bf16_inputs_are_checked_and_computed_in_float32():
    d = batch(torch.bfloat16)
    assert call(d).loss.dtype == torch.float32
    with pytest.raises(ValueError, match="old_logp has values > 0"):
        call({**d, "old_logp": d["old_logp"] + 3})


# --- shapes: the argument that is wrong is named -----------------------------------------------------


def test_a_transposed_logp_is_named():
    d = batch()
    t = {k: (v.detach().T.contiguous() if k != "advantages" else v) for k, v in d.items()}
    with pytest.raises(ValueError, match=r"advantages must have shape .*for logp of shape .*is logp transposed"):
        call(t)
    only = {**d, "logp": d["logp"].detach().T.contiguous()}
    with pytest.raises(
        ValueError, match=r"old_logp has shape \(3, 5\) but logp has shape \(5, 3\).*is logp transposed"
    ):
        call(only)


def test_mask_shape_is_checked_before_advantages():
    d = batch()
    with pytest.raises(ValueError, match="mask has shape"):
        call({**d, "mask": d["mask"][:, :2], "advantages": torch.zeros(7, dtype=F64)})


# --- the checks cost no sync and stay out of compiled graphs and torch.func -------------------------


def test_checks_are_skipped_under_torch_func_and_inside_trusted_inputs():
    """Under a torch.func transform no data-dependent check can run: the loss still computes."""
    d = batch()
    logp = d["logp"].detach()

    def loss(x):
        return LOSS(x, d["old_logp"], d["advantages"], d["mask"], ref_logp=d["ref_logp"]).loss

    g = torch.func.grad(loss)(logp)
    torch.testing.assert_close(g, torch.autograd.grad(loss(logp.requires_grad_(True)), logp)[0])
    bad = poke(d, "old_logp", math.nan)
    with trusted_inputs():  # internal: a caller that validated once (the fused head's chunks)
        call(bad)
    with pytest.raises(ValueError, match="old_logp is NaN"):
        call(bad)


def test_checks_compile_with_fullgraph():
    torch._dynamo.reset()
    d = batch(torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def f(logp, old, adv, mask, ref):
        return LOSS(logp, old, adv, mask.float(), ref_logp=ref).loss

    got = f(d["logp"], d["old_logp"], d["advantages"], d["mask"], d["ref_logp"])
    want = LOSS(d["logp"], d["old_logp"], d["advantages"], d["mask"], ref_logp=d["ref_logp"]).loss
    torch.testing.assert_close(got, want)


# --- the fused head validates the same way --------------------------------------------------------


def fused_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, 6, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(13, 6, generator=g, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, 13, (B, T), generator=g)
    with torch.no_grad():
        old = from_hidden(h, w, tokens)
    return h, w, tokens, old


@pytest.mark.parametrize("name", ["old_logp", "ref_logp", "behavior_logp"])
def test_fused_head_refuses_the_same_inputs(name):
    h, w, tokens, old = fused_batch()
    kw = {"ref_logp": old.clone(), "behavior_logp": old.clone()}
    args = {"old_logp": old, **kw}
    args[name] = args[name] + 3.0
    fused = FusedLinearLoss(rpg.DAPOLoss())
    with pytest.raises(ValueError, match=rf"{name} has values > 0"):
        fused(h, w, tokens, args.pop("old_logp"), torch.ones(B, dtype=F64), **args)
    with pytest.raises(ValueError, match="weights="):
        fused(h, w, tokens, old, torch.ones(B, dtype=F64), torch.full((B, T), 0.5, dtype=F64))


# --- presets: unknown arguments and the reference -------------------------------------------------


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: rpg.GRPOLoss(epsilon=0.2), r"'epsilon': did you mean clip=rpg\.Clip\(low=…, high=…\)"),
        (lambda: rpg.GRPOLoss(epsilon_high=0.28), r"clip=rpg\.Clip"),
        (lambda: rpg.DAPOLoss(clip_ratio_high=0.28), r"clip=rpg\.Clip"),
        (lambda: rpg.RPGLoss("rkl", kl_coef=0.1), r"'kl_coef': did you mean beta="),
        (lambda: rpg.GRPOLoss(loss_agg_mode="token-mean"), r"did you mean agg="),
        (lambda: rpg.RPGLoss("rkl", betta=0.1), r"'betta': did you mean beta="),
        (lambda: rpg.DAPOLoss(beta=0.1), r"DAPOLoss has no 'beta' setting"),
        (lambda: rpg.PolicyLoss(clip_ratio_c=3.0), r"clip=rpg\.Clip\(dual=…\)"),
        (lambda: rpg.CISPOLoss(entropy_coeff=0.1), r"did you mean entropy_coef="),
    ],
)
def test_unknown_preset_arguments_list_the_valid_ones_and_suggest(build, match):
    with pytest.raises(TypeError, match="unexpected argument") as err:
        build()
    assert "valid arguments:" in str(err.value)
    assert __import__("re").search(match, str(err.value)), str(err.value)


def test_every_loss_class_gets_the_argument_check_and_keeps_its_signature():
    """The check applies to every subclass by itself (``__init_subclass__``), also one defined later."""

    class MyLoss(rpg.presets.DAPOLoss):
        __slots__ = ()

        def __init__(self, clip=rpg.Clip(0.1, 0.1, None)):
            super().__init__(clip=clip)

    with pytest.raises(TypeError, match=r"MyLoss got unexpected argument\(s\) 'epsilon'; valid arguments: clip"):
        MyLoss(epsilon=0.1)
    assert MyLoss().clip == rpg.Clip(0.1, 0.1, None)
    import inspect

    assert list(inspect.signature(rpg.GRPOLoss).parameters)[:2] == ["beta", "clip"]
    with pytest.raises(TypeError, match=r"DrGRPOLoss: missing a required argument: 'max_len'; valid arguments"):
        rpg.DrGRPOLoss()


@pytest.mark.parametrize("make", [lambda: rpg.GRPOLoss(), lambda: rpg.OnPolicyDistillationLoss()])
def test_a_preset_with_a_fixed_reference_warns_once_without_ref_logp(make, monkeypatch):
    monkeypatch.setattr(rpg_losses, "_WARNED_NO_REF", set())
    d = batch()
    d.pop("ref_logp")
    d.pop("behavior_logp")
    fn = make()
    with pytest.warns(UserWarning, match=r"without ref_logp: ref_logp=None means π_ref = π_old.*ref_logp=old_logp"):
        call(d, fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(d, fn)  # once per class
        call({**d, "ref_logp": d["old_logp"]}, make())  # the explicit choice is silent
        call(d, rpg.RPGLoss("urkl", beta=0.1))  # RPG's iterative reference is the documented default
        call(d, rpg.GRPOLoss(beta=0.0))  # no KL term: no reference needed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checks_cost_no_host_device_sync_on_cuda():
    """On an accelerator the checks are asynchronous device assertions: a call (with every log-prob input
    and a float mask, advantages and weights) runs under CUDA's sync-debug mode "error", which raises on any
    host-device sync."""
    d = {k: v.detach().cuda() for k, v in batch(torch.float32).items()}
    d["weights"] = torch.rand(B, T, device="cuda")
    d["logp"].requires_grad_(True)
    d["mask"] = d["mask"].float()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = call(d)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.loss).item()


def test_unnormalized_policies_accept_log_measures_above_zero_and_nothing_else():
    """rpg.testing's normalized=False oracles evaluate the losses on log-measures of any sign."""
    d = batch()
    above = {**d, "logp": (d["logp"].detach() + 2).requires_grad_(True), "ref_logp": d["ref_logp"] + 1}
    with rpg.unnormalized_policies():
        with rpg.unnormalized_policies():  # nests
            assert torch.isfinite(call(above).loss)
        assert torch.isfinite(call(above).loss)
        with pytest.raises(ValueError, match="old_logp is NaN"):
            call(poke(above, "old_logp", math.nan))
        with pytest.raises(ValueError, match=r"logp is \+inf"):
            call(poke(above, "logp", math.inf))
    with pytest.raises(ValueError, match="logp has values > 0"):  # restored on exit
        call(above)


# --- advantages and weights: NaN and infinities at response tokens ---------------------------------


def _with(d, name, value, where):
    x = (torch.rand(B, T, dtype=F64) if name == "weights" and name not in d else d[name]).detach().clone()
    x[where] = value
    return {**d, name: x}


@pytest.mark.parametrize("value,word", [(math.nan, "NaN"), (math.inf, r"\+inf"), (-math.inf, "-inf")])
@pytest.mark.parametrize(
    "name,where,count",
    [("advantages", 0, T), ("advantages", (0, 1), 1), ("weights", (0, 1), 1)],
    ids=["advantages[B]", "advantages[B,T]", "weights"],
)
def test_a_non_finite_advantage_or_weight_at_a_response_token_is_refused(name, where, count, value, word):
    """One NaN advantage would make the loss NaN silently: refused like the log-probs, naming the argument."""
    d = batch()
    if where != 0:  # a token-level advantage
        d["advantages"] = d["advantages"][:, None].expand(B, T).clone()
    d = _with(d, name, value, where)
    with pytest.raises(ValueError, match=rf"{name} is {word} at {count} response token"):
        call(d)
    if name == "advantages":  # the advantage estimators refuse their own non-finite inputs already
        with pytest.raises(ValueError, match="rewards must be finite"):
            rpg.advantages.grpo(torch.tensor([1.0, value, 0.0, 1.0]), 2)


def test_a_non_finite_advantage_or_weight_at_padding_is_inert():
    """Padding is never read: a NaN/inf advantage of an all-padding row, or at a padded token, and a NaN/inf
    weight at padding pass, and the loss equals the clean call's."""
    d = batch()
    d["mask"] = d["mask"].clone()
    d["mask"][2] = False  # row 2 is all padding
    d["weights"] = torch.rand(B, T, dtype=F64)
    want = call(d).loss
    for v in (math.nan, math.inf, -math.inf):
        got = call(_with(_with(d, "advantages", v, 2), "weights", v, (1, 4))).loss
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        tok = {**d, "advantages": d["advantages"][:, None].expand(B, T).clone()}
        got = call(_with(tok, "advantages", v, (1, 4))).loss
        torch.testing.assert_close(got, call(tok).loss, rtol=0, atol=0)


def test_advantage_and_weight_checks_are_skipped_inside_trusted_inputs_and_under_compile():
    d = _with(batch(torch.float32), "advantages", math.nan, 0)
    with trusted_inputs():
        assert torch.isnan(call(d).loss)  # unchecked: the caller vouched for the inputs
    torch._dynamo.reset()
    d = batch(torch.float32)
    w = torch.rand(B, T)

    @torch.compile(fullgraph=True, backend="eager")
    def f(logp, old, adv, mask, weights):
        return LOSS(logp, old, adv, mask, weights=weights).loss

    got = f(d["logp"], d["old_logp"], d["advantages"], d["mask"], w)
    torch.testing.assert_close(got, LOSS(d["logp"], d["old_logp"], d["advantages"], d["mask"], weights=w).loss)


@pytest.mark.parametrize("loss", [rpg.GSPOLoss(), rpg.GMPOLoss(), rpg.VESPOLoss()], ids=["gspo", "gmpo", "vespo"])
def test_a_minus_inf_old_logp_under_a_sequence_ratio_is_refused_even_with_a_behaviour_policy(loss):
    """With μ a token's π_old may be 0 (ρ = 0 at that token), but a sequence ratio multiplies every token's
    π_θ/π_old: one π_old = 0 makes it infinite, and the loss and its gradient were inf/NaN. Refused, naming
    old_logp, in the loss and in the fused head; a token-level loss keeps accepting it."""
    d = batch()
    old = d["old_logp"].detach().clone()
    old[0, 1] = -math.inf
    behavior = d["old_logp"].detach().clone()
    args = (d["logp"], old, d["advantages"], d["mask"])
    with pytest.raises(ValueError, match=r"old_logp is -inf at 1 response token.*sequence ratio"):
        loss(*args, behavior_logp=behavior)
    out = rpg.DAPOLoss()(*args, behavior_logp=behavior)
    (grad,) = torch.autograd.grad(out.loss, d["logp"])
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    h, w, tokens, fused_old = fused_batch()
    fused_old = fused_old.clone()
    fused_old[0, 1] = -math.inf
    with pytest.raises(ValueError, match="sequence ratio"):
        FusedLinearLoss(loss)(h, w, tokens, fused_old, torch.ones(B, dtype=F64), behavior_logp=fused_old.clamp(min=-5))


@pytest.mark.parametrize("name", ["advantages", "weights"])
def test_a_wide_advantage_or_weight_that_overflows_the_compute_dtype_is_refused(name):
    """The loss computes in float32 for float32 log-probs: a float64 advantage or weight of 1e39 is finite as
    passed but +inf as the loss reads it (the loss was −inf, silently). The check reads the value the loss
    reads."""
    d = batch(torch.float32)
    d["advantages"], d["weights"] = d["advantages"].to(F64), torch.ones(B, T, dtype=F64)
    d = _with(d, name, 1e39, (0,) if name == "advantages" else (0, 1))
    with pytest.raises(ValueError, match=rf"{name} is \+inf at"):
        call(d)
    d = _with(d, name, 1e30, (0,) if name == "advantages" else (0, 1))  # representable in float32: accepted
    assert torch.isfinite(call(d).loss)
