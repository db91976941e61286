"""rpg.FusedLinearLoss equals rpg.logprobs.from_hidden + the same loss: values, per_token, metrics and the
gradients of hidden, weight and bias, in float64, for every loss family, aggregation and chunking."""

import inspect

import pytest
import torch

import rpg
from rpg import fused as fused_mod
from rpg.fused import FusedLinearLoss
from rpg.logprobs import from_hidden

F64 = torch.float64
B, T, H, V = 5, 7, 6, 50
TEMP = 0.7
OPTIONS = "entropy_coef" in inspect.signature(rpg.PolicyLoss).parameters  # weights, entropy, behaviour policy
needs_options = pytest.mark.skipif(not OPTIONS, reason="this rpg has no entropy_coef / weights / behavior_logp")

# (chunk_size, vocab_chunk_size, pass the global counts, skip_masked): chunks that cut sequences (3), hold one
# token (1), exactly one row (7), cross row boundaries (13), the whole batch (None); whole-vocabulary logits
# and vocabulary blocks; the row-shard path (counts given) and the whole-batch path (counts not given);
# masked positions skipped (the CPU default) or computed.
CHUNKINGS = [
    (None, None, False, None),
    (3, None, False, None),
    (1, 16, True, None),
    (7, None, True, False),
    (13, 16, False, False),
    (13, None, True, None),
    (3, None, True, False),
    (4, None, False, True),
]


