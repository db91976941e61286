r"""Token log-probabilities (and entropy) from logits, or from hidden states without the ``[N, V]`` logits.

In RL on language models the memory that ends long-context runs is the logits
tensor: 8k tokens × 152k vocabulary in bf16 is 2.4 GB per sequence, twice that
with its gradient. :func:`from_hidden` takes the hidden states ``[N, H]`` and the
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
:func:`from_logits` on the materialised logits (to 1e-9 in float64, tested).
"""

from __future__ import annotations

import torch

from ._util import check_floating, compute_dtype

__all__ = ["from_logits", "from_hidden"]


def _check_tokens(tokens: torch.Tensor, shape: torch.Size, vocab: int, name: str) -> None:
    """Type and shape always; the id range only on CPU (on an accelerator that check would be a
    host-device sync — there an out-of-range id gives NaN in :func:`from_hidden`)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"tokens must be an integer tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.shape != shape:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)} but {name} needs {tuple(shape)}")
    if tokens.device.type == "cpu" and tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"tokens must lie in [0, {vocab}), got values in [{lo}, {hi}]")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""log π(token) from materialised logits ``[..., V]`` and ``tokens`` ``[...]``.

    Returns ``logp`` ``[...]`` (and the entropy ``[...]`` with ``return_entropy``),
    in float32 for bf16/fp16 logits. Plain autograd; see :func:`from_hidden` to
    avoid materialising the logits.
    """
    check_floating("logits", logits)
    _check_temperature(temperature)
    _check_tokens(tokens, logits.shape[:-1], logits.shape[-1], "logits[..., V]")
    z = logits.to(compute_dtype(logits.dtype))
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) - lse
    if not return_entropy:
        return logp
    p = torch.softmax(z, -1)
    finite_z = torch.where(torch.isinf(z), torch.zeros_like(z), z)  # p·z = 0 where z = −inf (p = 0)
    return logp, lse - (p * finite_z).sum(-1)


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


class _FromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk_size, vocab_chunk_size, want_entropy):  # noqa: D102
        dtype = compute_dtype(hidden.dtype)
        n, v = hidden.shape[0], weight.shape[0]
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        target = torch.empty(n, dtype=dtype, device=hidden.device)
        mu = torch.empty(n, dtype=dtype, device=hidden.device) if want_entropy else None
        z_buf, e_buf = _buffers(hidden, weight, chunk_size, vocab_chunk_size, dtype)
        for r0 in range(0, n, chunk_size):
            r1 = min(n, r0 + chunk_size)
            h = hidden[r0:r1].to(dtype)
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
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, mu)
        ctx.params = (temperature, chunk_size, vocab_chunk_size, dtype)
        logp = target - lse
        entropy = lse - mu if want_entropy else None
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):  # noqa: D102
        hidden, weight, bias, tokens, lse, mu = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk_size, dtype = ctx.params
        n, v = hidden.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        d_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        d_bias = torch.zeros(v, dtype=dtype, device=weight.device) if need_b else None
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(dtype)
        use_entropy = grad_entropy is not None and mu is not None
        z_buf, p_buf = _buffers(hidden, weight, chunk_size, vocab_chunk_size, dtype)
        for r0 in range(0, n, chunk_size):
            r1 = min(n, r0 + chunk_size)
            h = hidden[r0:r1].to(dtype)
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
        return cast(d_hidden, hidden), cast(d_weight, weight), cast(d_bias, bias), None, None, None, None, None


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""log π(token) from hidden states and the LM head, never materialising the ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` final hidden states (any leading shape is flattened:
            ``[..., H]`` with ``tokens`` ``[...]``).
        weight: ``[V, H]`` the LM head (``lm_head.weight``).
        tokens: ``[N]`` integer token ids in ``[0, V)``.
        bias: ``[V]`` or ``None``.
        temperature: logits are divided by it (sampling temperature).
        chunk_size: tokens per block (default: 1024).
        vocab_chunk_size: vocabulary entries per block (default: 4096). The extra
            memory is two reused blocks of ``chunk_size × vocab_chunk_size``
            (2 × 16 MiB in float32 by default) plus the gradients themselves.
        return_entropy: also return the entropy of each next-token distribution.

    Returns:
        ``logp`` ``[...]``, or ``(logp, entropy)`` with ``return_entropy``; float32 for bf16/fp16 inputs. Gradients flow to ``hidden``, ``weight`` and ``bias`` (exact; the logits are recomputed block by block in backward).
    """
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    _check_temperature(temperature)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None:
        check_floating("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape [V] = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    _check_tokens(tokens, hidden.shape[:-1], weight.shape[0], "hidden[..., H]")
    for name, size in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} must be a positive int or None, got {size!r}")
    lead = hidden.shape[:-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    logp, entropy = _FromHidden.apply(
        flat_h, weight, bias, tokens.reshape(-1).long(), float(temperature),
        chunk_size or 1024, vocab_chunk_size or 4096, bool(return_entropy),
    )
    if return_entropy:
        return logp.reshape(lead), entropy.reshape(lead)
    return logp.reshape(lead)
