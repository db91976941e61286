"""Token log-probs from hidden states: rpg.logprobs.from_hidden against the materialised logits, verl's
FusedLinearForPPO and TRL's ChunkedLogProbFunction.

Time: forward+backward, all implementations interleaved in one process (median of ``--runs``, min–max).
Peak memory: each implementation in its own fresh process, peak resident memory (CPU) or
``max_memory_allocated`` (CUDA) above the inputs, so allocator state cannot leak between them.

    python benchmarks/logprobs_memory.py [--n 4096 --h 256 --v 32000] [--runs 7] [--device cpu|cuda]

verl and TRL are optional: a missing one is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import fmt_ms, table, time_interleaved

from rpg import logprobs

IMPLS = ["materialised", "rpg from_hidden", "verl FusedLinearForPPO", "TRL ChunkedLogProbFunction"]


def make(n, h, v, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_(True)
    tokens = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, tokens


def impl_fn(name):
    """A function (hidden, weight, tokens) -> (logp, entropy), or raise ImportError."""
    if name == "materialised":
        return lambda h, w, t: logprobs.from_logits(h @ w.T, t, return_entropy=True)
    if name == "rpg from_hidden":
        return lambda h, w, t: logprobs.from_hidden(h, w, t, return_entropy=True)
    if name == "verl FusedLinearForPPO":
        from verl.utils.experimental.torch_functional import FusedLinearForPPO

        head = FusedLinearForPPO()  # its default chunk of 512 tokens
        return lambda h, w, t: head(h, w, t)
    if name == "TRL ChunkedLogProbFunction":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # the vocabulary tile GRPOTrainer uses

        def trl(h, w, t):
            out = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",))
            return out[0], out[1]

        return trl
    raise ValueError(name)


def step(fn, hidden, weight, tokens, device):
    hidden.grad = weight.grad = None
    logp, ent = fn(hidden, weight, tokens)
    (logp.sum() + 0.1 * ent.sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()


def peak_child(name, n, h, v, device):
    """Runs in a fresh process: prints the peak memory increase (bytes) of one forward+backward."""
    fn = impl_fn(name)
    hidden, weight, tokens = make(n, h, v, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, hidden, weight, tokens, device)
        print(json.dumps(torch.cuda.max_memory_allocated() - base))
    else:  # Linux: reset the resident high-water mark, then read it (ru_maxrss survives exec, so not that)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        step(fn, hidden, weight, tokens, device)
        print(json.dumps((_status_kib("VmHWM") - base) * 1024))


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        return peak_child(args.child, args.n, args.h, args.v, args.device)

    fns, missing = {}, []
    for name in IMPLS:
        try:
            fns[name] = impl_fn(name)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    # Same numbers first (float64, small): every implementation against the materialised path.
    h64, w64, t64 = make(257, 16, 999, args.device, torch.float64, seed=1)
    ref_lp, ref_ent = fns["materialised"](h64, w64, t64)
    ref_grads = torch.autograd.grad(ref_lp.sum() + 0.1 * ref_ent.sum(), (h64, w64))
    for name, fn in fns.items():
        lp, ent = fn(h64, w64, t64)
        grads = torch.autograd.grad(lp.sum() + 0.1 * ent.sum(), (h64, w64))
        for a, b in zip((lp, ent, *grads), (ref_lp, ref_ent, *ref_grads), strict=False):
            torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-6, atol=1e-6, msg=f"{name} differs")

    hidden, weight, tokens = make(args.n, args.h, args.v, args.device)
    stats = time_interleaved(
        {k: (lambda f=f: step(f, hidden, weight, tokens, args.device)) for k, f in fns.items()},
        runs=args.runs,
        inner=1,
        warmup=1,
    )
    peaks = {}
    for name in fns:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--n",
            str(args.n),
            "--h",
            str(args.h),
            "--v",
            str(args.v),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        peaks[name] = json.loads(out[-1])
    logits_bytes = args.n * args.v * 4
    base_t = stats["materialised"][0]
    rows = [
        [
            name,
            fmt_ms(stats[name]),
            f"{stats[name][0] / base_t:.2f}×",
            f"{peaks[name] / 2**20:.0f}",
            f"{peaks[name] / logits_bytes:.2f}",
        ]
        for name in fns
    ]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"log-probs + entropy from hidden states, forward+backward: N={args.n}, H={args.h}, V={args.v}, float32, "
        f"{device}, torch {torch.__version__}; time median of {args.runs} runs (min–max); peak memory above inputs, "
        f"each in a fresh process; materialised logits = {logits_bytes / 2**20:.0f} MiB\n"
    )
    print(table(rows, ["implementation", "ms", "time vs materialised", "peak MiB", "peak / logits"]))
    for m in missing:
        print(f"\nnot measured: {m}")


if __name__ == "__main__":
    main()
