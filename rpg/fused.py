r"""A fused LM head + policy loss: the gradients of ``hidden``, ``weight`` and ``bias`` computed in the forward pass.

[`rpg.logprobs.from_hidden`][rpg.logprobs.from_hidden] followed by a loss runs the LM head twice: its
forward computes the log-probs block by block, its backward recomputes every
block of logits to form their gradient — four head-sized matrix products.
[`FusedLinearLoss`][rpg.fused.FusedLinearLoss] needs three. For a chunk of tokens it computes the
logits once,

    z = (h·Wᵀ + b) / temperature,   log p(y) = z_y − logsumexp(z),
    H = −Σ_v p_v·log p_v                                    (entropy, if the loss has a bonus),

calls the loss on that chunk with ``logp`` (and ``entropy``) as leaves to get
a = ∂L/∂logp and e = ∂L/∂H — an elementwise derivative, cheap — and turns them
into the gradient of the logits while they are still in memory,

    ∂L/∂z_v = a·(δ_vy − p_v) − e·p_v·(log p_v + H),

then into ∂L/∂h = ∂L/∂z·W and ∂L/∂W += ∂L/∂zᵀ·h (and ∂L/∂b += Σ ∂L/∂z),
divided by the temperature. The backward pass only multiplies these saved
gradients by the incoming gradient of the loss.

**Why chunk losses add up to the loss.** Every rpg loss is
L = Σ_bt c_bt·ℓ_bt(logp_bt) (+ the entropy term, alike): the per-token loss
depends on its own ``logp`` only, and the aggregation coefficient c_bt on the
mask, the counts and constants (weights, the behaviour-policy correction). So
the derivative at a chunk's tokens is that of one call of the loss whose other
tokens hold placeholders (the old log-probs): on the rows the chunk touches
when the call has the full batch's counts (``batch_num_tokens`` and
``global_batch_size`` — row shards then add up exactly), on the whole batch
otherwise (so the loss counts its own N and S, whatever its settings drop from
them). A chunk may therefore cut through a sequence. The exception is a
sequence-level ratio (GSPO, ``ratio="sequence"``), whose derivative at one
token depends on every token of its sequence: there chunks hold whole
sequences, and a sequence longer than ``chunk_size`` tokens makes its chunk
that long (the memory then grows with the sequence length). GMPO and VESPO
(``ratio="geometric"``, ``"product"``) are sequence-level alike. A selection
rule over the call's tokens (Clip-Cov, KL-Cov: ``select``) ranks the whole
batch's log-probs, so there one chunk holds the whole batch (the memory is that
of the unfused path's logits), and the call's ``generator=`` is rewound between
the derivative's call and the value's so both select the same tokens; M2PO's
filter (``RolloutCorrection(m2_upper=...)``) depends on constants only, and each
chunk's call sees the whole batch.

Positions outside the mask take no part in the loss, so on CPU they are
skipped: no logits are computed for padding (``skip_masked``; on an
accelerator finding them would be a host-device sync, so all positions are
computed unless ``skip_masked=True``; their hidden states are then replaced by
zeros, so a NaN there reaches no gradient either way).

The value, ``per_token`` and ``metrics`` come from one more call of the loss
on the full detached ``logp`` (elementwise; the head is not recomputed), so
they equal the unfused path's. ``per_token`` is a value (no gradient): the
gradient flows only through ``loss``.

**Memory.** One float32 ``[V, chunk_size]`` block of logits (two with an
entropy term; ``vocab_chunk_size × chunk_size`` blocks instead when
``vocab_chunk_size`` is set), plus the gradients themselves, which live from
the forward pass until ``backward``: ``hidden``'s (``[B, T, H]``) and
``weight``'s — accumulated in a ``[V, H]`` tensor of the compute dtype (float32
for bf16/fp16 weights, i.e. twice the weight's bytes, cast to the weight's
dtype at the end of the forward pass; the weight's own dtype for
float32/float64) — and ``bias``'s (``[V]``). Gradients are computed only for
the tensors that require them (a frozen head gets none). On CPU the default
``chunk_size`` is H / 4 tokens (H / 8 with an entropy term, at least 32), so
for H ≥ 128 (H ≥ 256 with an entropy term; below that the 32-token floor makes
them larger) the blocks together are at most a quarter of the float32 ``[V, H]``
weight-gradient accumulator (``4·V·chunk_size`` against ``4·V·H`` bytes): for a
float32 head, a peak within about 1.25× the gradients it returns. Smaller chunks
read the weight and update its gradient more often: in the no-padding chunk sweep of
``benchmarks/README.md`` (a shared 2-core CPU, 1 thread) chunks of 48 and 51 tokens took more
time than the default's 64; pass a larger ``chunk_size`` to trade memory for time. With
vocabulary blocks (``vocab_chunk_size`` set, or no gradient) the blocks do not
grow with V and the default is 1024 tokens, as ``from_hidden``'s.

**Numerics.** bf16/fp16 inputs are computed in float32 (operands upcast block by
block), float32 and float64 in their own dtype; float64 results equal
``from_hidden`` + the same loss to 1e-10 (tested for every loss family and
aggregation). A vocabulary block of −inf logits (e.g. a −inf bias) gets
probability 0, entropy contribution 0 and gradient 0.

**Log-probs without a loss** (reference, teacher or old log-probs): use
[`rpg.logprobs.from_hidden`][rpg.logprobs.from_hidden] under ``torch.no_grad()`` — it keeps only two
blocks of logits and saves nothing. Calling a [`FusedLinearLoss`][rpg.fused.FusedLinearLoss] under
``torch.no_grad()`` (or with no input requiring grad) evaluates the loss the
same lean way, without any gradient work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._util import check_finite, check_floating, check_mask_values, compute_dtype, trusted_inputs
from .aggregation import check_count
from .functional import check_logprobs
from .logprobs import _block, _check_chunk, _check_ignore_index, _check_temperature, _check_tokens, _rows

__all__ = ["FusedLinearLoss"]

# Default chunk on CPU: the float32 [V, chunk_size] blocks of logits together hold at most a quarter of
# the float32 [V, H] weight-gradient accumulator (chunk_size = H / 4 tokens, H / 8 with an entropy term,
# at least _MIN_CHUNK), so a float32 head's peak stays within ~1.25× the gradients it returns. Smaller chunks
# stream the weight and its gradient more often, so they cost time: at V = 32000, H = 256 without padding
# (benchmarks/README.md's chunk sweep, a shared 2-core CPU) 48 and 51 tokens were slower than 64.
# Accelerators: not measured; 512 MiB blocks, so each chunk's kernels have several hundred rows at V ≈ 152k.
_GRADIENT_FRACTION = 4
_MIN_CHUNK = 32
_BLOCK_BYTES_ACCELERATOR = 512 * 2**20
_VOCAB_BLOCKED_CHUNK = 1024  # tokens per [vocab_chunk_size, chunk] block, as rpg.logprobs.from_hidden
_CAST_BLOCK = 4096  # vocabulary rows upcast at a time for bf16/fp16 weights
_DOT_SLICE = 1024  # vocabulary rows per step of the entropy's column sums
_LOG_ZERO = -1e4  # log-probabilities below this have p = 0 exactly (float32 and float64): clamp −inf to it


def _default_chunk(device_type: str, v: int, hdim: int, blocks: int, whole_vocabulary: bool = True) -> int:
    """Tokens per chunk when ``chunk_size`` is None (see ``_GRADIENT_FRACTION``). Blocks that span the
    whole vocabulary (the gradient path without ``vocab_chunk_size``) scale with V; vocabulary blocks
    (``torch.no_grad()``, or ``vocab_chunk_size`` set) do not, and take ``from_hidden``'s 1024 tokens."""
    if not whole_vocabulary:
        return _VOCAB_BLOCKED_CHUNK
    if device_type == "cpu":
        return max(_MIN_CHUNK, hdim // (_GRADIENT_FRACTION * blocks))
    return max(1, _BLOCK_BYTES_ACCELERATOR // (4 * v))


def _positive_int(name: str, value: object) -> int | None:
    """As ``from_hidden``'s chunk sizes (an int, a numpy integer or a one-element integer tensor), with
    every refusal a ``ValueError``."""
    try:
        return _check_chunk(name, value)
    except TypeError:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}") from None


def _check_bt(name: str, x: object, shape: tuple[int, int], *, floating: bool = True) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if floating:
        check_floating(name, x)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape [B, T] = {shape}, got {tuple(x.shape)}")


def _sequence_coupled(loss_fn) -> bool:
    """Whether the loss's derivative at one token depends on other tokens of its sequence (GSPO)."""
    ratio = getattr(loss_fn, "ratio", None)
    config = getattr(loss_fn, "config", None)
    if ratio is None and isinstance(config, dict):
        ratio = config.get("ratio")
    return ratio not in (None, "token")


def _batch_coupled(loss_fn, with_behavior: bool) -> tuple[bool, bool]:
    """``(counts_local, one_chunk)``: whether the loss's derivative at a token depends on other rows'
    tokens — through a selection rule over the call's tokens (Clip-Cov, KL-Cov: on their log-probs, so one
    chunk holds the batch) or, with ``behavior_logp``, M2PO's filter (on constants only, so any chunk
    works as long as each call sees the whole batch)."""
    select = getattr(loss_fn, "select", None) is not None
    correction = getattr(loss_fn, "correction", None)
    m2 = with_behavior and getattr(correction, "m2_upper", None) is not None
    return select or m2, select


def _weight_blocks(weight: torch.Tensor, dtype: torch.dtype):
    """``(v0, v1, W[v0:v1] in dtype)``: the whole weight when it already is in ``dtype``, else upcast blocks."""
    v = weight.shape[0]
    if weight.dtype == dtype:
        yield 0, v, weight
        return
    for v0 in range(0, v, _CAST_BLOCK):
        v1 = min(v, v0 + _CAST_BLOCK)
        yield v0, v1, weight[v0:v1].to(dtype)


def _logits(out, h, weight, bias, temperature, dtype):
    """``out[:] = (W·hᵀ + b) / temperature`` for a ``[V', m]`` buffer (``weight`` ``[V', H]``, ``h`` ``[m, H]``).

    Blocks are vocabulary-major (``[V', m]``, the logits transposed): with a few dozen tokens per
    chunk, ``W·hᵀ`` and ``∂L/∂W += ∂L/∂zᵀ·h`` then stream the weight and its gradient as contiguous
    rows (on the CPU measured, a few percent to ~10% faster than token-major blocks end to end at
    32–64 tokens; noisy).
    """
    if weight.dtype == dtype:
        torch.mm(weight, h.T, out=out)
    else:
        for v0, v1, w in _weight_blocks(weight, dtype):
            torch.mm(w, h.T, out=out[v0:v1])
    if bias is not None:
        out += bias.to(dtype).unsqueeze(1)
    if temperature != 1.0:
        out /= temperature
    return out


def _accumulate(dz, h, weight, dtype, grads, v0=0):
    """g_h += dzᵀ·W, ∂L/∂W[v0:v0+V'] += dz·h, ∂L/∂b[...] += Σ dz for one vocabulary-major block ``dz``
    ``[V', m]`` of the logits' gradient (``g_h``: the chunk's ``[m, H]`` rows of the hidden-state gradient)."""
    g_h, g_w, g_b = grads
    v1 = v0 + dz.shape[0]
    for b0, b1, w in _weight_blocks(weight[v0:v1], dtype):
        if g_h is not None:
            g_h.addmm_(dz[b0:b1].T, w)
        if g_w is not None:
            g_w[v0 + b0 : v0 + b1].addmm_(dz[b0:b1], h)
    if g_b is not None:
        g_b[v0:v1] += dz.sum(1)


def _column_max(z):
    """max over the vocabulary (dim 0) of a ``[V', m]`` block. Folding the rows into groups of 64 first
    lets the reduction run over contiguous memory (in one measurement on a 2-core CPU, 8× faster than
    ``amax(0)`` at m = 51 and never much slower at other sizes)."""
    v, m = z.shape
    body = v - v % 64
    out = z[:body].view(body // 64, 64, m).amax(0).amax(0) if body else z.amax(0)
    return torch.maximum(out, z[body:].amax(0)) if 0 < body < v else out


def _column_dot(x, y):
    """Σ_v x[v, i]·y[v, i] for ``[V', m]`` blocks, through vocabulary slices (a temporary of at most
    ``_DOT_SLICE × m``, a small part of a block)."""
    out = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    for v0 in range(0, x.shape[0], _DOT_SLICE):
        out += (x[v0 : v0 + _DOT_SLICE] * y[v0 : v0 + _DOT_SLICE]).sum(0)
    return out


def _head_forward(h, weight, bias, y, temperature, dtype, want_entropy, buffers):
    """One chunk's logits, materialised across the vocabulary: ``(logp, entropy, state)``.

    ``state`` is what `_head_backward` needs: e = exp(z − max) ``[V, m]`` (in the logits'
    storage without an entropy term), its column sums s, and with one t = z − max clamped at −1e4.
    """
    m, v = h.shape[0], weight.shape[0]
    z = _logits(_block(buffers[0], v, m), h, weight, bias, temperature, dtype)
    cols = torch.arange(m, device=h.device)
    z_y = z[y, cols]
    z_max = _column_max(z)
    shift = torch.where(torch.isinf(z_max), torch.zeros_like(z_max), z_max)  # a token's logits all −inf: shift by 0
    t = z.sub_(shift)
    if want_entropy:
        t.clamp_(min=_LOG_ZERO)  # −inf → a value whose exp is exactly 0, so 0·t stays 0
        e = torch.exp(t, out=_block(buffers[1], v, m))
    else:
        e = t.exp_()
    s = e.sum(0)
    log_s = s.log()
    logp = z_y - shift - log_s
    if not want_entropy:
        return logp, None, (e, s, None, None, cols)
    entropy = log_s - _column_dot(e, t) / s  # H = log s − Σ e·t / s
    return logp, entropy, (e, s, t, entropy - log_s, cols)


def _head_backward(a, eps, state, y):
    """∂L/∂z = a·(onehot(y) − p) − ε·p·(log p + H) with p = e/s, log p = t − log s; built in place."""
    e, s, t, c, cols = state
    if eps is None:
        dz = e.mul_(-a / s)
    else:  # −(e/s)·(a + ε·(t + c)),  c = H − log s
        dz = t.mul_(-eps / s).sub_((a + eps * c) / s).mul_(e)
    dz[y, cols] += a  # one target per column: no index repeats
    return dz


def _blocked_forward(h, weight, bias, y, temperature, dtype, want_entropy, vb, buffers):
    """Online log-sum-exp over vocabulary blocks of ``vb``: ``(logp, entropy, lse)``; keeps no block."""
    m, v = h.shape[0], weight.shape[0]
    neg_inf = torch.full((m,), -float("inf"), dtype=dtype, device=h.device)
    run_max, run_sum, target = neg_inf, torch.zeros_like(neg_inf), torch.zeros_like(neg_inf)
    run_pz = torch.zeros_like(neg_inf) if want_entropy else None
    cols = torch.arange(m, device=h.device)
    for v0 in range(0, v, vb):
        v1 = min(v, v0 + vb)
        z = _logits(
            _block(buffers[0], v1 - v0, m), h, weight[v0:v1], None if bias is None else bias[v0:v1], temperature, dtype
        )
        inside = (y >= v0) & (y < v1)
        target = torch.where(inside, z[(y - v0).clamp(0, v1 - v0 - 1), cols], target)
        new_max = torch.maximum(run_max, _column_max(z))
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)  # all −inf so far: shift by 0
        scale = torch.exp(run_max - shift)
        ez = torch.sub(z, shift, out=_block(buffers[1], v1 - v0, m)).exp_()
        run_sum = run_sum * scale + ez.sum(0)
        if want_entropy:
            z.masked_fill_(ez == 0, 0)  # p·z = 0 where p = 0, also for z = −inf
            run_pz = run_pz * scale + _column_dot(ez, z)
        run_max = new_max
    lse = run_max + run_sum.log()
    entropy = lse - run_pz / run_sum if want_entropy else None
    return target - lse, entropy, lse


def _blocked_backward(h, weight, bias, y, temperature, dtype, a, e, entropy, lse, vb, buffers, grads):
    """Recompute each vocabulary block and accumulate its gradient (``vocab_chunk_size`` mode)."""
    m, v = h.shape[0], weight.shape[0]
    cols = torch.arange(m, device=h.device)
    for v0 in range(0, v, vb):
        v1 = min(v, v0 + vb)
        z = _logits(
            _block(buffers[0], v1 - v0, m), h, weight[v0:v1], None if bias is None else bias[v0:v1], temperature, dtype
        )
        log_p = z.sub_(lse).clamp_(min=_LOG_ZERO)
        p = torch.exp(log_p, out=_block(buffers[1], v1 - v0, m))
        inside = (y >= v0) & (y < v1)
        a_in = torch.where(inside, a, torch.zeros_like(a))
        if e is None:
            dz = p.mul_(-a)
        else:
            dz = log_p.add_(entropy).mul_(-e).sub_(a).mul_(p)
        dz[(y - v0).clamp(0, v1 - v0 - 1), cols] += a_in
        _accumulate(dz, h, weight, dtype, grads, v0)


def _loss_value(loss_fn, logp, old_logp, advantages, mask, kwargs):
    """The scalar loss of one chunk's call (a pure function of tensors: what ``compile=True`` compiles)."""
    return loss_fn(logp, old_logp, advantages, mask, **kwargs).loss


class _SavedGradients(torch.autograd.Function):
    """Attaches gradients computed in the forward pass to ``hidden``, ``weight`` and ``bias``.

    ``forward(value, hidden, weight, bias, g_hidden, g_weight, g_bias) -> value``; backward returns
    the saved gradients times the incoming gradient. The scaling is done in place (no weight-sized
    copy), so backward can run once: a second backward through the same call raises.
    """

    @staticmethod
    def forward(ctx, value, hidden, weight, bias, g_hidden, g_weight, g_bias):
        ctx.save_for_backward(g_hidden, g_weight, g_bias)
        ctx.spent = False
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value):
        if torch.is_grad_enabled():  # create_graph=True: the saved gradients have no graph of their own
            raise RuntimeError(
                "FusedLinearLoss gives first derivatives only (its gradients are computed in the forward pass); "
                "for second derivatives use rpg.logprobs.from_hidden and the loss"
            )
        if ctx.spent:
            raise RuntimeError(
                "backward through a FusedLinearLoss output ran twice (retain_graph=True): its gradients were "
                "computed in the forward pass and handed over on the first backward; call the loss again instead"
            )
        ctx.spent = True
        grads = [None if g is None else g.mul_(grad_value.to(g.dtype)) for g in ctx.saved_tensors]
        return None, *grads, None, None, None