def make(seed=0, *, neg_inf_block=True, adv_shape="seq"):
    """A float64 batch: hidden [B, T, H], head [V, H] + bias (a −inf block at 10:20), log-probs nearby."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64)
    bias = torch.randn(V, generator=g, dtype=F64)
    if neg_inf_block:
        bias[10:20] = -float("inf")
    tokens = torch.randint(20, V, (B, T), generator=g)
    with torch.no_grad():
        logp = from_hidden(hidden, weight, tokens, bias=bias, temperature=TEMP)
    noise = lambda s: s * torch.randn(B, T, generator=g, dtype=F64)  # noqa: E731
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[2] = False  # a fully masked sequence (does not count in S)
    return {
        "hidden": hidden.requires_grad_(True),
        "weight": weight.requires_grad_(True),
        "bias": bias.requires_grad_(True),
        "tokens": tokens,
        "old_logp": (logp + noise(0.3)).clamp(max=0),  # log-probabilities: <= 0
        "ref_logp": (logp + noise(0.3)).clamp(max=0),
        "behavior_logp": (logp + noise(0.4)).clamp(max=0),
        "advantages": torch.randn(B if adv_shape == "seq" else (B, T), generator=g, dtype=F64),
        "weights": torch.rand(B, T, generator=g, dtype=F64),
        "mask": mask,
    }


def reference(loss_fn, d, *, counts=None, options=(), advantages=...):
    """from_hidden + loss_fn with plain autograd: (output, (grad hidden, grad weight, grad bias))."""
    want_entropy = getattr(loss_fn, "entropy_coef", 0) > 0
    lp = from_hidden(
        d["hidden"], d["weight"], d["tokens"], bias=d["bias"], temperature=TEMP, return_entropy=want_entropy
    )
    kw = dict(counts or {}, ref_logp=d["ref_logp"], **{k: d[k] for k in options})
    if want_entropy:
        lp, kw["entropy"] = lp
    adv = d["advantages"] if advantages is ... else advantages
    out = loss_fn(lp, d["old_logp"], adv, d["mask"], **kw)
    return out, torch.autograd.grad(out.loss, (d["hidden"], d["weight"], d["bias"]))


def fused(loss_fn, d, *, chunk_size=None, vocab_chunk_size=None, counts=None, options=(), advantages=..., **extra):
    f = FusedLinearLoss(loss_fn, chunk_size, vocab_chunk_size, **extra)
    adv = d["advantages"] if advantages is ... else advantages
    kw = dict(counts or {}, **{k: d[k] for k in options})
    return f(
        d["hidden"],
        d["weight"],
        d["tokens"],
        d["old_logp"],
        adv,
        d["mask"],
        bias=d["bias"],
        temperature=TEMP,
        ref_logp=d["ref_logp"],
        **kw,
    )


def assert_same(loss_fn, d, *, options=(), advantages=..., chunkings=CHUNKINGS):
    for chunk_size, vocab_chunk_size, with_counts, skip_masked in chunkings:
        counts = {"batch_num_tokens": 17, "global_batch_size": 6} if with_counts else None
        ref, ref_grads = reference(loss_fn, d, counts=counts, options=options, advantages=advantages)
        out = fused(
            loss_fn,
            d,
            chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size,
            counts=counts,
            options=options,
            advantages=advantages,
            skip_masked=skip_masked,
        )
        grads = torch.autograd.grad(out.loss, (d["hidden"], d["weight"], d["bias"]))
        where = (
            f"chunk_size={chunk_size}, vocab_chunk_size={vocab_chunk_size}, counts={with_counts}, skip={skip_masked}"
        )
        torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12, msg=f"loss ({where})")
        torch.testing.assert_close(
            out.per_token, ref.per_token.detach(), rtol=0, atol=1e-12, msg=f"per_token ({where})"
        )
        for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
            assert torch.isfinite(g).all(), f"grad {name} not finite ({where})"
            torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=f"grad {name} ({where})")
        assert out.metrics.keys() == ref.metrics.keys()
        for k in ref.metrics:
            assert out.metrics[k] == pytest.approx(ref.metrics[k], abs=1e-12), k
    assert any(g.abs().sum() > 0 for g in grads), "a test whose gradients are all zero checks nothing"


LOSSES = {
    **{f"rpg-{d}-{s}": rpg.RPGLoss(d, style=s, beta=0.1) for d in rpg.DIVERGENCES for s in rpg.STYLES},
    **{
        f"rpg-{d}-{s}-noclip": rpg.RPGLoss(d, style=s, beta=0.1, clip=None) for d in rpg.DIVERGENCES for s in rpg.STYLES
    },
    "rpg-urkl-reinforce-truncate": rpg.RPGLoss("urkl", style="reinforce", beta=0.1, clip=rpg.Truncate(0.2, 0.5)),
    "rpg-rkl-fold": rpg.RPGLoss("rkl", beta=0.1, fold_kl=True),
    "grpo-k3": rpg.GRPOLoss(beta=0.1),
    "grpo-iw": rpg.GRPOLoss(beta=0.1, importance_weighted_kl=True),
    "dr-grpo": rpg.DrGRPOLoss(max_len=10),
    "dapo": rpg.DAPOLoss(),
    "gspo": rpg.GSPOLoss(),
    "gspo-wide": rpg.GSPOLoss(clip=rpg.Clip(0.2, 0.2, None)),
    "cispo": rpg.CISPOLoss(),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_equals_from_hidden_plus_loss(name):
    assert_same(LOSSES[name], make())


def test_reinforce_pp_token_advantages():
    assert_same(rpg.REINFORCEPlusPlusLoss(), make(adv_shape="token"))


def test_on_policy_distillation_no_advantages():
    assert_same(rpg.OnPolicyDistillationLoss(), make(), advantages=None)


@pytest.mark.parametrize("agg", rpg.AGG_MODES)
@pytest.mark.parametrize("ratio", rpg.RATIOS)
def test_every_aggregation(agg, ratio):
    kl = "k3" if ratio == "token" else None  # GSPO's sequence ratio without a KL term
    product = ratio == "product"  # VESPO's: REINFORCE style, no clip
    loss_fn = rpg.PolicyLoss(
        kl=kl,
        beta=0.1 if kl else 0.0,
        clip=None if product else rpg.Clip(0.2, 0.28, 3.0 if kl else None),
        style="reinforce" if product else "differentiable",
        agg=agg,
        ratio=ratio,
        max_len=9 if agg == "seq-mean-token-sum-norm" else None,
    )
    assert_same(loss_fn, make(1))


@needs_options
@pytest.mark.parametrize(
    "loss_fn",
    [
        pytest.param(lambda: rpg.DAPOLoss(entropy_coef=0.1), id="dapo-entropy"),
        pytest.param(lambda: rpg.GSPOLoss(clip=rpg.Clip(0.2, 0.2, None), entropy_coef=0.3), id="gspo-entropy"),
        pytest.param(
            lambda: rpg.RPGLoss(
                "urkl",
                style="reinforce",
                beta=0.1,
                agg="seq-mean-token-mean",
                entropy_coef=0.2,
                correction=rpg.RolloutCorrection(level="sequence", lower=0.5, upper=2.0),
            ),
            id="urkl-seq-correction-entropy",
        ),
        pytest.param(
            lambda: rpg.RPGLoss(
                "fkl",
                beta=0.1,
                correction=rpg.RolloutCorrection(mode="mask", lower=0.8, upper=1.25, count_rejected=False),
            ),
            id="fkl-mask-correction-uncounted",
        ),
    ],
)
def test_weights_behaviour_policy_entropy(loss_fn):
    """The loss options flow through: weights=, behavior_logp= (with its correction) and the entropy bonus."""
    assert_same(loss_fn(), make(2), options=("weights", "behavior_logp"))


@needs_options
def test_entropy_bonus_changes_the_gradient():
    """The entropy term reaches the head's gradient (so its closed form is exercised, not skipped)."""
    d = make(3)
    plain = torch.autograd.grad(fused(rpg.DAPOLoss(), d).loss, d["weight"])[0]
    bonus = torch.autograd.grad(fused(rpg.DAPOLoss(entropy_coef=0.5), d).loss, d["weight"])[0]
    assert (plain - bonus).abs().max() > 1e-3


