"""torch.compile with dynamic shapes: the plain losses compile once for every sequence length, and the fused
LM head + loss runs under torch.compile (as one eager unit inside a compiled step, or with its per-chunk loss
compiled)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import rpg
from rpg import fused as fused_mod
from rpg.fused import FusedLinearLoss

LOSSES = {
    "dapo": rpg.DAPOLoss(),
    "gspo": rpg.GSPOLoss(clip=rpg.Clip(0.2, 0.2, None)),
    "grpo": rpg.GRPOLoss(beta=0.1),
    "rpg-urkl-reinforce": rpg.RPGLoss("urkl", style="reinforce", beta=0.1, agg="seq-mean-token-sum"),
    "dr-grpo": rpg.DrGRPOLoss(max_len=64),
    "cispo": rpg.CISPOLoss(),
}
LENGTHS = [16, 24, 40, 9, 33]  # never 0 or 1: dynamo specialises those sizes even with dynamic=True


def batch(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    logp = (-3 * torch.rand(b, t, generator=g)).requires_grad_(True)
    old = (logp.detach() + 0.2 * torch.randn(b, t, generator=g)).clamp(max=0)  # log-probs: <= 0
    ref = (logp.detach() + 0.2 * torch.randn(b, t, generator=g)).clamp(max=0)
    return logp, old, torch.randn(b, generator=g), torch.rand(b, t, generator=g) > 0.2, ref


@pytest.mark.parametrize("name", list(LOSSES))
def test_no_recompile_when_the_length_changes(name):
    """torch.compile(dynamic=True) of a loss step compiles once, then serves every T (and B) unchanged."""
    loss_fn = LOSSES[name]
    torch._dynamo.reset()
    counter = CompileCounter()

    def step(logp, old, adv, mask, ref):
        return loss_fn(logp, old, adv, mask, ref_logp=ref).loss

    compiled = torch.compile(step, dynamic=True, backend=counter)
    frames = None
    for i, t in enumerate(LENGTHS):
        logp, old, adv, mask, ref = batch(3 + i % 2, t, seed=i)
        got = compiled(logp, old, adv, mask, ref)
        (g_got,) = torch.autograd.grad(got, logp)
        want = step(logp, old, adv, mask, ref)
        (g_want,) = torch.autograd.grad(want, logp)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-7)
        if frames is None:
            frames = counter.frame_count
            assert frames >= 1 and counter.op_count > 0, "nothing was captured: the test would check nothing"
    assert counter.frame_count == frames, f"recompiled when T changed: {counter.frame_count} frames, first T: {frames}"


def _fused_inputs(t, seed=0, b=4, h=8, v=100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    tokens = torch.randint(0, v, (b, t), generator=g)
    old = -3 * torch.rand(b, t, generator=g)
    return hidden, tokens, old, torch.randn(b, generator=g), torch.rand(b, t, generator=g) > 0.2


def test_fused_inside_a_compiled_step():
    """A compiled train step that calls the fused loss: one graph around it, same loss and gradients as eager."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(100, 8, generator=g).requires_grad_(True)
    layer = torch.nn.Linear(8, 8)
    fused = FusedLinearLoss(rpg.GRPOLoss(beta=0.1), chunk_size=10)

    def step(x, tokens, old, adv, mask):
        return fused(torch.tanh(layer(x)), weight, tokens, old, adv, mask, ref_logp=old).loss

    compiled = torch.compile(step, backend=counter)
    for t in (16, 16, 12):
        x, tokens, old, adv, mask = _fused_inputs(t)
        x.requires_grad_(True)
        params = (x, weight, layer.weight)
        want = torch.autograd.grad(step(x, tokens, old, adv, mask), params)
        got = torch.autograd.grad(compiled(x, tokens, old, adv, mask), params)
        for a, b in zip(got, want, strict=False):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert counter.frame_count >= 1


@pytest.mark.parametrize("counts", [False, True], ids=["whole-batch", "row-shards"])
def test_fused_compiled_per_chunk_loss(counts, monkeypatch):
    """compile=True compiles the per-chunk loss call; chunks and lengths reuse it (no recompile per chunk)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(fused_mod.torch, "compile", lambda fn, **kw: real_compile(fn, **dict(kw, backend=counter)))
    loss_fn = rpg.DAPOLoss()
    fused, eager = FusedLinearLoss(loss_fn, chunk_size=10, compile=True), FusedLinearLoss(loss_fn, chunk_size=10)
    weight = torch.randn(100, 8).requires_grad_(True)
    frames = []
    for t in (16, 24, 40):
        hidden, tokens, old, adv, mask = _fused_inputs(t, seed=t)
        hidden.requires_grad_(True)
        kw = {"batch_num_tokens": 100, "global_batch_size": 4} if counts else {}
        got = fused(hidden, weight, tokens, old, adv, mask, **kw)
        want = eager(hidden, weight, tokens, old, adv, mask, **kw)
        wrt = (hidden, weight)
        for a, b in zip(torch.autograd.grad(got.loss, wrt), torch.autograd.grad(want.loss, wrt), strict=False):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        frames.append(counter.frame_count)
    assert counter.op_count > 0
    assert frames == [frames[0]] * len(frames), f"compiled again for a new T: frames after each call {frames}"


def test_from_logits_compiles_with_fullgraph():
    """The CPU token-range check is a data-dependent guard: it is skipped while compiling, so a compiled
    train step keeps one graph through the log-probs."""
    import rpg

    f = torch.compile(lambda logits, t: rpg.logprobs.from_logits(logits, t).sum(), fullgraph=True)
    logits, tokens = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(f(logits, tokens), rpg.logprobs.from_logits(logits, tokens).sum())