class FusedLinearLoss:
    r"""LM head + any rpg loss in one chunked pass, with the gradients formed during the forward pass.

    ``FusedLinearLoss(loss_fn)(hidden, weight, tokens, old_logp, advantages, mask)`` returns what
    ``loss_fn(from_hidden(hidden, weight, tokens), old_logp, advantages, mask)`` returns — the same
    ``loss`` (value and gradients with respect to ``hidden``, ``weight``, ``bias``), ``per_token`` and
    ``metrics`` — without the ``[B, T, V]`` logits and with three head-sized matrix products instead of
    four (see the module docstring for the formula and why the chunks add up exactly). ``per_token`` is
    a value here: the gradient flows through ``loss`` only. Settings of ``loss_fn`` (clip, KL term,
    aggregation, entropy bonus, ...) apply unchanged: the fused path calls ``loss_fn`` itself.

    Args:
        loss_fn: any rpg loss ([`PolicyLoss`][rpg.losses.PolicyLoss], [`RPGLoss`][rpg.losses.RPGLoss], the presets), or a
            callable with the same call and a result with a settable ``loss`` (treated as per-token
            unless its ``ratio`` is not ``"token"`` or it has a ``select`` rule: its derivative at a token
            must depend on that token's ``logp`` only; in each call the tokens outside the chunk hold
            ``old_logp``'s values, so a callable that reads ``logp`` elsewhere — e.g. ``sg(logp)`` as π_old
            in a sequence-level weight — must be given those values as ``old_logp``).
        chunk_size: tokens per chunk. Default on CPU: H / 4 (H / 8 with an entropy term, at least
            32) — 64 tokens at H = 256 — so the logits blocks stay within a quarter of the weight's
            gradient (for H ≥ 128); on an accelerator: as many as make a 512 MiB block — 883 tokens
            at V = 151936; with vocabulary blocks (``vocab_chunk_size``, or no gradient): 1024.
            Memory is one float32 ``[V, chunk_size]`` block (two with an entropy term).
            For a sequence-level ratio (GSPO) a chunk holds as many whole sequences as fit (at least one).
        vocab_chunk_size: ``None`` (default) keeps a chunk's logits across the whole vocabulary, so they
            are computed once (three head-sized products). An int bounds the logits to
            ``[vocab_chunk_size, chunk_size]`` blocks with an online log-sum-exp, at the cost of
            recomputing each block for the gradient (four products, as ``from_hidden``).
        ignore_index: a token id marking positions outside the loss (``-100`` is the Hugging Face
            convention), or ``None`` (default). Those positions get log-prob 0, entropy 0, no
            gradient, and are removed from the mask (so they do not count in N or S).
        skip_masked: compute no logits where ``mask`` is 0. ``None`` (default): on CPU yes; on an
            accelerator no, since finding the positions is a host-device sync (``True`` accepts one
            sync per call). Results are the same either way.
        compile: compile each chunk's call of the loss with ``torch.compile(dynamic=True)`` (one graph
            for all chunks and lengths; it pays off where kernel launches dominate, i.e. on GPUs).
            The head's matrix products run eagerly either way. Under an outer ``torch.compile`` the
            fused call itself runs eagerly, as one unit (a single graph break).

    Call it as:

    ```python
    import torch, rpg

    B, T, H, V = 2, 5, 8, 20
    fused = rpg.FusedLinearLoss(rpg.DAPOLoss())
    hidden, weight = torch.randn(B, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    old_logp, advantages = rpg.logprobs.from_hidden(hidden, weight, tokens).detach(), torch.randn(B)
    out = fused(hidden, weight, tokens, old_logp, advantages, mask=None, bias=None,
                temperature=1.0, ref_logp=None, behavior_logp=None, weights=None,
                batch_num_tokens=None, global_batch_size=None)
    ```

    with ``hidden`` ``[B, T, H]`` (the final hidden states of the response positions), ``weight``
    ``[V, H]`` (``lm_head.weight``), ``tokens`` ``[B, T]`` (the sampled tokens, already shifted so
    ``tokens[:, t]`` is predicted from ``hidden[:, t]``), ``bias`` ``[V]`` or ``None``; logits are
    divided by ``temperature``. The other arguments are ``loss_fn``'s (``[B, T]`` log-probs, mask and
    weights, ``[B]`` or ``[B, T]`` advantages, global counts) and are passed to it unchanged;
    ``behavior_logp`` and ``weights`` only when given. A loss with ``entropy_coef > 0`` gets the
    entropy of each next-token distribution from the same pass (``entropy=``).

    Returns:
        ``loss_fn``'s result ([`LossOutput`][rpg.metrics.LossOutput]) whose ``loss`` carries the gradient to
        ``hidden``, ``weight`` and ``bias``. Its backward runs once (gradients are handed over, not
        recomputed); a second backward through the same output raises.

    For example:

    ```python
    import torch, rpg

    lm_head = torch.nn.Linear(16, 50, bias=False)  # the model's LM head [V, H]
    hidden = torch.randn(4, 6, 16, requires_grad=True)  # final hidden states of the response positions
    tokens, mask = torch.randint(0, 50, (4, 6)), torch.ones(4, 6, dtype=torch.bool)
    old_logp = rpg.logprobs.from_hidden(hidden, lm_head.weight, tokens).detach()
    advantages = torch.randn(4)
    fused = rpg.FusedLinearLoss(rpg.DAPOLoss())
    out = fused(hidden, lm_head.weight, tokens, old_logp, advantages, mask)
    out.loss.backward()
    ```
    """

    def __init__(
        self,
        loss_fn,
        chunk_size: int | None = None,
        vocab_chunk_size: int | None = None,
        *,
        ignore_index: int | None = None,
        skip_masked: bool | None = None,
        compile: bool = False,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable rpg loss, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        self.vocab_chunk_size = _positive_int("vocab_chunk_size", vocab_chunk_size)
        self.ignore_index = _check_ignore_index(ignore_index)  # the argument types from_hidden accepts
        if skip_masked is not None and not isinstance(skip_masked, bool):
            raise TypeError(f"skip_masked must be a bool or None, got {type(skip_masked).__name__}")
        self.skip_masked = skip_masked
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
        self.compile = compile
        self._chunk_loss = torch.compile(_loss_value, dynamic=True) if compile else _loss_value

    def __repr__(self) -> str:
        extra = "" if self.ignore_index is None else f", ignore_index={self.ignore_index}"
        extra += ", compile=True" if self.compile else ""
        return (
            f"FusedLinearLoss({self.loss_fn!r}, chunk_size={self.chunk_size}, "
            f"vocab_chunk_size={self.vocab_chunk_size}{extra})"
        )

    @torch.compiler.disable  # a Python loop with autograd calls: under torch.compile it runs eagerly, as one unit
    def __call__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        temperature: float = 1.0,
        ref_logp: torch.Tensor | None = None,
        behavior_logp: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        batch_num_tokens: int | float | torch.Tensor | None = None,
        global_batch_size: int | float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        """Loss of the head's log-probs; see the class docstring."""
        _check_head(hidden, weight, bias)
        temperature = _check_temperature(temperature)  # one validator with from_hidden: the same types
        if generator is not None and not isinstance(generator, torch.Generator):  # as the loss: used or not
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        per_token = {"ref_logp": ref_logp, "behavior_logp": behavior_logp, "weights": weights}
        counts = {"batch_num_tokens": batch_num_tokens, "global_batch_size": global_batch_size}
        sequence_ratio = getattr(self.loss_fn, "ratio", "token") != "token"
        batch = _prepare(
            hidden,
            tokens,
            old_logp,
            advantages,
            mask,
            per_token,
            counts,
            weight.shape[0],
            self.ignore_index,
            sequence_ratio,
        )
        plan = self._plan_call(batch, hidden, weight, bias, generator)
        with trusted_inputs(), torch.no_grad():  # value rules checked once in _prepare
            if plan.need_grad:
                logp, entropy, grads = self._fused_pass(batch, plan, weight, bias, temperature)
            else:
                (logp, entropy), grads = self._logprob_pass(batch, plan, weight, bias, temperature), None
            if plan.rng is not None:  # the value's call draws the tokens the derivative's calls drew
                plan.rng[0].set_state(plan.rng[1])
            out = self.loss_fn(logp, batch.old_logp, batch.advantages, batch.mask, **batch.loss_kwargs(None, entropy))
        if grads is not None:
            out.loss = _SavedGradients.apply(
                out.loss.detach(), hidden, weight, bias, *_cast_grads(grads, hidden, weight, bias)
            )
        return out

    def _plan_call(self, batch: _Batch, hidden, weight, bias, generator) -> _Plan:
        """What to compute (which gradients, the entropy, the compute dtype) and the chunks."""
        v, hdim = weight.shape
        want_entropy = getattr(self.loss_fn, "entropy_coef", 0) > 0
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        need_grad = torch.is_grad_enabled() and any(need)
        whole_vocabulary = need_grad and self.vocab_chunk_size is None
        chunk = self.chunk_size or _default_chunk(
            hidden.device.type, v, hdim, 2 if want_entropy else 1, whole_vocabulary
        )
        batch_coupled, one_chunk = _batch_coupled(self.loss_fn, batch.has("behavior_logp"))
        if one_chunk:  # the selection ranks the whole batch's log-probs: one chunk holds them all
            chunk = max(batch.tokens.numel(), 1)
        # Row shards add up to the loss only given the full batch's counts (the aggregation's contract);
        # without them each chunk's call sees the whole batch (see _chunk_derivative).
        rows_local = batch.counts_given and not batch_coupled
        rng = None
        if getattr(self.loss_fn, "select", None) is not None:
            # the derivative's call and the value's call must draw the same tokens
            gen = generator if generator is not None else torch.default_generator
            rng = (gen, gen.get_state())
            batch.constants["generator"] = gen
        compact = self.skip_masked if self.skip_masked is not None else hidden.device.type == "cpu"
        compact = compact and batch.mask is not None and not bool(batch.keep.all())
        chunks = self._plan(batch.keep, chunk, compact)
        dtype = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        return _Plan(dtype, want_entropy, need, need_grad, chunks, rows_local, rng)

    def _plan(self, keep: torch.Tensor, chunk: int, compact: bool) -> list:
        """The chunks of a ``[B, T]`` ``keep`` mask for this loss (`_chunks`)."""
        return _chunks(keep, chunk, compact, _sequence_coupled(self.loss_fn))

    def _logprob_pass(self, batch: _Batch, plan: _Plan, weight, bias, temperature):
        """``(logp, entropy)`` ``[B, T]`` without any gradient work: vocabulary blocks, online log-sum-exp."""
        v = weight.shape[0]
        vb = min(v, self.vocab_chunk_size or 4096)
        rows = max((_size(w) for w, _, _ in plan.chunks), default=0)
        buffers = [torch.empty(rows * vb, dtype=plan.dtype, device=batch.hidden.device) for _ in range(2)]
        logp_all, entropy_all = _outputs(batch, plan)
        for where, _, _ in plan.chunks:
            h, y = batch.hidden[where].to(plan.dtype), batch.tokens[where]
            logp, ent, _ = _blocked_forward(h, weight, bias, y, temperature, plan.dtype, plan.want_entropy, vb, buffers)
            _store(batch, where, logp, ent, logp_all, entropy_all)
        return batch.finish(logp_all, entropy_all)

    def _fused_pass(self, batch: _Batch, plan: _Plan, weight, bias, temperature):
        """``(logp, entropy, grads)``: per chunk, the head's forward, the loss's derivative at the chunk's
        tokens, and the logits' gradient turned into those of ``hidden``, ``weight`` and ``bias``."""
        v, hdim = weight.shape
        n, dtype, vb = batch.tokens.numel(), plan.dtype, self.vocab_chunk_size
        grads = (
            torch.zeros(n, hdim, dtype=dtype, device=batch.hidden.device) if plan.need[0] else None,
            torch.zeros(v, hdim, dtype=dtype, device=weight.device) if plan.need[1] else None,
            torch.zeros(v, dtype=dtype, device=weight.device) if plan.need[2] else None,
        )
        rows = max((_size(w) for w, _, _ in plan.chunks), default=0)
        n_buf = 2 if (plan.want_entropy or vb is not None) else 1
        cols = v if vb is None else min(v, vb)
        buffers = [torch.empty(rows * cols, dtype=dtype, device=batch.hidden.device) for _ in range(n_buf)]
        logp_all, entropy_all = _outputs(batch, plan)
        g_h, g_w, g_b = grads
        inv_t = 1.0 / temperature
        for where, b0, b1 in plan.chunks:
            h, y = batch.chunk_hidden(where, dtype), batch.tokens[where]
            if vb is None:
                logp, ent, state = _head_forward(h, weight, bias, y, temperature, dtype, plan.want_entropy, buffers)
            else:
                logp, ent, lse = _blocked_forward(
                    h, weight, bias, y, temperature, dtype, plan.want_entropy, vb, buffers
                )
            logp, ent = _store(batch, where, logp, ent, logp_all, entropy_all)
            a, e = self._chunk_derivative(batch, plan, where, b0, b1, logp, ent)
            a = a * inv_t  # ∂z/∂logits = 1/temperature; ∂L/∂z is linear in (a, e)
            e = None if e is None else e * inv_t
            compact = isinstance(where, torch.Tensor)
            # the chunk's rows of ∂L/∂hidden: a view, or (masked positions skipped) a block copied back
            rows_h = None if g_h is None else (torch.zeros_like(h) if compact else g_h[where])
            if vb is None:
                _accumulate(_head_backward(a, e, state, y), h, weight, dtype, (rows_h, g_w, g_b))
            else:
                _blocked_backward(
                    h, weight, bias, y, temperature, dtype, a, e, ent, lse, vb, buffers, (rows_h, g_w, g_b)
                )
            if compact and g_h is not None and rows_h is not None:
                g_h.index_copy_(0, where, rows_h)
        logp, entropy = batch.finish(logp_all, entropy_all)
        return logp, entropy, grads

    def _chunk_derivative(self, batch: _Batch, plan: _Plan, where, b0, b1, logp, ent):
        """a = ∂L/∂logp and e = ∂L/∂H at the chunk's tokens, from one call of ``loss_fn``.

        With both global counts known the call covers only the rows ``[b0, b1)`` the chunk touches (the
        counts make row shards add up exactly); otherwise it covers the whole batch, so the loss counts
        its own N and S whatever its settings drop from them. Tokens outside the chunk hold placeholders
        (``old_logp``, entropy 0) whose derivative is not used. The call gets the arguments the value's
        call gets (`_Batch.loss_kwargs`), on its rows.
        """
        b, t = batch.shape
        if not plan.rows_local:
            b0, b1 = 0, b
        shift = b0 * t
        local = slice(where.start - shift, where.stop - shift) if isinstance(where, slice) else where - shift
        rows = slice(b0, b1)
        lp = batch.old_flat[b0 * t : b1 * t].to(logp.dtype, copy=True)
        lp[local] = logp
        leaves = [lp.view(b1 - b0, t).requires_grad_(True)]
        if ent is not None:
            en = torch.zeros((b1 - b0) * t, dtype=ent.dtype, device=ent.device)
            en[local] = ent
            leaves.append(en.view(b1 - b0, t).requires_grad_(True))
        adv = None if batch.advantages is None else batch.advantages[rows]
        mask = None if batch.mask is None else batch.mask[rows]
        kwargs = batch.loss_kwargs(rows, leaves[1] if ent is not None else None)
        with torch.enable_grad():
            loss = self._chunk_loss(self.loss_fn, leaves[0], batch.old_logp[rows], adv, mask, kwargs)
            got = torch.autograd.grad(loss, leaves, allow_unused=True)

        def pick(g):
            if g is None:
                return torch.zeros_like(logp)
            return g.reshape(-1)[local].to(logp.dtype)

        a = pick(got[0])
        e = pick(got[1]) if ent is not None else None
        if batch.ignored is not None:
            a = a.masked_fill(batch.ignored[where], 0)
            e = None if e is None else e.masked_fill(batch.ignored[where], 0)
        return a, e


def _check_head(hidden, weight, bias) -> None:
    """``hidden`` ``[B, T, H]``, ``weight`` ``[V, H]`` and ``bias`` ``[V]`` (or None), all floating."""
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, H], got {tuple(hidden.shape)}")
    hdim = hidden.shape[2]
    if weight.dim() != 2 or weight.shape[1] != hdim:
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[-1] = {hdim}, got {tuple(weight.shape)}")
    v = weight.shape[0]
    if bias is not None:
        check_floating("bias", bias)
        if tuple(bias.shape) != (v,):
            raise ValueError(f"bias must have shape [V] = ({v},), got {tuple(bias.shape)}")


