r"""Token log-probabilities (and entropy) from logits, or from hidden states without the ``[N, V]`` logits.

In RL on language models the memory that ends long-context runs is the logits
tensor: 8k tokens × 152k vocabulary in bf16 is 2.4 GB per sequence, twice that
with its gradient. [`from_hidden`][rpg.logprobs.from_hidden] takes the hidden states ``[N, H]`` and the
LM head ``[V, H]`` and computes, per token,

    z = (h·Wᵀ + b) / temperature,   log p(y) = z_y − logsumexp(z),
    H = logsumexp(z) − Σ_v softmax(z)_v·z_v                 (entropy)

in blocks of ``chunk_size`` tokens × ``vocab_chunk_size`` vocabulary entries
with an online log-sum-exp, so no more than one block of logits exists at a
time. The backward pass recomputes each block (nothing of size V is saved) and
is exact:

    ∂/∂z_v [a·log p(y) + e·H] = a·(δ_vy − p_v) − e·p_v·(z_v − μ),  μ = Σ p·z,

back-propagated to ``hidden``, ``weight`` and ``bias``. The arithmetic is in
float32 for bf16/fp16 inputs and in float64 for float64 inputs; results equal
[`from_logits`][rpg.logprobs.from_logits] on the materialised logits (to 1e-9 in float64, tested).

**Next-token shift.** Both functions score ``tokens[..., t]`` under the
distribution at position ``t``; a causal LM's position ``t`` predicts the token
at ``t + 1``, so shift before calling (Hugging Face layout):

```python
import torch
from rpg.logprobs import from_logits

B, L, T, V = 2, 9, 4, 11  # batch, prompt + response length, response length, vocabulary
input_ids = torch.randint(0, V, (B, L))
logits = torch.randn(B, L, V)  # a causal LM's: model(input_ids, attention_mask=attention_mask).logits
logp = from_logits(logits[:, :-1], input_ids[:, 1:])  # [B, L-1]
logp_response = logp[:, -T:]  # input_ids = [prompt | response of T tokens], verl's layout
```

**Ignored positions.** With ``ignore_index`` (e.g. ``-100``, the Hugging Face
label convention), positions whose token equals it get log-prob 0, entropy 0
and no gradient — also when their logits or hidden states are NaN — on every
device. Without it, token ids outside ``[0, V)`` raise ``ValueError`` on CPU; on
an accelerator that check would be a host-device sync, so it is skipped there
([`from_hidden`][rpg.logprobs.from_hidden] then gives NaN at such a position; [`from_logits`][rpg.logprobs.from_logits]
fails in ``gather``).

**Derivatives.** Derivatives of every order are exact. [`from_logits`][rpg.logprobs.from_logits] is
plain autograd. [`from_hidden`][rpg.logprobs.from_hidden]'s backward is itself differentiable: the
second derivative (a Hessian-vector product through ``create_graph=True``) has
a closed form computed block by block like the first. Higher orders, and
forward mode over the gradient (``torch.func.hessian``), differentiate through
closed forms with autograd, so their memory grows like the materialised
logits'. [`from_hidden`][rpg.logprobs.from_hidden] works under ``torch.func`` too:
``grad``, ``vmap`` (per-example gradients), ``jacrev``, ``jvp``, ``jacfwd`` and
``hessian``.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from ._util import as_int, as_real, check_floating, compute_dtype

__all__ = ["from_logits", "from_hidden"]


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under ``torch.func`` wrappers (a vmapped batch holds every example)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _check_tokens(
    tokens: torch.Tensor, shape: torch.Size, vocab: int, name: str, ignore_index: int | None = None
) -> None:
    """Type and shape always; the id range only on CPU and eagerly (on an accelerator that check would
    be a host-device sync, and under ``torch.compile`` a graph break — there an out-of-range id gives
    NaN in [`from_hidden`][rpg.logprobs.from_hidden]). Ids equal to ``ignore_index`` are exempt. Every
    integer dtype is accepted (int8 to int64, unsigned too): the one validator of ``from_logits``,
    ``from_hidden`` and [`FusedLinearLoss`][rpg.fused.FusedLinearLoss]."""
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.dtype == torch.bool
        or tokens.is_floating_point()
        or tokens.is_complex()
    ):
        raise TypeError(f"tokens must be an integer tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.shape != shape:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)} but {name} needs {tuple(shape)}")
    if torch.compiler.is_compiling():  # a data-dependent check would break the graph: skipped when compiled
        return
    plain = _unwrapped(tokens)
    if plain.device.type == "cpu" and plain.numel():
        if ignore_index is not None:
            plain = plain.masked_fill(plain == ignore_index, 0)
        lo, hi = int(plain.min()), int(plain.max())
        if lo < 0 or hi >= vocab:
            hint = " (pass ignore_index= to skip padding ids such as -100)" if ignore_index is None else ""
            raise ValueError(f"tokens must lie in [0, {vocab}), got values in [{lo}, {hi}]{hint}")


def _check_temperature(temperature: object) -> float:
    t = as_real("temperature", temperature)
    if not 0 < t < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def _check_ignore_index(ignore_index: object) -> int | None:
    return None if ignore_index is None else as_int("ignore_index", ignore_index)


def _check_chunk(name: str, size: object) -> int | None:
    if size is None:
        return None
    s = as_int(name, size)
    if s < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {size!r}")
    return s


@overload
def from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: Literal[False] = False,
    ignore_index: int | None = None,
) -> torch.Tensor: ...


@overload
def from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: Literal[True],
    ignore_index: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool,
    ignore_index: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""log π(token) from materialised logits ``[..., V]`` and ``tokens`` ``[...]``.

    ``logits[..., t, :]`` must be the distribution that ``tokens[..., t]`` was drawn
    from: for a causal LM's outputs, pass ``logits[:, :-1]`` with
    ``input_ids[:, 1:]`` (position t predicts token t + 1; module docstring).

    Args:
        logits: ``[..., V]`` floating logits (bf16/fp16 are computed in float32).
        tokens: ``[...]`` integer ids in ``[0, V)`` (or ``ignore_index``).
        temperature: the logits are divided by it (the sampling temperature).
        return_entropy: also return the entropy of each distribution.
        ignore_index: a token id (``-100`` in Hugging Face labels) whose positions get
            log-prob 0, entropy 0 and no gradient, whatever their logits; ``None`` (default):
            every id must be valid. With float32 logits at temperature 1 this costs one
            copy of the logits (bf16 logits are copied to float32 anyway).

    Returns:
        ``logp`` ``[...]``, or ``(logp, entropy)``; float32 for bf16/fp16 logits. Plain
        autograd (any order of derivatives, ``torch.func``); see [`from_hidden`][rpg.logprobs.from_hidden] to avoid
        materialising the logits.

    Example (Hugging Face labels, ``-100`` outside the response):

    ```python
    import torch
    from rpg.logprobs import from_logits

    input_ids = torch.randint(0, 11, (2, 9))
    labels = input_ids.clone()
    labels[:, :5] = -100  # the prompt
    logits = torch.randn(2, 9, 11)  # a causal LM's: model(input_ids).logits
    logp = from_logits(logits[:, :-1], labels[:, 1:], ignore_index=-100)
    ```
    """
    check_floating("logits", logits)
    temperature = _check_temperature(temperature)
    ignore_index = _check_ignore_index(ignore_index)
    _check_tokens(tokens, logits.shape[:-1], logits.shape[-1], "logits[..., V]", ignore_index)
    z = logits.to(compute_dtype(logits.dtype))
    if temperature != 1.0:
        z = z / temperature
    tokens = tokens.long()
    ignored = None
    if ignore_index is not None:
        ignored = tokens == ignore_index
        tokens = tokens.masked_fill(ignored, 0)
        # the ignored rows' logits never enter the result, so NaN there cannot reach a gradient
        z = z.masked_fill_(ignored.unsqueeze(-1), 0) if z is not logits else z.masked_fill(ignored.unsqueeze(-1), 0)
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    if ignored is not None:
        logp = logp.masked_fill(ignored, 0)
    if not return_entropy:
        return logp
    p = torch.softmax(z, -1)
    finite_z = torch.where(torch.isinf(z), torch.zeros_like(z), z)  # p·z = 0 where z = −inf (p = 0)
    entropy = lse - (p * finite_z).sum(-1)
    if ignored is not None:
        entropy = entropy.masked_fill(ignored, 0)
    return logp, entropy