def test_backward_scales_by_the_incoming_gradient():
    d = make(4)
    loss_fn = rpg.RPGLoss("fkl", beta=0.1)
    _, ref_grads = reference(loss_fn, d)
    out = fused(loss_fn, d, chunk_size=4)
    (-2.5 * out.loss).backward()
    for name, r in zip(("hidden", "weight", "bias"), ref_grads, strict=False):
        torch.testing.assert_close(d[name].grad, -2.5 * r, rtol=0, atol=1e-10)


def test_frozen_head_and_no_bias():
    """Only the tensors that require grad get one (a frozen head under LoRA gets none)."""
    d = make(5, neg_inf_block=False)
    d["weight"].requires_grad_(False)
    loss_fn = rpg.DAPOLoss()
    lp = from_hidden(d["hidden"], d["weight"], d["tokens"], temperature=TEMP)
    ref = loss_fn(lp, d["old_logp"], d["advantages"], d["mask"])
    (g_ref,) = torch.autograd.grad(ref.loss, d["hidden"])
    out = FusedLinearLoss(loss_fn, chunk_size=3)(
        d["hidden"], d["weight"], d["tokens"], d["old_logp"], d["advantages"], d["mask"], temperature=TEMP
    )
    out.loss.backward()
    torch.testing.assert_close(d["hidden"].grad, g_ref, rtol=0, atol=1e-10)
    assert d["weight"].grad is None


def test_no_grad_mode_evaluates_the_loss():
    d = make(6)
    loss_fn = rpg.GRPOLoss(beta=0.1)
    ref, _ = reference(loss_fn, d)
    with torch.no_grad():
        out = fused(loss_fn, d, chunk_size=3)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12)
    for k in ("hidden", "weight", "bias"):  # inputs that need no gradient: the same lean path
        d[k] = d[k].detach()
    out = fused(loss_fn, d, vocab_chunk_size=16)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12)


def test_empty_mask_and_empty_batch():
    d = make(7)
    d["mask"] = torch.zeros(B, T, dtype=torch.bool)
    out = fused(rpg.DAPOLoss(), d, chunk_size=3)
    grads = torch.autograd.grad(out.loss, (d["hidden"], d["weight"], d["bias"]))
    assert out.loss.item() == 0 and all((g == 0).all() for g in grads)
    h = torch.zeros(0, T, H, dtype=F64, requires_grad=True)
    z = torch.zeros(0, T, dtype=F64)
    empty_tokens = torch.zeros(0, T, dtype=torch.long)
    out = FusedLinearLoss(rpg.DAPOLoss())(h, d["weight"], empty_tokens, z, torch.zeros(0, dtype=F64))
    g_h, g_w = torch.autograd.grad(out.loss, (h, d["weight"]))
    assert out.loss.item() == 0 and g_h.shape == h.shape and (g_w == 0).all()