def _check_loss_inputs(shape, tokens, old_logp, advantages, mask, per_token, v, ignore_index) -> None:
    """Shapes and types of the loss's arguments against ``hidden``'s ``[B, T]`` (values: `_prepare`)."""
    if isinstance(tokens, torch.Tensor) and tuple(tokens.shape) != shape:
        raise ValueError(f"tokens must have shape [B, T] = {shape} (hidden is [B, T, H]), got {tuple(tokens.shape)}")
    _check_tokens(tokens, torch.Size(shape), v, "hidden [B, T, H]", ignore_index)
    for name, x in {"old_logp": old_logp, **per_token}.items():
        _check_bt(name, x, shape)
    if old_logp is None:
        raise TypeError("old_logp must be a [B, T] tensor of the sampling policy's log-probs, got None")
    _check_bt("mask", mask, shape, floating=False)
    if advantages is not None:
        if not isinstance(advantages, torch.Tensor):
            raise TypeError(f"advantages must be a torch.Tensor or None, got {type(advantages).__name__}")
        if tuple(advantages.shape) not in ((shape[0],), (shape[0], 1), shape):
            raise ValueError(
                f"advantages must have shape [B] = ({shape[0]},), [B, 1] or [B, T] = {shape}, "
                f"got {tuple(advantages.shape)}"
            )


