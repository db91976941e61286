"""A whole GRPO training step in TRL: stock GRPOTrainer, RPGGRPOTrainer, and RPGGRPOTrainer(fused_head=True).

One step is what the trainer runs per micro-batch after generation: ``compute_loss`` (backbone forward, LM head,
log-probs, loss), ``backward`` and an AdamW update, on a small Llama built from a config with random weights and a
fixed, off-policy batch (``old_per_token_logps`` given, as with ``num_iterations > 1``; DAPO loss, TRL's default;
~25% of completion positions padding). Every trainer gets the same weights and batch; the script first checks
that they give the same loss. Step time: median of ``--runs`` runs interleaved in one process (min–max), and the
ratio to stock TRL within each run. Peak memory: each trainer alone in a fresh process, after a warm-up step, the
resident high-water mark above the memory before the step (glibc's mmap threshold fixed at 128 KiB so freed
blocks go back to the system), or ``max_memory_allocated`` on CUDA.

    python benchmarks/trl_step.py [--batch 4 --prompt-len 16 --completion-len 256 --h 256 --v 32000] [--runs 5]
    python benchmarks/trl_step.py --device cuda          # V = 151936, H = 1024, bf16 weights by default

TRL 1.16's own ``GRPOTrainer`` already computes log-probs through a chunked head (``add_fused_lm_head``: tiles of
up to 4096 tokens × 32768 vocabulary entries, the logits recomputed in backward); that is the baseline here.
``GRPOConfig(use_liger_kernel=True)`` no longer routes the GRPO loss through Liger in TRL 1.16 (it forces Liger's
``fused_linear_cross_entropy`` off and applies only Liger's Triton layer kernels), so it has no row of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import table

# --masks: TRL's entropy bonus, high-entropy token mask and off-policy sequence mask, all on.
MASKS = {"entropy_coef": 0.01, "top_entropy_quantile": 0.5, "off_policy_mask_threshold": 0.5}
IMPLS = ("TRL GRPOTrainer", "RPGGRPOTrainer", "RPGGRPOTrainer(fused_head=True)")
STOCK, FUSED = IMPLS[0], IMPLS[2]


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "<eos>": 1, "a": 2}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def make_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.v,
        hidden_size=args.h,
        intermediate_size=2 * args.h,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.prompt_len + args.completion_len,
        pad_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype))


def make_batch(args):
    g = torch.Generator().manual_seed(1)
    b, p, t = args.batch, args.prompt_len, args.completion_len
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    lengths[0] = t
    cm = (torch.arange(t)[None] < lengths[:, None]).long()
    batch = {
        "prompt_ids": torch.randint(2, args.v, (b, p), generator=g),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(2, args.v, (b, t), generator=g),
        "completion_mask": cm,
        "advantages": torch.randn(b, generator=g),
        "old_per_token_logps": (-torch.rand(b, t, generator=g) * 3 - 8) * cm,  # ~log(1/V): near the random model
        "num_items_in_batch": cm.sum().float(),
    }
    return {k: v.to(args.device) for k, v in batch.items()}


def make_trainer(name, args, out_dir):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rpg.integrations.trl import RPGGRPOTrainer

    config = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch,
        num_generations=args.batch,
        max_completion_length=args.completion_len,
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,
        fp16=False,
        beta=0.0,
        epsilon_high=0.28,
        save_strategy="no",
        **(MASKS if args.masks else {}),
    )
    kw = dict(
        model=make_model(args),
        reward_funcs=lambda completions, **k: [0.0] * len(completions),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": ["a"] * args.batch}),
        processing_class=_tokenizer(),
    )
    if name == STOCK:
        trainer = GRPOTrainer(**kw)
    else:
        trainer = RPGGRPOTrainer(**kw, fused_head=name == FUSED)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = make_batch(args)

    def step():
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return loss.detach()

    return step


def peak_child(name, args, out_dir):
    """Runs in a fresh process: the peak memory increase (bytes) of one step after a warm-up step."""
    step = make_trainer(name, args, out_dir)
    step()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark
    base = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - base) * 1024


def _ratio_text(xs):
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="completions per micro-batch (B)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--completion-len", type=int, default=256, help="T")
    ap.add_argument("--h", type=int, default=None, help="hidden size (default 256 on CPU, 1024 on CUDA)")
    ap.add_argument("--v", type=int, default=None, help="vocabulary (default 32000 on CPU, 151936 on CUDA)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--peak-runs", type=int, default=1, help="fresh processes per trainer for the peak (0: none)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--masks", action="store_true", help=f"also set GRPOConfig {MASKS}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.h = args.h or (1024 if cuda else 256)
    args.v = args.v or (151936 if cuda else 32000)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import tempfile

    import transformers

    transformers.logging.set_verbosity_error()
    out_dir = tempfile.mkdtemp(prefix="rpg-trl-step-")
    if args.child:
        print(json.dumps(peak_child(args.child, args, out_dir)))
        return

    steps = {name: make_trainer(name, args, out_dir) for name in IMPLS}
    losses = {name: step().item() for name, step in steps.items()}  # also the warm-up
    tol = 1e-4 if args.dtype == "float32" else 2e-2  # bf16: the paths round the logits differently
    for name, value in losses.items():
        if abs(value - losses[STOCK]) > tol * max(1.0, abs(losses[STOCK])):
            raise SystemExit(f"{name}: loss {value} differs from stock TRL's {losses[STOCK]}")
    samples = {name: [] for name in IMPLS}
    for _ in range(args.runs):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    del steps

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    flags = []
    for k in ("batch", "prompt_len", "completion_len", "h", "v", "layers", "dtype", "threads", "device"):
        flags += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    flags += ["--masks"] if args.masks else []
    peaks = {name: [] for name in IMPLS}
    for _ in range(args.peak_runs):
        for name in IMPLS:  # interleaved fresh processes
            cmd = [sys.executable, __file__, "--child", name, *flags]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            peaks[name].append(json.loads(out.strip().splitlines()[-1]))

    rows = []
    for name in IMPLS:
        time_ratio = [a / b for a, b in zip(samples[name], samples[STOCK], strict=True)]
        peak_ratio = [a / b for a, b in zip(peaks[name], peaks[STOCK], strict=True)]
        s, p = samples[name], [x / 2**20 for x in peaks[name]]
        rows.append(
            [
                name,
                f"{statistics.median(s) * 1e3:.0f} ({min(s) * 1e3:.0f}–{max(s) * 1e3:.0f})",
                _ratio_text(time_ratio),
                f"{statistics.median(p):.0f} ({min(p):.0f}–{max(p):.0f})" if p else "—",
                _ratio_text(peak_ratio) if p else "—",
            ]
        )
    device = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} threads"
    n = args.batch * args.completion_len
    import trl

    masks = "".join(f", {k}={v}" for k, v in MASKS.items()) if args.masks else ""
    print(
        f"GRPO training step (compute_loss + backward + AdamW), Llama {args.layers} layers, H={args.h}, V={args.v}, "
        f"{args.dtype}, B={args.batch}, prompt {args.prompt_len} + completion T={args.completion_len} tokens "
        f"({n} completion positions; float32 logits would be {n * args.v * 4 / 2**20:.0f} MiB), DAPO, off-policy{masks}; "
        f"{device}, torch {torch.__version__}, trl {trl.__version__}; time: median of {args.runs} interleaved runs "
        f"(min–max); peak: above the pre-step memory, {args.peak_runs} fresh process(es) each\n"
    )
    print(table(rows, ["trainer", "step ms", "time ÷ stock TRL (per run)", "peak MiB", "peak ÷ stock TRL"]))
    fused_t = [a / b for a, b in zip(samples[FUSED], samples[STOCK], strict=True)]
    fused_p = [a / b for a, b in zip(peaks[FUSED], peaks[STOCK], strict=True)]
    print(
        f"\nfused step time ≤ 1.00× stock TRL's: {sum(r <= 1.0 for r in fused_t)} of {len(fused_t)} runs; "
        f"fused peak ≤ 0.50× stock TRL's: {sum(r <= 0.5 for r in fused_p)} of {len(fused_p)} processes"
    )


if __name__ == "__main__":
    main()
