"""Fused LM head + policy loss: rpg.FusedLinearLoss against rpg.logprobs.from_hidden + the loss and Liger-Kernel's
LigerFusedLinearGRPOLoss (its PyTorch path, compiled=False and compiled=True), all with the DAPO loss.

Every implementation gets identical inputs; the script first checks that they give the same loss and gradients
(hidden and weight), then times forward+backward interleaved in one process (median of ``--runs``, min–max, and
how many runs met each target ratio) and measures peak memory of one forward+backward, each implementation
alone in a fresh process (resident high-water mark above the inputs on CPU, ``max_memory_allocated`` on CUDA).

    python benchmarks/fused_head.py [--n 4096 --seq-len 256 --h 256 --v 32000] [--runs 7] [--device cpu|cuda]
    python benchmarks/fused_head.py --train-step --n 2048 --seq-len 128 --h 128 --v 8000

``--train-step`` instead times a whole train step of a tiny model (forward, loss, backward) compiled as a
whole with ``torch.compile`` against eager, with the materialised logits + loss and with the fused head.

On CUDA the defaults are a Qwen2.5-7B head (H = 3584, V = 151936) in bf16. Liger is optional
(``pip install --no-deps liger-kernel``): without it only rpg's rows are printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import fmt_ms, table

import rpg
from rpg.fused import FusedLinearLoss
from rpg.logprobs import from_hidden

IMPLS = ["rpg FusedLinearLoss", "rpg from_hidden + loss", "Liger GRPO compiled=False", "Liger GRPO compiled=True"]
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # DAPO's clip-higher


def make(n, seq_len, h, v, device, dtype, seed=0, full_mask=False):
    """hidden [B, T, H], head [V, H], tokens, old log-probs near the current ones, [B] advantages, and a mask of
    responses with lengths uniform in [T/2, T] (all ones with ``full_mask``)."""
    g = torch.Generator().manual_seed(seed)
    b = n // seq_len
    hidden = torch.randn(b, seq_len, h, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_(True)
    tokens = torch.randint(0, v, (b, seq_len), generator=g).to(device)
    with torch.no_grad():
        logp = from_hidden(hidden, weight, tokens)
    old_logp = (logp.cpu() + 0.1 * torch.randn(b, seq_len, generator=g)).clamp(max=0).to(device)  # off-policy
    advantages = torch.randn(b, generator=g).to(device)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (b, 1), generator=g)
    if full_mask:
        lengths.fill_(seq_len)
    mask = (torch.arange(seq_len)[None] < lengths).to(device)
    return hidden, weight, tokens, old_logp, advantages, mask


def impl_fn(name, chunk_size=None):
    """A function (hidden, weight, tokens, old_logp, advantages, mask) -> scalar loss; ImportError if missing."""
    loss_fn = rpg.DAPOLoss(clip=rpg.Clip(CLIP_LOW, CLIP_HIGH, dual=None))
    if name == "rpg FusedLinearLoss":
        fused = FusedLinearLoss(loss_fn, chunk_size)
        return lambda h, w, y, old, adv, mask: fused(h, w, y, old, adv, mask).loss
    if name == "rpg from_hidden + loss":
        return lambda h, w, y, old, adv, mask: loss_fn(from_hidden(h, w, y), old, adv, mask).loss
    if name.startswith("Liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(  # its defaults otherwise (one sequence per chunk, as TRL uses it)
            beta=0.0,
            use_ref_model=False,
            loss_type="dapo",
            epsilon_low=CLIP_LOW,
            epsilon_high=CLIP_HIGH,
            compiled=name.endswith("True"),
        )
        return lambda h, w, y, old, adv, mask: liger(h, w, y, mask.float(), adv, old_per_token_logps=old)[0]
    raise ValueError(name)


def step(fn, inputs, device):
    hidden, weight = inputs[:2]
    hidden.grad = weight.grad = None
    loss = fn(*inputs)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return loss


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_child(name, args):
    """Runs in a fresh process: prints the peak memory increase (bytes) of one forward+backward after a warm-up
    (so torch.compile's own memory is not counted; the parent fixes glibc's mmap threshold so freed blocks
    go back to the system and the warm-up cannot hide the peak)."""
    torch.set_num_threads(args.threads)
    fn = impl_fn(name, args.chunk_size)
    dtype = getattr(torch, args.dtype)
    inputs = make(args.n, args.seq_len, args.h, args.v, args.device, dtype, full_mask=args.full_mask)
    step(fn, inputs, args.device)
    inputs[0].grad = inputs[1].grad = None
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, inputs, args.device)
        print(json.dumps(torch.cuda.max_memory_allocated() - base))
    else:  # Linux: reset the resident high-water mark, then read it
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        step(fn, inputs, args.device)
        print(json.dumps((_status_kib("VmHWM") - base) * 1024))


def time_runs(fns, runs, device):
    """Seconds per forward+backward of each fn, round-robin so machine noise hits all alike; all samples kept."""
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (and torch.compile)
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


class TinyLM(torch.nn.Module):
    """Embedding, a few residual MLP blocks, an LM head: enough of a model for a whole train step."""

    def __init__(self, v, h, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(v, h)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.LayerNorm(h), torch.nn.Linear(h, 4 * h), torch.nn.GELU(), torch.nn.Linear(4 * h, h)
            )
            for _ in range(layers)
        )
        self.head = torch.nn.Linear(h, v, bias=False)

    def hidden(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return x


def train_step_main(args) -> None:
    """A whole train step (model forward + loss + backward) under torch.compile against eager."""
    g = torch.Generator().manual_seed(0)
    b, t, v, h = args.n // args.seq_len, args.seq_len, args.v, args.h
    model = TinyLM(v, h).to(args.device)
    tokens = torch.randint(0, v, (b, t + 1), generator=g).to(args.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        old_logp = rpg.logprobs.from_logits(model.head(model.hidden(inputs)), targets)
        old_logp += 0.1 * torch.randn(b, t, generator=g).to(args.device)
        old_logp.clamp_(max=0)  # log-probabilities: <= 0
    advantages = torch.randn(b, generator=g).to(args.device)
    mask = (torch.arange(t)[None] < torch.randint(t // 2, t + 1, (b, 1), generator=g)).to(args.device)
    loss_fn = rpg.DAPOLoss()
    fused = FusedLinearLoss(loss_fn)

    def plain_step():
        logp = rpg.logprobs.from_logits(model.head(model.hidden(inputs)), targets)
        loss = loss_fn(logp, old_logp, advantages, mask).loss
        loss.backward()
        return loss.detach()

    def fused_step():
        loss = fused(model.hidden(inputs), model.head.weight, targets, old_logp, advantages, mask).loss
        loss.backward()
        return loss.detach()

    fns = {
        "logits + loss, eager": plain_step,
        "logits + loss, compiled": torch.compile(plain_step),
        "fused, eager": fused_step,
        "fused, compiled": torch.compile(fused_step),
    }
    grads = {}
    for name, fn in fns.items():
        model.zero_grad(set_to_none=True)
        loss = fn()
        grads[name] = (loss, [p.grad.clone() for p in model.parameters()])
    ref_loss, ref_grads = grads["logits + loss, eager"]
    for name, (loss, gs) in grads.items():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"{name}: loss differs")
        for a, r in zip(gs, ref_grads, strict=False):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6, msg=f"{name}: gradient differs")

    def timed(fn):
        def run():
            model.zero_grad(set_to_none=True)
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()

        return run

    samples = time_runs({k: timed(f) for k, f in fns.items()}, args.runs, args.device)
    base = "logits + loss, eager"
    rows = []
    for name in fns:
        ratio = [a / r for a, r in zip(samples[name], samples[base], strict=False)]
        med = statistics.median(samples[name])
        rows.append(
            [
                name,
                fmt_ms((med, min(samples[name]), max(samples[name]))),
                f"{statistics.median(ratio):.2f} ({min(ratio):.2f}–{max(ratio):.2f})",
            ]
        )
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"whole train step (TinyLM forward + DAPO loss + backward): B={b}, T={t}, H={h}, V={v}, float32, {device}, "
        f"torch {torch.__version__}; median of {args.runs} interleaved runs (min–max), after a warm-up call that "
        f"compiles\n"
    )
    print(table(rows, ["step", "ms", "time ÷ logits + loss, eager (per run)"]))
    for pair in (("logits + loss, compiled", "logits + loss, eager"), ("fused, compiled", "fused, eager")):
        met = sum(a <= r for a, r in zip(samples[pair[0]], samples[pair[1]], strict=False))
        print(f"\n{pair[0]} no slower than {pair[1]}: {met} of {args.runs} runs", end="")
    print()


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if b else "—"  # a toy size can stay within the pages already resident


def measure_peak(name, args, chunk_size):
    """Peak memory (bytes) of one forward+backward of ``name`` in a fresh process (see ``peak_child``)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--child", name, "--n", str(args.n), "--seq-len", str(args.seq_len)]
    cmd += ["--h", str(args.h), "--v", str(args.v), "--dtype", args.dtype, "--threads", str(args.threads)]
    cmd += ["--device", args.device] + (["--full-mask"] if args.full_mask else [])
    cmd += ["--chunk-size", str(chunk_size)] if chunk_size else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()
    return json.loads(out[-1])