class _Batch:
    """One checked call of the fused loss, flattened as the chunks see it.

    ``tokens`` ``[N]`` (long; ignored positions → 0; on an accelerator out-of-range ids clamped and
    marked ``invalid``), ``keep`` ``[B, T]`` (the positions inside the loss), ``mask`` (what the loss
    gets: ignored positions removed), and the loss's other arguments: ``per_token`` tensors
    (``ref_logp``, ``behavior_logp``, ``weights`` — only those given) and ``constants`` (the counts, the
    generator) that every call of the loss receives alike (`loss_kwargs`).
    """

    def __init__(self, hidden, tokens, keep, mask, ignored, invalid, old_logp, advantages, per_token, constants):
        self.shape = tuple(keep.shape)
        n = keep.numel()
        self.hidden = hidden.reshape(n, hidden.shape[-1])
        self.tokens = tokens.reshape(n)
        self.keep, self.mask = keep, mask
        self.ignored = None if ignored is None else ignored.reshape(n)
        self.invalid = None if invalid is None else invalid.reshape(n)
        self.dropped = None if mask is None else ~keep.reshape(n)  # positions whose hidden rows are zeroed
        self.old_logp, self.advantages = old_logp, advantages
        self.old_flat = old_logp.detach().reshape(n)
        self.per_token = per_token
        self.constants = constants

    @property
    def counts_given(self) -> bool:
        return self.constants["batch_num_tokens"] is not None and self.constants["global_batch_size"] is not None

    def has(self, name: str) -> bool:
        """Whether the call was given the per-token tensor ``name``."""
        return name in self.per_token

    def loss_kwargs(self, rows: slice | None, entropy: torch.Tensor | None) -> dict[str, object]:
        """Keyword arguments of one call of the loss on ``rows`` (``None``: the whole batch)."""
        kwargs = {k: x if rows is None else x[rows] for k, x in self.per_token.items()}
        kwargs.update(self.constants)
        if entropy is not None:
            kwargs["entropy"] = entropy
        return kwargs

    def chunk_hidden(self, where, dtype):
        """The chunk's hidden rows in ``dtype``; padding's rows zeroed, as ``from_hidden``'s (a NaN there
        reaches no gradient). Compacted chunks (an index tensor) hold kept positions only."""
        if isinstance(where, slice):
            return _rows(self.hidden, self.dropped, where.start, where.stop, dtype)
        return self.hidden[where].to(dtype)

    def finish(self, logp_all, entropy_all):
        """``[B, T]`` log-probs (and entropy), 0 at ignored positions."""
        logp = logp_all.view(self.shape)
        entropy = None if entropy_all is None else entropy_all.view(self.shape)
        if self.ignored is not None:
            ignored = self.ignored.view(self.shape)
            logp = logp.masked_fill(ignored, 0)
            entropy = None if entropy is None else entropy.masked_fill(ignored, 0)
        return logp, entropy