def test_ignore_index():
    """Positions with the ignore id: log-prob 0, no gradient, out of the loss and its counts."""
    d = make(8)
    ignored = torch.zeros(B, T, dtype=torch.bool)
    ignored[0, 3:] = ignored[4, 1] = True
    loss_fn = rpg.GRPOLoss(beta=0.1)  # per-sequence means: the count n_b must drop the ignored tokens
    ref_d = dict(d, mask=d["mask"] & ~ignored)
    ref, ref_grads = reference(loss_fn, ref_d)
    d["tokens"] = d["tokens"].masked_fill(ignored, -100)
    out = fused(loss_fn, d, chunk_size=3, ignore_index=-100)
    grads = torch.autograd.grad(out.loss, (d["hidden"], d["weight"], d["bias"]))
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=False):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    assert (grads[0][ignored] == 0).all() and (out.per_token[ignored] == 0).all()
    with pytest.raises(ValueError, match="ignore_index"):  # without ignore_index, -100 is an out-of-range id
        fused(loss_fn, d)


def test_bf16_close_to_float32(monkeypatch):
    """bf16 head and hidden states: computed in float32 (upcast in vocabulary blocks), gradients in bf16."""
    monkeypatch.setattr(fused_mod, "_CAST_BLOCK", 16)  # several upcast blocks for V = 50
    d = make(9, neg_inf_block=False)
    half = {k: d[k].detach().to(torch.bfloat16).requires_grad_(True) for k in ("hidden", "weight", "bias")}
    exact = {k: half[k].detach().double().requires_grad_(True) for k in half}  # the same rounded numbers
    loss_fn = rpg.RPGLoss("urkl", beta=0.1)
    ref, ref_grads = reference(loss_fn, dict(d, **exact))
    out = fused(loss_fn, dict(d, **half), chunk_size=4)
    grads = torch.autograd.grad(out.loss, tuple(half.values()))
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    for g, r, _x in zip(grads, ref_grads, half.values(), strict=False):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), r, rtol=1e-2, atol=1e-2 * r.abs().max().item())


def test_large_odd_vocabulary_with_the_largest_logit_in_the_tail():
    """V = 4163: several vocabulary slices of the entropy's column sums (1024) and not a multiple of
    the column maximum's fold (64); the largest logit (800, beyond exp's float64 range from any other
    shift) sits in the last, unfolded rows, so a maximum or a sum that missed them gives inf or NaN."""
    g = torch.Generator().manual_seed(12)
    b, t, h, v = 2, 3, 4, 4163
    hidden = torch.randn(b, t, h, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=F64)
    bias[-1], bias[-2] = 800.0, 799.0  # all of p in the unfolded tail rows, which lie in the second slice
    bias.requires_grad_(True)
    tokens = torch.tensor([[v - 1, v - 2, 4100], [5, v - 1, 4100]])
    with torch.no_grad():
        logp = from_hidden(hidden, weight, tokens, bias=bias)
    old_logp = (logp + 0.3 * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=0)
    adv = torch.tensor([1.0, -0.5], dtype=F64)
    loss_fn = rpg.DAPOLoss(entropy_coef=0.1) if OPTIONS else rpg.DAPOLoss()
    for chunk_size, vocab_chunk_size in ((None, None), (2, None), (4, 1000)):
        want = getattr(loss_fn, "entropy_coef", 0) > 0
        lp = from_hidden(hidden, weight, tokens, bias=bias, return_entropy=want)
        kw = {}
        if want:
            lp, kw["entropy"] = lp
        ref = loss_fn(lp, old_logp, adv, **kw)
        ref_grads = torch.autograd.grad(ref.loss, (hidden, weight, bias))
        out = FusedLinearLoss(loss_fn, chunk_size, vocab_chunk_size)(hidden, weight, tokens, old_logp, adv, bias=bias)
        grads = torch.autograd.grad(out.loss, (hidden, weight, bias))
        torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12)
        for gr, r in zip(grads, ref_grads, strict=False):
            assert torch.isfinite(gr).all()
            torch.testing.assert_close(gr, r, rtol=0, atol=1e-10)
        assert grads[2][-3:].abs().sum() > 1e-3  # the tail's logits carry the gradient