def sweep_main(args) -> None:
    """FusedLinearLoss at several chunk sizes against from_hidden + loss (time, interleaved in one process)
    and Liger's PyTorch path (peak memory, each in a fresh process)."""
    dtype = getattr(torch, args.dtype)
    inputs = make(args.n, args.seq_len, args.h, args.v, args.device, dtype, full_mask=args.full_mask)
    base, liger = "rpg from_hidden + loss", "Liger GRPO compiled=False"
    fns = {base: impl_fn(base)}
    fns.update({f"chunk_size={c}": impl_fn("rpg FusedLinearLoss", c) for c in args.sweep})
    samples = time_runs({k: (lambda f=f: step(f, inputs, args.device)) for k, f in fns.items()}, args.runs, args.device)
    try:
        impl_fn(liger)
        liger_peak = measure_peak(liger, args, None)
    except ImportError:
        liger_peak = None
    rows = []
    for c in args.sweep:
        name = f"chunk_size={c}"
        ratio = [a / b for a, b in zip(samples[name], samples[base], strict=False)]
        peak = measure_peak("rpg FusedLinearLoss", args, c)
        rows.append(
            [
                str(c),
                fmt_ms((statistics.median(samples[name]), min(samples[name]), max(samples[name]))),
                f"{statistics.median(ratio):.2f} ({min(ratio):.2f}–{max(ratio):.2f})",
                f"{sum(r <= 0.85 for r in ratio)} of {args.runs}",
                f"{peak / 2**20:.0f}",
                "—" if liger_peak is None else _ratio(peak, liger_peak),
            ]
        )
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    masked = "no padding" if args.full_mask else f"{1 - inputs[5].float().mean().item():.0%} of positions padding"
    stats = statistics.median(samples[base]), min(samples[base]), max(samples[base])
    print(
        f"FusedLinearLoss chunk sweep, DAPO loss, forward+backward: N={args.n} (B={args.n // args.seq_len} × "
        f"T={args.seq_len}, {masked}), H={args.h}, V={args.v}, {args.dtype}, {device}, torch {torch.__version__}; "
        f"time median of {args.runs} interleaved runs (min–max), from_hidden + loss {fmt_ms(stats)} ms; peak memory "
        f"above inputs, each in a fresh process"
        + ("" if liger_peak is None else f", {liger} {liger_peak / 2**20:.0f} MiB")
        + "\n"
    )
    print(
        table(
            rows,
            [
                "chunk_size",
                "fused ms",
                "fused time ÷ from_hidden + loss (per run)",
                "runs ≤ 0.85×",
                "fused peak MiB",
                "fused peak ÷ Liger's",
            ],
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="tokens (B × T)")
    ap.add_argument("--seq-len", type=int, default=256, help="T")
    ap.add_argument("--h", type=int, default=None, help="hidden size (default 256 on CPU, 3584 on CUDA)")
    ap.add_argument("--v", type=int, default=None, help="vocabulary (default 32000 on CPU, 151936 on CUDA)")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full-mask", action="store_true", help="no padding (by default ~25%% of positions are padding)")
    ap.add_argument("--chunk-size", type=int, default=None, help="FusedLinearLoss's chunk_size (default: its own)")
    ap.add_argument("--skip", nargs="*", default=[], help="implementations to leave out (e.g. the compiled Liger)")
    ap.add_argument(
        "--train-step",
        action="store_true",
        help="instead: a whole train step of a tiny model, torch.compile'd against eager",
    )
    ap.add_argument(
        "--sweep",
        type=int,
        nargs="+",
        default=None,
        metavar="CHUNK",
        help="instead: FusedLinearLoss at these chunk sizes against from_hidden + loss (time) and Liger (peak)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.h = args.h or (3584 if cuda else 256)
    args.v = args.v or (151936 if cuda else 32000)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    warnings.filterwarnings("ignore")
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break notices of the compiled rows
    torch.set_num_threads(args.threads)
    if args.child:
        return peak_child(args.child, args)
    if args.train_step:
        return train_step_main(args)
    if args.sweep:
        return sweep_main(args)

    fns, missing = {}, []
    for name in IMPLS:
        if any(s.lower() in name.lower() for s in args.skip):
            continue
        try:
            fns[name] = impl_fn(name, args.chunk_size)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    dtype = getattr(torch, args.dtype)
    inputs = make(args.n, args.seq_len, args.h, args.v, args.device, dtype, full_mask=args.full_mask)

    # Same numbers first: every implementation against from_hidden + loss on these very inputs.
    results = {}
    for name, fn in fns.items():
        loss = step(fn, inputs, args.device)
        results[name] = (loss.detach().float(), inputs[0].grad.float(), inputs[1].grad.float())
    ref = results["rpg from_hidden + loss"]
    # Relative error in norm: bf16 logits (Liger rounds them, rpg computes them in float32) can flip a clip
    # decision at a token on the bound, which a max-norm comparison would call a difference.
    tol = 1e-5 if args.dtype == "float32" else 2e-2
    for name, got in results.items():
        for what, a, r in zip(("loss", "grad hidden", "grad weight"), got, ref, strict=False):
            err = ((a - r).norm() / r.norm().clamp_min(1e-30)).item()
            if not err <= tol:
                raise SystemExit(f"{name}: {what} differs from from_hidden + loss (relative error {err:.2e} > {tol})")

    samples = time_runs({k: (lambda f=f: step(f, inputs, args.device)) for k, f in fns.items()}, args.runs, args.device)
    stats = {k: (statistics.median(s), min(s), max(s)) for k, s in samples.items()}
    peaks = {name: measure_peak(name, args, args.chunk_size) for name in fns}

    fused = "rpg FusedLinearLoss"
    rows = []
    for name in fns:
        ratio = [a / b for a, b in zip(samples[fused], samples[name], strict=False)]
        rows.append(
            [
                name,
                fmt_ms(stats[name]),
                f"{statistics.median(ratio):.2f} ({min(ratio):.2f}–{max(ratio):.2f})",
                f"{peaks[name] / 2**20:.0f}",
                _ratio(peaks[fused], peaks[name]),
            ]
        )
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    logits = args.n * args.v * 4
    masked = "no padding" if args.full_mask else f"{1 - inputs[5].float().mean().item():.0%} of positions padding"
    chunk = f"chunk_size={args.chunk_size}" if args.chunk_size else "default chunk_size"
    print(
        f"fused LM head + DAPO loss, forward+backward: N={args.n} (B={args.n // args.seq_len} × T={args.seq_len}, "
        f"{masked}), {chunk}, "
        f"H={args.h}, V={args.v}, {args.dtype}, {device}, torch {torch.__version__}; time median of {args.runs} "
        f"interleaved runs (min–max); peak memory above inputs, each in a fresh process; float32 logits would be "
        f"{logits / 2**20:.0f} MiB\n"
    )
    print(table(rows, ["implementation", "ms", "fused time ÷ this (per run)", "peak MiB", "fused peak ÷ this"]))
    targets = [("rpg from_hidden + loss", 0.85)] + [(n, 1.0) for n in fns if n.startswith("Liger")]
    print()
    for name, limit in targets:
        if name in samples:
            met = sum(a / b <= limit for a, b in zip(samples[fused], samples[name], strict=False))
            print(f"fused time ≤ {limit:.2f}× {name}: {met} of {args.runs} runs")
    for name in (n for n in fns if n.startswith("Liger")):
        print(
            f"fused peak ≤ 0.50× {name}'s: {'yes' if peaks[fused] <= 0.5 * peaks[name] else 'no'} "
            f"({_ratio(peaks[fused], peaks[name])}×)"
        )
    for m in missing:
        print(f"\nnot measured: {m}")


if __name__ == "__main__":
    main()