def _prepare(
    hidden, tokens, old_logp, advantages, mask, per_token, counts, v, ignore_index, sequence_ratio=False
) -> _Batch:
    """Checks the loss's arguments (shapes, types, and once the value rules the loss checks — the
    log-probs', the advantages', the weights', the counts': the chunks' calls then skip them) and folds
    ``ignore_index`` into the mask."""
    shape = tuple(hidden.shape[:2])
    _check_loss_inputs(shape, tokens, old_logp, advantages, mask, per_token, v, ignore_index)
    if mask is not None:
        check_mask_values(mask)
    tokens = tokens.long()
    keep = torch.ones(shape, dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    ignored = None
    if ignore_index is not None:
        ignored = tokens == ignore_index
        keep = keep & ~ignored
        tokens = tokens.masked_fill(ignored, 0)
        mask = keep  # the loss (and its value checks) see the ignored positions as padding
    response = None if mask is None else mask.bool()
    check_logprobs(None, old_logp, per_token["ref_logp"], per_token["behavior_logp"], response, sequence_ratio)
    if advantages is not None:
        check_finite("advantages", advantages, keep, compute_dtype(hidden.dtype))
    if per_token["weights"] is not None:  # in the compute dtype, as the loss reads them
        check_finite("weights", per_token["weights"], keep, compute_dtype(hidden.dtype))
    for name, count in counts.items():  # a tensor count's value check is skipped in the chunks' calls too
        check_count(name, count)
    invalid = None
    if tokens.device.type != "cpu":  # (checked above on a CPU) on an accelerator a check would be a
        # host-device sync: an out-of-range id gives NaN instead
        invalid = (tokens < 0) | (tokens >= v)
        tokens = tokens.clamp(0, v - 1)
    given = {k: x for k, x in per_token.items() if x is not None}
    return _Batch(hidden, tokens, keep, mask, ignored, invalid, old_logp, advantages, given, dict(counts))


class _Plan(NamedTuple):
    """What one call computes: the compute ``dtype``, the entropy, which gradients (``need``: hidden,
    weight, bias), the ``chunks`` (`_chunks`), whether each chunk's derivative call covers only its own
    rows (``rows_local``), and the generator with the state to rewind it to before the value's call."""

    dtype: torch.dtype
    want_entropy: bool
    need: tuple[bool, bool, bool]
    need_grad: bool
    chunks: list
    rows_local: bool
    rng: tuple[torch.Generator, torch.Tensor] | None


def _chunks(keep: torch.Tensor, chunk: int, compact: bool, coupled: bool) -> list:
    """The chunks: ``(where, b0, b1)`` with ``where`` the chunk's flat token positions (a slice, or an
    index tensor when masked positions are skipped) and ``[b0, b1)`` the rows it touches. Per-token
    derivatives allow any cut; a sequence-level ratio (``coupled``, GSPO) gets whole sequences."""
    b, t = keep.shape
    if not compact:
        step = max(1, chunk // t) * t if coupled and t else chunk
        return [
            (slice(k0, min(b * t, k0 + step)), k0 // t, (min(b * t, k0 + step) - 1) // t + 1)
            for k0 in range(0, b * t, step)
        ]
    pos = keep.reshape(-1).nonzero().squeeze(1)
    pos_cpu = pos.cpu()  # one host-device sync on an accelerator (compaction is opt-in there)
    if coupled:  # whole rows, as many as fit in `chunk` kept tokens (at least one)
        per_row = torch.count_nonzero(keep, dim=-1).cpu().tolist()
        bounds, start, size = [], 0, 0
        for n_b in per_row:
            if size and size + n_b > chunk:
                bounds.append((start, start + size))
                start, size = start + size, 0
            size += n_b
        if size:
            bounds.append((start, start + size))
    else:
        bounds = [(c0, min(pos.numel(), c0 + chunk)) for c0 in range(0, pos.numel(), chunk)]
    return [(pos[c0:c1], int(pos_cpu[c0]) // t, int(pos_cpu[c1 - 1]) // t + 1) for c0, c1 in bounds]


def _outputs(batch: _Batch, plan: _Plan):
    """Flat ``[N]`` buffers for the log-probs and (with an entropy term) the entropy."""
    n, device = batch.tokens.numel(), batch.hidden.device
    logp_all = torch.zeros(n, dtype=plan.dtype, device=device)
    return logp_all, (torch.zeros_like(logp_all) if plan.want_entropy else None)


def _store(batch: _Batch, where, logp, ent, logp_all, entropy_all):
    """A chunk's ``(logp, entropy)`` with ignored positions at 0 and out-of-range ids at NaN, written into
    the flat outputs and returned (what the chunk's derivative call sees)."""
    if batch.ignored is not None:
        logp = logp.masked_fill(batch.ignored[where], 0)
        ent = None if ent is None else ent.masked_fill(batch.ignored[where], 0)
    if batch.invalid is not None:
        logp = logp.masked_fill(batch.invalid[where], float("nan"))
    logp_all[where] = logp
    if entropy_all is not None:
        entropy_all[where] = ent
    return logp, ent


def _cast_grads(grads, hidden, weight, bias):
    """The accumulated gradients in the dtypes (and ``hidden``'s shape) of the tensors they belong to."""
    g_h, g_w, g_b = grads
    return (
        None if g_h is None else g_h.view(hidden.shape).to(hidden.dtype),
        None if g_w is None else g_w.to(weight.dtype),
        None if g_b is None or bias is None else g_b.to(bias.dtype),
    )


def _size(where) -> int:
    return where.stop - where.start if isinstance(where, slice) else where.numel()