def test_default_chunk_keeps_the_logits_within_a_quarter_of_the_weight_gradient():
    """CPU default: H / 4 tokens (H / 8 with an entropy term), at least 32; so the [V, chunk] float32 blocks
    are at most a quarter of the [V, H] float32 weight-gradient accumulator once H ≥ 128."""
    assert fused_mod._default_chunk("cpu", 32000, 256, 1) == 64
    assert fused_mod._default_chunk("cpu", 32000, 4096, 2) == 512
    assert fused_mod._default_chunk("cpu", 32000, 64, 1) == 32
    for hdim in (128, 160, 256, 1000, 3584):
        for blocks in (1, 2):
            chunk = fused_mod._default_chunk("cpu", 151936, hdim, blocks)
            assert blocks * chunk * 4 <= hdim or chunk == 32
    assert fused_mod._default_chunk("cuda", 151936, 3584, 1) == 883
    # vocabulary blocks (vocab_chunk_size, or no gradient) do not grow with V: from_hidden's 1024 tokens
    assert fused_mod._default_chunk("cpu", 32000, 256, 1, whole_vocabulary=False) == 1024
    assert fused_mod._default_chunk("cuda", 151936, 3584, 2, whole_vocabulary=False) == 1024


@pytest.mark.parametrize("skip_masked", [True, False])
@pytest.mark.parametrize("chunk_size,vocab_chunk_size", [(None, None), (3, 16)])
def test_nan_hidden_states_at_padding_reach_no_gradient(skip_masked, chunk_size, vocab_chunk_size):
    """A NaN hidden state where the mask is 0 or the token is ignore_index leaves the loss and every gradient
    as if that position held any finite value, also when the logits of padding are computed
    (``skip_masked=False``, the accelerator default)."""
    d = make(13)
    masked = ~d["mask"]
    nan_hidden = d["hidden"].detach().masked_fill(masked.unsqueeze(-1), float("nan")).requires_grad_(True)
    clean = dict(d, hidden=d["hidden"].detach().masked_fill(masked.unsqueeze(-1), 0.0).requires_grad_(True))
    for loss_fn in (rpg.DAPOLoss(), rpg.DAPOLoss(entropy_coef=0.1) if OPTIONS else rpg.GRPOLoss(beta=0.1)):
        ref, ref_grads = reference(loss_fn, clean)
        out = fused(
            loss_fn,
            dict(d, hidden=nan_hidden),
            chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size,
            skip_masked=skip_masked,
        )
        grads = torch.autograd.grad(out.loss, (nan_hidden, d["weight"], d["bias"]))
        torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12)
        for g, r in zip(grads, ref_grads, strict=False):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    tokens = d["tokens"].masked_fill(masked, -100)  # the same positions marked by ignore_index instead
    f = FusedLinearLoss(rpg.DAPOLoss(), chunk_size, vocab_chunk_size, ignore_index=-100, skip_masked=skip_masked)
    out = f(nan_hidden, d["weight"], tokens, d["old_logp"], d["advantages"], bias=d["bias"], temperature=TEMP)
    ref, ref_grads = reference(rpg.DAPOLoss(), clean)
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12)
    for g, r in zip(torch.autograd.grad(out.loss, (nan_hidden, d["weight"], d["bias"])), ref_grads, strict=False):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_default_chunk_follows_the_block_shape(monkeypatch):
    """Whole-vocabulary blocks (the gradient path) get the H-proportional default; vocabulary blocks
    (vocab_chunk_size set, or no gradient) get from_hidden's 1024 tokens."""
    seen = []
    real = fused_mod._default_chunk
    monkeypatch.setattr(fused_mod, "_default_chunk", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    d = make(14)
    fused(rpg.DAPOLoss(), d)
    fused(rpg.DAPOLoss(), d, vocab_chunk_size=16)
    with torch.no_grad():
        fused(rpg.DAPOLoss(), d)
    assert seen == [real("cpu", V, H, 1), 1024, 1024]


def test_gradients_are_handed_over_once():
    d = make(10)
    out = fused(rpg.DAPOLoss(), d)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()
    out = fused(rpg.DAPOLoss(), d)
    with pytest.raises(RuntimeError, match="first derivatives"):  # never a silently zero second derivative
        torch.autograd.grad(out.loss, d["weight"], create_graph=True)


def _plan(loss_fn, keep, chunk, compact):
    plan = FusedLinearLoss(loss_fn)._plan(keep, chunk, compact)
    return [((w.start, w.stop) if isinstance(w, slice) else w.tolist(), b0, b1) for w, b0, b1 in plan]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("counts", [{"batch_num_tokens": 17}, {"global_batch_size": 6}])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_one_global_count(agg, counts, chunk_size):
    """One count given without the other: the chunks' derivative calls use it as the value's call does
    (each call then covers the whole batch), so the gradient follows the loss normalised by that count."""
    d = make(3)
    chunking = [(chunk_size, None, False, None)]
    ref, ref_grads = reference(rpg.PolicyLoss(agg=agg), d, counts=counts)
    out = fused(rpg.PolicyLoss(agg=agg), d, chunk_size=chunk_size, counts=counts)
    grads = torch.autograd.grad(out.loss, (d["hidden"], d["weight"], d["bias"]))
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=f"grad {name} ({chunking})")
    assert ref_grads[1].abs().sum() > 0


