"""Policy-loss forward+backward: rpg against verl's loss composition, measured in one process.

verl's GRPO-style actor loss is ``compute_policy_loss_vanilla`` (dual-clip PPO)
plus ``kl_penalty(..., "low_var_kl")`` (k3) aggregated by ``agg_loss``; rpg's
equivalent configuration is ``PolicyLoss(kl="k3", clip=Clip(0.2, 0.28, 3.0))``.
Both get identical inputs; the script checks they give the same loss and
gradient, then times them interleaved (median of ``--runs``, min–max) and
counts the bytes each saves for backward per token.

    python benchmarks/loss_speed.py [--tokens 262144] [--runs 9] [--device cpu|cuda] [--no-compile]

verl is optional: without it only rpg's own rows are printed.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import fmt_ms, saved_bytes, table, time_interleaved

import rpg

BETA = 1e-3


def make_inputs(tokens: int, seq_len: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = tokens // seq_len
    base = -3 * torch.rand(b, seq_len, generator=g)
    logp = (base + 0.1 * torch.randn(b, seq_len, generator=g)).clamp(max=0).to(device).requires_grad_(True)
    old = base.to(device)
    ref = (base + 0.1 * torch.randn(b, seq_len, generator=g)).clamp(max=0).to(device)  # log-probs: <= 0
    adv = torch.randn(b, 1, generator=g).expand(b, seq_len).contiguous().to(device)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (b, 1), generator=g)
    mask = (torch.arange(seq_len)[None] < lengths).float().to(device)
    return logp, old, ref, adv, mask


def verl_step_fn(logp, old, ref, adv, mask):
    from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, kl_penalty
    from verl.workers.config import ActorConfig

    config = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        ppo_mini_batch_size=1,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
    )

    def loss():
        pg_loss, _ = compute_policy_loss_vanilla(old, logp, adv, mask, "token-mean", config)
        kl = kl_penalty(logp, ref, "low_var_kl")
        return pg_loss + BETA * agg_loss(kl, mask, "token-mean")

    return loss


def rpg_step_fn(logp, old, ref, adv, mask):
    fn = rpg.PolicyLoss(kl="k3", beta=BETA, clip=rpg.Clip(0.2, 0.28, 3.0), agg="token-mean")
    keep = mask.bool()
    return lambda: fn(logp, old, adv, keep, ref_logp=ref).loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    inputs = make_inputs(args.tokens, args.seq_len, args.device)
    logp = inputs[0]
    losses = {"rpg eager": rpg_step_fn(*inputs)}
    try:
        losses["verl eager"] = verl_step_fn(*inputs)
    except ImportError as e:
        print(f"(verl not installed: {e}; printing rpg only)")
    if not args.no_compile:
        losses["rpg compiled"] = torch.compile(losses["rpg eager"])
        if "verl eager" in losses:
            losses["verl compiled"] = torch.compile(losses["verl eager"])

    # Same numbers first: a fast wrong loss is worth nothing.
    grads = {}
    for name, loss in losses.items():
        logp.grad = None
        value = loss()
        value.backward()
        grads[name] = (value.detach(), logp.grad.clone())
    ref_value, ref_grad = grads["rpg eager"]
    for name, (value, grad) in grads.items():
        torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7, msg=f"{name} loss differs")
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9, msg=f"{name} gradient differs")

    def step(loss):
        def run():
            logp.grad = None
            loss().backward()
            if args.device == "cuda":
                torch.cuda.synchronize()

        return run

    stats = time_interleaved({name: step(loss) for name, loss in losses.items()}, runs=args.runs)
    n_tok = logp.numel()
    base = stats.get("verl eager")
    rows = []
    for name, loss in losses.items():
        per_tok = saved_bytes(loss) / n_tok if "compiled" not in name else float("nan")
        ratio = f"{base[0] / stats[name][0]:.1f}×" if base else "—"
        rows.append([name, fmt_ms(stats[name]), ratio, "—" if per_tok != per_tok else f"{per_tok:.1f}"])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"loss forward+backward, {n_tok} tokens ({n_tok // args.seq_len} × {args.seq_len}), float32, {device}, "
        f"torch {torch.__version__}; median of {args.runs} runs (min–max)\n"
    )
    print(table(rows, ["implementation", "ms", "speed-up vs verl eager", "bytes saved for backward / token"]))


if __name__ == "__main__":
    main()