def _block(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``[rows, cols]`` view of a preallocated flat buffer (blocks reuse memory, so the
    allocator never holds more than the two buffers)."""
    return buf[: rows * cols].view(rows, cols)


def _block_logits(out, h, weight, bias, v0, v1, temperature, dtype):
    z = torch.mm(h, weight[v0:v1].to(dtype).T, out=out)
    if bias is not None:
        z += bias[v0:v1].to(dtype)
    if temperature != 1.0:
        z /= temperature
    return z


def _buffers(hidden, weight, chunk_size, vocab_chunk_size, dtype):
    rows, cols = min(chunk_size, hidden.shape[0]), min(vocab_chunk_size, weight.shape[0])
    return (torch.empty(rows * cols, dtype=dtype, device=hidden.device) for _ in range(2))


def _rows(hidden, ignored, r0, r1, dtype, buf=None):
    """Rows ``r0:r1`` of ``hidden`` in ``dtype``, zero where ``ignored`` (so NaN there cannot spread);
    ``buf`` (flat, reused across chunks) holds the masked copy."""
    h = hidden[r0:r1].to(dtype)
    if ignored is None:
        return h
    keep, zero = ~ignored[r0:r1].unsqueeze(1), torch.zeros((), dtype=dtype, device=h.device)
    if buf is None:
        return torch.where(keep, h, zero)
    return torch.where(keep, h, zero, out=_block(buf, r1 - r0, h.shape[1]))


def _head_logits(h, weight, bias, v0, v1, temperature, dtype):
    """Out-of-place block of logits (for the derivative passes that must run under ``torch.func``)."""
    z = h @ weight[v0:v1].to(dtype).T
    if bias is not None:
        z = z + bias[v0:v1].to(dtype)
    return z / temperature if temperature != 1.0 else z


def _head_direction(h, weight, d_hidden, d_weight, d_bias, v0, v1, dtype):
    """The head's pre-temperature logits, linearised along a direction: ``dh·Wᵀ + h·dWᵀ + db`` for vocabulary
    rows ``[v0, v1)`` (``[m, v1 − v0]``; a ``None`` part of the direction contributes nothing)."""
    out = torch.zeros(h.shape[0], v1 - v0, dtype=dtype, device=h.device)
    if d_hidden is not None:
        out = out + d_hidden @ weight[v0:v1].to(dtype).T
    if d_weight is not None:
        out = out + h @ d_weight[v0:v1].to(dtype).T
    if d_bias is not None:
        out = out + d_bias[v0:v1].to(dtype)
    return out


class _FromHidden(torch.autograd.Function):
    """log p(y) and entropy from ``hidden`` and the LM head; outputs ``(logp, entropy, lse, mu)``
    (``lse`` = logsumexp(z) and ``mu`` = Σ p·z are non-differentiable, saved for the derivatives)."""

    @staticmethod
    def forward(
        hidden,
        weight,
        bias,
        tokens,
        ignored,
        temperature,
        chunk_size,
        vocab_chunk_size,
        want_entropy,
    ):
        dtype = compute_dtype(hidden.dtype)
        n, v = hidden.shape[0], weight.shape[0]
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        target = torch.empty(n, dtype=dtype, device=hidden.device)
        mu = torch.empty(n, dtype=dtype, device=hidden.device) if want_entropy else None
        z_buf, e_buf = _buffers(hidden, weight, chunk_size, vocab_chunk_size, dtype)
        h_buf = None
        if ignored is not None:
            h_buf = torch.empty(min(chunk_size, n) * hidden.shape[1], dtype=dtype, device=hidden.device)
        for r0 in range(0, n, chunk_size):
            r1 = min(n, r0 + chunk_size)
            h = _rows(hidden, ignored, r0, r1, dtype, h_buf)
            y = tokens[r0:r1]
            run_max = torch.full((r1 - r0,), -float("inf"), dtype=dtype, device=hidden.device)
            run_sum = torch.zeros_like(run_max)
            run_pz = torch.zeros_like(run_max) if want_entropy else None
            target[r0:r1] = float("nan")  # stays NaN for an out-of-range id
            for v0 in range(0, v, vocab_chunk_size):
                v1 = min(v, v0 + vocab_chunk_size)
                z = _block_logits(_block(z_buf, r1 - r0, v1 - v0), h, weight, bias, v0, v1, temperature, dtype)
                inside = (y >= v0) & (y < v1)
                picked = z.gather(1, (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
                target[r0:r1] = torch.where(inside, picked, target[r0:r1])
                new_max = torch.maximum(run_max, z.max(1).values)
                # a row whose logits so far are all −inf (e.g. a −inf bias block) has max −inf: shift by 0
                shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                scale = torch.exp(run_max - shift)  # 0 on the first block (run_max = −inf)
                e = torch.sub(z, shift.unsqueeze(1), out=_block(e_buf, r1 - r0, v1 - v0)).exp_()
                run_sum = run_sum * scale + e.sum(1)
                if want_entropy:  # Σ e·z as a batched dot product: no third block in memory
                    z.masked_fill_(e == 0, 0)  # p·z → 0 where p = 0, also for z = −inf
                    run_pz = run_pz * scale + torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)
                run_max = new_max
            lse[r0:r1] = run_max + run_sum.log()
            if want_entropy:
                mu[r0:r1] = run_pz / run_sum
        logp = target - lse
        entropy = lse - mu if want_entropy else None
        if ignored is not None:
            logp.masked_fill_(ignored, 0)
            if want_entropy:
                entropy.masked_fill_(ignored, 0)
        return logp, entropy, lse, mu

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, tokens, ignored, temperature, chunk_size, vocab_chunk_size, _ = inputs
        _, _, lse, mu = output
        ctx.mark_non_differentiable(*(t for t in (lse, mu) if t is not None))
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) costs nothing in backward
        ctx.save_for_backward(hidden, weight, bias, tokens, ignored, lse, mu)
        ctx.save_for_forward(hidden, weight, bias, tokens, ignored, lse, mu)
        ctx.params = (temperature, chunk_size, vocab_chunk_size)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse, _grad_mu):
        hidden, weight, bias, tokens, ignored, lse, mu = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if mu is None:
            grad_entropy = None
        if (grad_logp is None and grad_entropy is None) or not any(need):
            return (None,) * 9
        grads = _HiddenGrad.apply(
            grad_logp, grad_entropy, hidden, weight, bias, tokens, ignored, lse, mu, *ctx.params, *need
        )
        return (*grads, None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, d_hidden, d_weight, d_bias, *_):
        hidden, weight, bias, tokens, ignored, lse, mu = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk_size = ctx.params
        d_logp, d_entropy = _forward_tangents(
            hidden,
            weight,
            bias,
            tokens,
            ignored,
            lse,
            mu,
            d_hidden,
            d_weight,
            d_bias,
            temperature,
            chunk_size,
            vocab_chunk_size,
        )
        return d_logp, d_entropy, None, None

    @staticmethod
    def vmap(info, in_dims, hidden, weight, bias, tokens, ignored, *params):
        if in_dims[1] is None and in_dims[2] is None:  # a shared head: the batch is just more rows
            b = info.batch_size
            h, t, ig = (_leading(x, in_dims[i], b) for x, i in ((hidden, 0), (tokens, 3), (ignored, 4)))
            n = h.shape[1]
            out = _FromHidden.apply(
                h.reshape(b * n, -1), weight, bias, t.reshape(-1), None if ig is None else ig.reshape(-1), *params
            )
            return tuple(None if o is None else o.view(b, n) for o in out), tuple(None if o is None else 0 for o in out)
        return _loop_vmap(_FromHidden.apply, info, in_dims, (hidden, weight, bias, tokens, ignored, *params))


def _leading(x, dim, size):
    """``x`` with its vmapped dimension first (broadcast to ``size`` when it has none); ``None`` stays."""
    if x is None:
        return None
    return x.movedim(dim, 0) if dim is not None else x.unsqueeze(0).expand(size, *x.shape)


def _loop_vmap(apply, info, in_dims, args):
    """The general vmap rule: one call per batch element, outputs stacked on dimension 0."""
    outs = []
    for i in range(info.batch_size):
        one = [a.select(d, i) if d is not None and a is not None else a for a, d in zip(args, in_dims, strict=False)]
        outs.append(apply(*one))
    first = outs[0]
    stacked = tuple(None if first[k] is None else torch.stack([o[k] for o in outs]) for k in range(len(first)))
    return stacked, tuple(None if s is None else 0 for s in stacked)


class _HiddenGrad(torch.autograd.Function):
    """The first derivative of `_FromHidden`: (d_hidden, d_weight, d_bias) from the upstream
    gradients (a = ∂L/∂logp, e = ∂L/∂entropy). A Function of its own so that it is differentiable too
    (exact second derivatives, `_second_order`) and has a vmap rule."""

    @staticmethod
    def forward(
        grad_logp,
        grad_entropy,
        hidden,
        weight,
        bias,
        tokens,
        ignored,
        lse,
        mu,
        temperature,
        chunk_size,
        vocab_chunk_size,
        need_h,
        need_w,
        need_b,
    ):
        dtype = compute_dtype(hidden.dtype)
        n, v = hidden.shape[0], weight.shape[0]
        d_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        d_bias = torch.zeros(v, dtype=dtype, device=weight.device) if need_b else None
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(dtype)
        use_entropy = grad_entropy is not None and mu is not None
        if ignored is not None:  # no gradient at ignored positions, whatever the upstream gradient
            grad_logp = grad_logp.masked_fill(ignored, 0)
            if use_entropy:
                grad_entropy = grad_entropy.masked_fill(ignored, 0)
        z_buf, p_buf = _buffers(hidden, weight, chunk_size, vocab_chunk_size, dtype)
        h_buf = None
        if ignored is not None:
            h_buf = torch.empty(min(chunk_size, n) * hidden.shape[1], dtype=dtype, device=hidden.device)
        for r0 in range(0, n, chunk_size):
            r1 = min(n, r0 + chunk_size)
            h = _rows(hidden, ignored, r0, r1, dtype, h_buf)
            y = tokens[r0:r1]
            a = grad_logp[r0:r1].unsqueeze(1)
            if use_entropy:
                e_grad = grad_entropy[r0:r1].to(dtype).unsqueeze(1)
                mu_r = mu[r0:r1].unsqueeze(1)
            for v0 in range(0, v, vocab_chunk_size):
                v1 = min(v, v0 + vocab_chunk_size)
                z = _block_logits(_block(z_buf, r1 - r0, v1 - v0), h, weight, bias, v0, v1, temperature, dtype)
                p = torch.sub(z, lse[r0:r1].unsqueeze(1), out=_block(p_buf, r1 - r0, v1 - v0)).exp_()
                # dz = a·(onehot − p) − e·p·(z − μ), built in place in z's (or p's) storage
                if use_entropy:
                    z.masked_fill_(p == 0, 0)  # those entries get no gradient; keeps −inf logits finite
                    dz = z.sub_(mu_r).mul_(e_grad).add_(a).mul_(p).neg_()
                else:
                    dz = p.mul_(a).neg_()
                inside = (y >= v0) & (y < v1)  # one-hot term, without a host-device sync
                col = (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
                dz.scatter_add_(1, col, torch.where(inside.unsqueeze(1), a, torch.zeros_like(a)))
                if temperature != 1.0:
                    dz /= temperature
                if need_h:
                    d_hidden[r0:r1].addmm_(dz, weight[v0:v1].to(dtype))
                if need_w:
                    d_weight[v0:v1].addmm_(dz.T, h)
                if need_b:
                    d_bias[v0:v1] += dz.sum(0)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(d_hidden, hidden), cast(d_weight, weight), cast(d_bias, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[:9])
        ctx.save_for_forward(*inputs[:9])
        ctx.params = inputs[9:12]
        ctx.outputs_needed = inputs[12:15]

    @staticmethod
    def backward(ctx, u_hidden, u_weight, u_bias):
        # Under create_graph=True (or torch.func) the closed form below is recorded by autograd like any
        # other code, so third and higher derivatives are exact too; it then recomputes lse and μ
        # instead of reusing the saved (non-differentiable) ones.
        out = _second_order(
            *ctx.saved_tensors,
            u_hidden,
            u_weight,
            u_bias,
            *ctx.params,
            need=ctx.needs_input_grad[:5],
            differentiable=torch.is_grad_enabled(),
        )
        return tuple(out) + (None,) * 10

    @staticmethod
    def jvp(ctx, *tangents):
        # forward mode over the gradient (torch.func.hessian = jacfwd(jacrev)): differentiate the
        # out-of-place form of this kernel with torch.func.jvp; exact, at the memory of autograd
        grad_logp, grad_entropy, hidden, weight, bias, tokens, ignored, _, mu = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk_size = ctx.params
        primals = (grad_logp, grad_entropy, hidden, weight, bias)
        live = [
            i for i, (x, t) in enumerate(zip(primals, tangents[:5], strict=False)) if x is not None and t is not None
        ]

        def first(*xs):
            args = list(primals)
            for i, x in zip(live, xs, strict=False):
                args[i] = x
            out = _first_order(
                *args, tokens, ignored, mu is not None, temperature, chunk_size, vocab_chunk_size, ctx.outputs_needed
            )
            return tuple(o for o in out if o is not None)

        if not live or not any(ctx.outputs_needed):
            return None, None, None
        _, d_out = torch.func.jvp(first, tuple(primals[i] for i in live), tuple(tangents[i] for i in live))
        d_out = iter(d_out)
        return tuple(next(d_out) if need else None for need in ctx.outputs_needed)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _loop_vmap(_HiddenGrad.apply, info, in_dims, args)


def _first_order(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    tokens,
    ignored,
    want_entropy,
    temperature,
    chunk_size,
    vocab_chunk_size,
    need,
):
    """`_HiddenGrad`'s result, out of place and with lse and μ recomputed: a plain differentiable
    function of its tensors (for forward mode over the gradient). Memory as autograd's, not the kernel's."""
    need_h, need_w, need_b = need
    dtype = compute_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    tau = 1.0 / temperature
    zeros_n = torch.zeros(n, dtype=dtype, device=hidden.device)
    a_all = zeros_n if grad_logp is None else grad_logp.to(dtype)
    e_all = grad_entropy.to(dtype) if grad_entropy is not None and want_entropy else None
    if ignored is not None:
        a_all = torch.where(ignored, zeros_n, a_all)
        e_all = None if e_all is None else torch.where(ignored, zeros_n, e_all)
    blocks = [(v0, min(v, v0 + vocab_chunk_size)) for v0 in range(0, v, vocab_chunk_size)]
    d_h, d_w, d_b = [], [0] * len(blocks), [0] * len(blocks)
    for r0 in range(0, n, chunk_size):
        r1 = min(n, r0 + chunk_size)
        h = _rows(hidden, ignored, r0, r1, dtype)
        y, a = tokens[r0:r1], a_all[r0:r1].unsqueeze(1)
        e = None if e_all is None else e_all[r0:r1].unsqueeze(1)
        zs = [_head_logits(h, weight, bias, v0, v1, temperature, dtype) for v0, v1 in blocks]
        lse = torch.logsumexp(torch.stack([torch.logsumexp(z, -1) for z in zs]), 0).unsqueeze(1)
        ps = [torch.exp(z - lse) for z in zs]
        fzs = [torch.where(p > 0, z, torch.zeros_like(z)) for z, p in zip(zs, ps, strict=False)]
        mu = sum((p * fz).sum(-1, keepdim=True) for p, fz in zip(ps, fzs, strict=False)) if e is not None else None
        dh = 0
        for j, ((v0, v1), p, fz) in enumerate(zip(blocks, ps, fzs, strict=False)):
            onehot = (torch.arange(v0, v1, device=y.device) == y.unsqueeze(1)) & ((y >= v0) & (y < v1)).unsqueeze(1)
            dz = a * (onehot.to(dtype) - p)
            if e is not None:
                dz = dz - e * p * (fz - mu)
            dz = tau * dz
            if need_h:
                dh = dh + dz @ weight[v0:v1].to(dtype)
            if need_w:
                d_w[j] = d_w[j] + dz.T @ h
            if need_b:
                d_b[j] = d_b[j] + dz.sum(0)
        if need_h:
            d_h.append(dh if isinstance(dh, torch.Tensor) else torch.zeros_like(h))
    out_h = (torch.cat(d_h) if d_h else torch.zeros_like(hidden, dtype=dtype)).to(hidden.dtype) if need_h else None
    out_w = _cat_vocab(d_w, blocks, weight.shape[1:], dtype, weight.device).to(weight.dtype) if need_w else None
    out_b = _cat_vocab(d_b, blocks, (), dtype, weight.device).to(bias.dtype) if need_b else None
    return out_h, out_w, out_b


def _cat_vocab(parts, blocks, tail, dtype, device):
    """Per-vocabulary-block accumulators (the int 0 where a block got nothing) as one ``[V, *tail]`` tensor."""
    return torch.cat(
        [
            p if isinstance(p, torch.Tensor) else torch.zeros(v1 - v0, *tail, dtype=dtype, device=device)
            for p, (v0, v1) in zip(parts, blocks, strict=False)
        ]
    )


def _forward_tangents(
    hidden,
    weight,
    bias,
    tokens,
    ignored,
    lse,
    mu,
    d_hidden,
    d_weight,
    d_bias,
    temperature,
    chunk_size,
    vocab_chunk_size,
):
    """Forward-mode derivative of (logp, entropy) along (d_hidden, d_weight, d_bias):

        dz = (dh·Wᵀ + h·dWᵀ + db) / temperature,  d logp = dz_y − Σ p·dz,  dH = −Σ p·(z − μ)·dz,

    block by block from the saved lse and μ; out of place, so ``torch.func`` can batch it."""
    dtype = compute_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    want_entropy = mu is not None
    d_logp, d_entropy = [], []
    for r0 in range(0, n, chunk_size):
        r1 = min(n, r0 + chunk_size)
        h = _rows(hidden, ignored, r0, r1, dtype)
        dh = None if d_hidden is None else _rows(d_hidden, ignored, r0, r1, dtype)
        y, lse_r = tokens[r0:r1], lse[r0:r1].unsqueeze(1)
        dy = s_pdz = s_pzdz = 0
        for v0 in range(0, v, vocab_chunk_size):
            v1 = min(v, v0 + vocab_chunk_size)
            z = _head_logits(h, weight, bias, v0, v1, temperature, dtype)
            p = torch.exp(z - lse_r)
            dz = _head_direction(h, weight, dh, d_weight, d_bias, v0, v1, dtype)
            if temperature != 1.0:
                dz = dz / temperature
            inside = (y >= v0) & (y < v1)
            picked = dz.gather(-1, (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(-1)).squeeze(-1)
            dy = dy + torch.where(inside, picked, torch.zeros_like(picked))
            s_pdz = s_pdz + (p * dz).sum(-1)
            if want_entropy:
                s_pzdz = s_pzdz + (p * torch.where(p > 0, z, torch.zeros_like(z)) * dz).sum(-1)
        d_logp.append(dy - s_pdz)
        if want_entropy:
            d_entropy.append(-(s_pzdz - mu[r0:r1] * s_pdz))
    d_logp = torch.cat(d_logp) if d_logp else torch.zeros_like(lse)
    d_entropy = (torch.cat(d_entropy) if d_entropy else torch.zeros_like(lse)) if want_entropy else None
    if ignored is not None:
        d_logp = torch.where(ignored, torch.zeros_like(d_logp), d_logp)
        if want_entropy:
            d_entropy = torch.where(ignored, torch.zeros_like(d_entropy), d_entropy)
    return d_logp, d_entropy


def _second_order(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    tokens,
    ignored,
    lse,
    mu,
    u_h,
    u_w,
    u_b,
    temperature,
    chunk_size,
    vocab_chunk_size,
    need,
    differentiable=False,
):
    r"""Reverse-mode derivative of the first derivative (`_HiddenGrad`), exact.

    Per row, with τ = 1/temperature, G_v = a·(δ_vy − p_v) − e·p_v·(z_v − μ) (so ``d_hidden = τ·G·W``,
    ``d_weight = τ·Gᵀ·h``, ``d_bias = τ·Σ G``) and the cotangents (u_h, u_w, u_b) of those outputs,
    s = τ·Σ_v G_v·M_v with M_v = u_h·W_v + h·u_w,v + u_b,v. With m̄ = Σ p·M and c = Σ p·(z − μ)·M:

        ∂s/∂a = τ·(M_y − m̄),   ∂s/∂e = −τ·c,
        ∂s/∂z_k = τ·q_k,  q_k = −p_k·[(a + e·(1 + z_k − μ))·(M_k − m̄) − e·c],

    and z = τ·(h·Wᵀ + b) gives ∂s/∂h = τ²·q·W + τ·G·u_w, ∂s/∂W = τ²·qᵀ·h + τ·Gᵀ·u_h,
    ∂s/∂b = τ²·Σ q.
    Two passes over the vocabulary blocks per row chunk (m̄ and c first); out of place throughout so
    ``torch.func`` can batch it and autograd can differentiate it. With ``differentiable``, lse and μ
    are recomputed from ``hidden``, ``weight`` and ``bias`` (one more pass) rather than taken as saved,
    so that differentiating the result (third derivatives) is exact. Returns the cotangents of
    (grad_logp, grad_entropy, hidden, weight, bias)."""
    need_a, need_e, need_h, need_w, need_b = need
    dtype = compute_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    tau = 1.0 / temperature
    zeros_n = torch.zeros(n, dtype=dtype, device=hidden.device)
    a_all = zeros_n if grad_logp is None else grad_logp.to(dtype)
    e_all = None if grad_entropy is None or mu is None else grad_entropy.to(dtype)
    if ignored is not None:
        a_all = torch.where(ignored, zeros_n, a_all)
        e_all = None if e_all is None else torch.where(ignored, zeros_n, e_all)
    blocks = [(v0, min(v, v0 + vocab_chunk_size)) for v0 in range(0, v, vocab_chunk_size)]
    g_a, g_e, g_h = [], [], []
    g_w = [0] * len(blocks)
    g_b = [0] * len(blocks)
    for r0 in range(0, n, chunk_size):
        r1 = min(n, r0 + chunk_size)
        h = _rows(hidden, ignored, r0, r1, dtype)
        y = tokens[r0:r1]
        a = a_all[r0:r1].unsqueeze(1)
        e = None if e_all is None else e_all[r0:r1].unsqueeze(1)
        uh = None if u_h is None else _rows(u_h, ignored, r0, r1, dtype)
        if differentiable:  # lse and μ as functions of hidden, weight and bias
            lse_r = torch.logsumexp(
                torch.stack(
                    [
                        torch.logsumexp(_head_logits(h, weight, bias, v0, v1, temperature, dtype), -1)
                        for v0, v1 in blocks
                    ]
                ),
                0,
            ).unsqueeze(1)
            mu_r = None
            if e is not None:
                mu_r = 0
                for v0, v1 in blocks:
                    z = _head_logits(h, weight, bias, v0, v1, temperature, dtype)
                    finite_z = torch.where(torch.isinf(z), torch.zeros_like(z), z)
                    mu_r = mu_r + (torch.exp(z - lse_r) * finite_z).sum(-1, keepdim=True)
        else:
            lse_r = lse[r0:r1].unsqueeze(1)
            mu_r = None if e is None else mu[r0:r1].unsqueeze(1)

        def block(v0, v1, h=h, lse_r=lse_r, uh=uh, y=y):
            z = _head_logits(h, weight, bias, v0, v1, temperature, dtype)
            p = torch.exp(z - lse_r)
            fz = torch.where(p > 0, z, torch.zeros_like(z))  # z = −inf has p = 0: no 0·inf
            m = _head_direction(h, weight, uh, u_w, u_b, v0, v1, dtype)
            inside = ((y >= v0) & (y < v1)).unsqueeze(1)
            onehot = (torch.arange(v0, v1, device=y.device) == y.unsqueeze(1)) & inside
            return p, fz, m, onehot

        m_bar = c = m_y = 0
        for v0, v1 in blocks:  # pass 1: m̄, c and M_y per row
            p, fz, m, onehot = block(v0, v1)
            m_bar = m_bar + (p * m).sum(-1, keepdim=True)
            m_y = m_y + torch.where(onehot, m, torch.zeros_like(m)).sum(-1, keepdim=True)
            if e is not None:
                c = c + (p * (fz - mu_r) * m).sum(-1, keepdim=True)
        g_a.append((tau * (m_y - m_bar)).squeeze(-1) if isinstance(m_y, torch.Tensor) else zeros_n[r0:r1])
        if e is not None:
            g_e.append((-tau * c).squeeze(-1) if isinstance(c, torch.Tensor) else zeros_n[r0:r1])
        if not (need_h or need_w or need_b):
            continue
        gh = 0
        for j, (v0, v1) in enumerate(blocks):  # pass 2: the cotangents of hidden, weight and bias
            p, fz, m, onehot = block(v0, v1)
            big_g = a * (onehot.to(dtype) - p)
            slope = a
            if e is not None:
                big_g = big_g - e * p * (fz - mu_r)
                slope = a + e * (1 + fz - mu_r)
            q = -p * (slope * (m - m_bar) - (e * c if e is not None else 0))
            w_blk = weight[v0:v1].to(dtype)
            if need_h:
                gh = gh + tau * tau * (q @ w_blk)
                if u_w is not None:
                    gh = gh + tau * (big_g @ u_w[v0:v1].to(dtype))
            if need_w:
                g_w[j] = g_w[j] + tau * tau * (q.T @ h)
                if uh is not None:
                    g_w[j] = g_w[j] + tau * (big_g.T @ uh)
            if need_b:
                g_b[j] = g_b[j] + tau * tau * q.sum(0)
        if need_h:
            g_h.append(gh if isinstance(gh, torch.Tensor) else torch.zeros_like(h))
    out_a = torch.cat(g_a) if need_a and g_a else None
    out_e = torch.cat(g_e) if need_e and g_e else None
    if ignored is not None:
        out_a = None if out_a is None else torch.where(ignored, zeros_n, out_a)
        out_e = None if out_e is None else torch.where(ignored, zeros_n, out_e)
    out_h = out_w = out_b = None
    if need_h:
        out_h = torch.cat(g_h) if g_h else torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
        if ignored is not None:
            out_h = torch.where(ignored.unsqueeze(1), torch.zeros((), dtype=dtype, device=out_h.device), out_h)
        out_h = out_h.to(hidden.dtype)
    if need_w:
        out_w = _cat_vocab(g_w, blocks, weight.shape[1:], dtype, weight.device).to(weight.dtype)
    if need_b:
        out_b = _cat_vocab(g_b, blocks, (), dtype, weight.device).to(bias.dtype)
    if out_a is not None and grad_logp is not None:
        out_a = out_a.to(grad_logp.dtype)
    if out_e is not None and grad_entropy is not None:
        out_e = out_e.to(grad_entropy.dtype)
    return out_a, out_e, out_h, out_w, out_b


def from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    return_entropy: bool = False,
    ignore_index: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""log π(token) from hidden states and the LM head, never materialising the ``[N, V]`` logits.

    ``hidden[..., t, :]`` must be the final hidden state (after the model's last norm) at the
    position whose next-token distribution ``tokens[..., t]`` was drawn from: for a causal LM, the
    hidden state at position t predicts the token at t + 1, so shift (Hugging Face layout):

    ```python
    import torch
    from rpg.logprobs import from_hidden

    B, L, H, V = 2, 9, 16, 50
    input_ids, lm_head = torch.randint(0, V, (B, L)), torch.nn.Linear(H, V, bias=False)
    last_hidden_state = torch.randn(B, L, H)  # model.model(input_ids, attention_mask=...).last_hidden_state
    hidden = last_hidden_state[:, :-1]  # [B, L-1, H]
    logp = from_hidden(hidden, lm_head.weight, input_ids[:, 1:])  # [B, L-1]
    ```

    (``model.model`` is the decoder of Llama/Qwen-style models; ``last_hidden_state`` is after the
    final norm.) With Hugging Face ``labels`` (``-100`` outside the loss), pass ``labels[:, 1:]`` and
    ``ignore_index=-100``.

    Args:
        hidden: ``[N, H]`` final hidden states (any leading shape is flattened:
            ``[..., H]`` with ``tokens`` ``[...]``).
        weight: ``[V, H]`` the LM head (``lm_head.weight``).
        tokens: ``[N]`` integer token ids in ``[0, V)`` (or ``ignore_index``).
        bias: ``[V]`` or ``None``.
        temperature: logits are divided by it (sampling temperature).
        chunk_size: tokens per block (default: 1024).
        vocab_chunk_size: vocabulary entries per block (default: 4096). The extra
            memory is two reused blocks of ``chunk_size × vocab_chunk_size``
            (2 × 16 MiB in float32 by default) plus the gradients themselves
            (plus one ``chunk_size × H`` block with ``ignore_index``).
        return_entropy: also return the entropy of each next-token distribution.
        ignore_index: a token id (``-100`` in Hugging Face labels) whose positions get log-prob 0,
            entropy 0 and no gradient, even if their hidden states are NaN; ``None`` (default):
            every id must be valid.

    Returns:
        ``logp`` ``[...]``, or ``(logp, entropy)`` with ``return_entropy``; float32 for bf16/fp16
        inputs. Gradients flow to ``hidden``, ``weight`` and ``bias`` (exact; the logits are
        recomputed block by block in backward), and are themselves differentiable (exact
        Hessian-vector products and higher orders). Works under ``torch.func`` (``grad``,
        ``vmap``, ``jacrev``, ``jvp``, ``jacfwd``, ``hessian``).
    """
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    temperature = _check_temperature(temperature)
    ignore_index = _check_ignore_index(ignore_index)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_floating("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape [V] = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    _check_tokens(tokens, hidden.shape[:-1], weight.shape[0], "hidden[..., H]", ignore_index)
    chunk_size = _check_chunk("chunk_size", chunk_size)
    vocab_chunk_size = _check_chunk("vocab_chunk_size", vocab_chunk_size)
    lead = hidden.shape[:-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = tokens.reshape(-1).long()
    ignored = None
    if ignore_index is not None:
        ignored = flat_t == ignore_index
        flat_t = flat_t.masked_fill(ignored, 0)
    logp, entropy, _, _ = _FromHidden.apply(
        flat_h,
        weight,
        bias,
        flat_t,
        ignored,
        temperature,
        chunk_size or 1024,
        vocab_chunk_size or 4096,
        bool(return_entropy),
    )
    if return_entropy:
        return logp.reshape(lead), entropy.reshape(lead)
    return logp.reshape(lead)