SELECTIONS = {
    "clip-cov": rpg.ClipCovLoss(fraction=0.3, low=-100.0, high=100.0),  # a wide band: the draw picks among many
    "kl-cov-entropy": rpg.KLCovLoss(fraction=0.3, entropy_coef=0.1),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
@pytest.mark.parametrize("own_generator", [True, False])
@pytest.mark.parametrize("chunk_size,vocab_chunk_size,with_counts,skip_masked", CHUNKINGS[1:4])
def test_selection_rules_draw_the_tokens_the_reference_draws(
    name, own_generator, chunk_size, vocab_chunk_size, with_counts, skip_masked
):
    """Clip-Cov / KL-Cov rank the whole batch (one chunk), and the generator is rewound between the
    derivative's call and the value's: the same tokens are selected as by from_hidden + the loss, whose
    gradient is matched exactly, and the generator (given, or torch's default) ends where one call leaves it."""
    loss_fn, d = SELECTIONS[name], make(16)
    counts = {"batch_num_tokens": 17, "global_batch_size": 6} if with_counts else {}
    gens = [torch.Generator().manual_seed(3) for _ in range(2)] if own_generator else [None, None]
    want_entropy = loss_fn.entropy_coef > 0
    lp = from_hidden(
        d["hidden"], d["weight"], d["tokens"], bias=d["bias"], temperature=TEMP, return_entropy=want_entropy
    )
    kw = dict(counts, ref_logp=d["ref_logp"])
    if want_entropy:
        lp, kw["entropy"] = lp
    torch.manual_seed(5)
    ref = loss_fn(lp, d["old_logp"], d["advantages"], d["mask"], generator=gens[0], **kw)
    ref_grads = torch.autograd.grad(ref.loss, (d["hidden"], d["weight"], d["bias"]))
    ref_next = torch.rand(4)
    torch.manual_seed(5)
    out = FusedLinearLoss(loss_fn, chunk_size, vocab_chunk_size, skip_masked=skip_masked)(
        *(d[k] for k in ("hidden", "weight", "tokens", "old_logp", "advantages", "mask")),
        bias=d["bias"],
        temperature=TEMP,
        ref_logp=d["ref_logp"],
        generator=gens[1],
        **counts,
    )
    grads = torch.autograd.grad(out.loss, (d["hidden"], d["weight"], d["bias"]))
    assert ref.metrics["select_frac"] > 0.1  # the selection drops or penalises tokens: the draw matters
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.per_token, ref.per_token.detach(), rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    if own_generator:
        assert torch.equal(gens[0].get_state(), gens[1].get_state())
    else:
        assert torch.equal(torch.rand(4), ref_next)


@needs_options
@pytest.mark.parametrize(
    "loss_fn",
    [
        pytest.param(
            rpg.GMPOLoss(correction=rpg.RolloutCorrection(level="sequence", mode="mask", lower=0.5, upper=2.0)),
            id="gmpo-sequence-mask",
        ),
        pytest.param(
            rpg.VESPOLoss(
                entropy_coef=0.2, correction=rpg.RolloutCorrection(level="sequence", lower=0.5, count_rejected=False)
            ),
            id="vespo-sequence-truncate-entropy",
        ),
        pytest.param(
            rpg.GSPOLoss(
                clip=rpg.Clip(0.2, 0.2, None),  # the default (3e-4, 4e-4) clips every row here; the band rejects 2 of 4
                correction=rpg.RolloutCorrection(
                    level="sequence", mode="mask", lower=0.4, upper=1.5, count_rejected=False
                ),
            ),
            id="gspo-sequence-mask-uncounted",
        ),
    ],
)
@pytest.mark.parametrize("counts", [{"batch_num_tokens": 17}, {"global_batch_size": 6}])
def test_sequence_level_ratios_with_a_sequence_correction(loss_fn, counts):
    """GMPO's and VESPO's sequence ratios (whole sequences per chunk) with a sequence-level rollout
    correction, weights, and every way of giving the counts (both or none: CHUNKINGS; one: here)."""
    d = make(17)
    assert_same(loss_fn, d, options=("weights", "behavior_logp"))
    ref, ref_grads = reference(loss_fn, d, counts=counts, options=("weights", "behavior_logp"))
    out = fused(loss_fn, d, chunk_size=3, counts=counts, options=("weights", "behavior_logp"))
    grads = torch.autograd.grad(out.loss, (d["hidden"], d["weight"], d["bias"]))
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_chunk_plan():
    """Per-token losses may cut sequences; a sequence-level ratio (GSPO) gets whole sequences; masked
    positions are skipped when asked."""
    full = torch.ones(2, 7, dtype=torch.bool)
    assert _plan(rpg.DAPOLoss(), full, 3, False) == [
        ((0, 3), 0, 1),
        ((3, 6), 0, 1),
        ((6, 9), 0, 2),
        ((9, 12), 1, 2),
        ((12, 14), 1, 2),
    ]
    assert _plan(rpg.GSPOLoss(), full, 3, False) == [((0, 7), 0, 1), ((7, 14), 1, 2)]
    assert _plan(rpg.GSPOLoss(), torch.ones(5, 7, dtype=torch.bool), 15, False) == [
        ((0, 14), 0, 2),
        ((14, 28), 2, 4),
        ((28, 35), 4, 5),
    ]
    keep = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert _plan(rpg.DAPOLoss(), keep, 3, True) == [([0, 1, 8], 0, 3), ([9, 10], 2, 3)]
    assert _plan(rpg.GSPOLoss(), keep, 3, True) == [([0, 1], 0, 1), ([8, 9, 10], 2, 3)]
    assert _plan(rpg.GSPOLoss(), keep, 5, True) == [([0, 1, 8, 9, 10], 0, 3)]
    assert _plan(rpg.GSPOLoss(), keep, 1, True) == [([0, 1], 0, 1), ([8, 9, 10], 2, 3)]  # a row never splits


def _call(d, **change):
    args = {k: d[k] for k in ("hidden", "weight", "tokens", "old_logp", "advantages", "mask")}
    kw = {"bias": d["bias"], "temperature": 1.0, "ref_logp": d["ref_logp"]}
    for k, v in change.items():
        (args if k in args else kw)[k] = v
    return FusedLinearLoss(rpg.DAPOLoss())(*args.values(), **kw)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"hidden": torch.zeros(B * T, H, dtype=F64)}, ValueError, "hidden must have shape"),
        ({"weight": torch.zeros(V, H + 1, dtype=F64)}, ValueError, "weight must have shape"),
        ({"tokens": torch.zeros(B, T + 1, dtype=torch.long)}, ValueError, "tokens must have shape"),
        ({"tokens": torch.zeros(B, T)}, TypeError, "tokens must be an integer"),
        ({"tokens": torch.full((B, T), V)}, ValueError, r"tokens must lie in \[0, 50\)"),
        ({"bias": torch.zeros(V + 1, dtype=F64)}, ValueError, "bias must have shape"),
        ({"old_logp": torch.zeros(B, T + 1, dtype=F64)}, ValueError, "old_logp must have shape"),
        ({"ref_logp": torch.zeros(T, dtype=F64)}, ValueError, "ref_logp must have shape"),
        ({"mask": torch.ones(B + 1, T, dtype=torch.bool)}, ValueError, "mask must have shape"),
        ({"advantages": torch.zeros(B + 1, dtype=F64)}, ValueError, "advantages must have shape"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"hidden": torch.zeros(B, T, H, dtype=torch.long)}, TypeError, "hidden"),
    ],
)
def test_bad_inputs(change, error, match):
    with pytest.raises(error, match=match):
        _call(make(11), **change)


@pytest.mark.parametrize("name", ["batch_num_tokens", "global_batch_size"])
@pytest.mark.parametrize("bad", [-5.0, float("nan"), float("inf")])
@pytest.mark.parametrize("grad", [True, False])
def test_bad_tensor_counts_are_refused(name, bad, grad):
    """A tensor count is checked as the loss checks it (the chunks' calls run with the value checks off):
    a negative, NaN or infinite count is a ValueError naming it, not a silently rescaled loss."""
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=f"{name} must be finite and >= 0"):
        _call(make(11), **{name: torch.tensor(bad, dtype=F64)})


@pytest.mark.parametrize("loss_fn", [rpg.DAPOLoss(), rpg.ClipCovLoss()], ids=["no-selection", "clip-cov"])
def test_a_generator_that_is_not_one_is_refused(loss_fn):
    """``generator=`` is checked as the loss checks it: a TypeError naming it, with or without a selection
    rule to use it (not an AttributeError, nor silently dropped)."""
    d = make(11)
    args = [d[k] for k in ("hidden", "weight", "tokens", "old_logp", "advantages", "mask")]
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None"):
        FusedLinearLoss(loss_fn)(*args, generator=0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_settings(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearLoss(rpg.DAPOLoss(), chunk_size=bad)
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        FusedLinearLoss(rpg.DAPOLoss(), vocab_chunk_size=bad)
    with pytest.raises(TypeError, match="loss_fn"):
        FusedLinearLoss("dapo")


@pytest.mark.slow
def test_benchmark_script_runs():
    """benchmarks/fused_head.py runs end to end at a toy size (its equality check included), so it cannot rot."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "fused_head.py"
    args = [
        "--n",
        "64",
        "--seq-len",
        "16",
        "--h",
        "8",
        "--v",
        "300",
        "--runs",
        "1",
        "--threads",
        "1",
        "--skip",
        "compiled=True",
    ]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| rpg FusedLinearLoss |" in out.stdout and "| rpg from_hidden + loss |" in out.stdout


@pytest.mark.parametrize("name", ["advantages", "weights"])
def test_a_non_finite_advantage_or_weight_at_a_response_token_is_refused(name):
    """The fused head calls its loss inside ``trusted_inputs`` (the value checks run once, up front): the
    advantages and weights are checked there too, as by the loss itself (a NaN advantage gave a NaN loss
    silently); at padding they stay inert."""
    d = make(neg_inf_block=False)
    fused = FusedLinearLoss(rpg.PolicyLoss(), chunk_size=8)

    def call(x):
        return fused(
            x["hidden"], x["weight"], x["tokens"], x["old_logp"], x["advantages"], x["mask"], weights=x["weights"]
        ).loss

    want = call(d)
    for value, word in ((float("nan"), "NaN"), (float("inf"), r"\+inf")):
        bad = d[name].clone()
        bad[(0,) if name == "advantages" else (0, 0)] = value  # mask[:, 0] is set
        with pytest.raises(ValueError, match=rf"{name} is {word} at"):
            call({**d, name: bad})
        inert = d[name].clone()
        inert[(2,) if name == "advantages" else (2, 0)] = value  # row 2 is all padding
        torch.testing.assert_close(call({**d, name: inert}), want, rtol=0, atol=0)
