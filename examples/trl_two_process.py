"""RPGGRPOTrainer on two processes vs one: the same gradients and the same logged losses.

    python examples/trl_two_process.py   # launches both runs, compares, exits 1 on a mismatch

Runs ``python -m torch.distributed.run --nproc_per_node 2`` and ``--nproc_per_node 1`` of
``rpg.integrations.trl.RPGGRPOTrainer`` on a tiny random Llama (float64 weights) on CPU: Accelerate sees the
launcher's environment and trains data-parallel over gloo (``accelerate launch --cpu --num_processes 2`` starts
one process unless it is given an MPI host file, hence the torch launcher). Both runs see the same global batch
(``per_device_train_batch_size`` 2 x 2 processes vs 4 x 1), in two settings, three optimizer steps each:

* one micro-batch per step, groups of 4 completions that span both processes;
* two micro-batches per step (gradient accumulation), groups of 8.

``num_iterations`` is 2 (the second pass over a batch is off-policy and clips). It compares

* the gradient of every optimizer step (read just before ``optimizer.step()``, after DDP's all-reduce),
* every logged value: TRL's ``loss`` and ``policy_loss``, rewards, and with one micro-batch per step its
  ``kl``/``entropy``/``clip_ratio/*`` and rpg's ``rpg/*`` metrics (per-micro-batch means: with two micro-batches
  TRL shuffles each process's rows before splitting them, so the runs' micro-batches hold different rows).

The loss is ``rpg.RPGLoss("urkl", style="reinforce", beta=0.05, agg="token-mean")`` (RPG-style clip): a
reference model (β > 0) and a token mean over the global batch. Completions are a fixed function of
the step and of the row's place in the global batch (not sampled), so both runs score the same tokens with
the same rule-based reward, with response lengths that differ from row to row and from process to process.

``--break`` scales the second process's loss by 1.5 (the check must then fail); ``--worker`` is the
per-process entry point that the launcher runs; a run that does not finish within ``--timeout`` seconds
is killed and fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ALPHABET = "abcdefgh "
PROMPTS = ["abc", "hgf", "bad", "fed", "ace", "gdb"]
MAX_LEN = 6
GLOBAL_BATCH = 4  # 2 per process x 2 processes, or 4 on one process
# The model is float64, but TRL's fused LM head (trl/kernels/chunked_logprob.py) computes the logits, log-probs
# and entropies in float32, and TRL keeps rewards, advantages and the old/reference log-probs in float32: the
# two runs differ by float32 rounding of sums taken in another order (DDP's all-reduce of the two halves vs one
# sum), below 1e-7 of the gradient's norm. A wrong normalisation or a process weighted differently moves it
# by 1e-2 or more.
GRAD_RTOL = 1e-5  # ‖g₁ − g₂‖ ≤ GRAD_RTOL·‖g₁‖, and elementwise |g₁ − g₂| ≤ GRAD_RTOL·(|g₁| + max|g₁|)
METRIC_TOL = 1e-5  # relative (and absolute) on logged values, which TRL takes from float32 tensors
SKIP_METRICS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch", "step_time"}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(ALPHABET)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def make_model(path: Path) -> None:
    """A tiny random Llama saved in float64 (TRL loads the reference model from this path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(ALPHABET) + 2,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).to(torch.float64).save_pretrained(path)


def count_a(completions, **kwargs):
    """Rule-based reward: the share of 'a' characters in the completion."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def _completion(step: int, row: int) -> list[int]:
    """Tokens of the global batch's row ``row`` at optimizer step ``step``: 1..MAX_LEN letters, <eos> if shorter."""
    g = torch.Generator().manual_seed(1000 * step + row)
    n = int(torch.randint(1, MAX_LEN + 1, (1,), generator=g))
    ids = (torch.randint(0, len(ALPHABET), (n,), generator=g) + 2).tolist()
    return [*ids, 1] if n < MAX_LEN else ids


SETTINGS = ("one micro-batch", "two micro-batches")


def worker(out: Path, model_path: Path, broken: bool) -> None:
    """Train every setting in ``SETTINGS`` in this process; the main process saves the results."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig

    import rpg
    from rpg.integrations.trl import RPGGRPOTrainer

    class Trainer(RPGGRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, **kw):
            # This process holds the rows [p·n, (p+1)·n) of the generation batch (accelerate shards it in order).
            start = self.accelerator.process_index * len(prompt_ids)
            return [_completion(self.state.global_step, start + i) for i in range(len(prompt_ids))], None

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            return loss * 1.5 if broken and self.accelerator.process_index == 1 else loss

    class Grads(TrainerCallback):
        def __init__(self):
            self.grads: list[torch.Tensor] = []
            self.trainer: Trainer | None = None

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            params = self.trainer.accelerator.unwrap_model(self.trainer.model).parameters()
            self.grads.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in params]))

    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    results = {}
    for setting in SETTINGS:
        accumulate = setting == "two micro-batches"  # a group of 8 per optimizer step, 2 micro-batches
        args = GRPOConfig(
            output_dir=str(out / "trainer"),
            per_device_train_batch_size=GLOBAL_BATCH // nproc,
            gradient_accumulation_steps=2 if accumulate else 1,
            num_generations=8 if accumulate else 4,
            max_completion_length=MAX_LEN,
            max_steps=3,
            num_iterations=2,
            beta=0.05,
            loss_type="dapo",
            learning_rate=0.05,
            max_grad_norm=0.0,
            logging_steps=1,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            seed=0,
            bf16=False,
            fp16=False,
            dataloader_num_workers=0,
        )
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64)
        grads = Grads()
        trainer = Trainer(
            loss=rpg.RPGLoss("urkl", style="reinforce", beta=0.05, agg="token-mean"),
            model=model,
            reward_funcs=count_a,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
            processing_class=_tokenizer(),
            callbacks=[grads],
        )
        grads.trainer = trainer
        trainer.train()
        logs = [{k: v for k, v in h.items() if k not in SKIP_METRICS} for h in trainer.state.log_history]
        results[setting] = {"grads": grads.grads, "logs": logs}
    if trainer.accelerator.is_main_process:
        torch.save({"settings": results, "nproc": trainer.accelerator.num_processes}, out / "result.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(nproc: int, out: Path, model_path: Path, broken: bool = False) -> subprocess.Popen:
    """Start one ``torch.distributed.run --nproc_per_node nproc`` run of ``worker`` (in its own session)."""
    import rpg  # the processes import the rpg this process imported (a checkout's or the installed one)

    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker", "--out", str(out)]
    cmd += ["--model", str(model_path)] + (["--break"] if broken else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(rpg.__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
    )
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, nproc: int, out: Path, deadline: float) -> dict:
    """Wait for a run that ``start`` began until ``deadline`` (``time.monotonic()``); its saved result."""
    try:
        stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: a hang fails instead of blocking
        proc.communicate()
        raise RuntimeError(f"the {nproc}-process run did not finish in time") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{nproc}-process run failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    result = torch.load(out / "result.pt")
    if result["nproc"] != nproc:
        raise RuntimeError(f"the run had {result['nproc']} processes, not {nproc}")
    return result


def compare(one: dict, two: dict, accumulate: bool = False) -> dict:
    """Max abs/rel gradient difference and the logged values that disagree (``mismatches``, empty if none).
    With ``accumulate``, the per-micro-batch token means (``kl``, ``entropy``, ``clip_ratio/*``, ``rpg/*``)
    are not compared: TRL shuffles each process's generation batch before splitting it into micro-batches,
    so the runs' micro-batches hold different rows (their sums over the window, the gradient and the
    losses, agree)."""
    mismatches = []
    if len(one["grads"]) != len(two["grads"]) or not one["grads"]:
        mismatches.append(f"optimizer steps: {len(one['grads'])} vs {len(two['grads'])}")
    max_abs = max_rel = 0.0
    for step, (a, b) in enumerate(zip(one["grads"], two["grads"], strict=False)):
        diff = (a - b).abs()
        max_abs = max(max_abs, diff.max().item())
        max_rel = max(max_rel, (diff.norm() / a.norm()).item())
        scale = a.abs().max().item()
        if diff.norm() > GRAD_RTOL * a.norm() or not torch.allclose(a, b, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale):
            mismatches.append(f"gradient of step {step + 1}: max |Δ| {diff.max().item():.3e}, |g| {a.norm():.3e}")
    logs1, logs2 = one["logs"], two["logs"]
    if len(logs1) != len(logs2):
        mismatches.append(f"log entries: {len(logs1)} vs {len(logs2)}")
    compared = set()
    for h1, h2 in zip(logs1, logs2, strict=False):
        if set(h1) != set(h2):
            mismatches.append(f"logged keys differ: {sorted(set(h1) ^ set(h2))}")
        for key in set(h1) & set(h2):
            if accumulate and (key in ("kl", "entropy") or key.startswith(("clip_ratio/", "rpg/"))):
                continue
            v1, v2 = h1[key], h2[key]
            if not isinstance(v1, (int, float)) or v1 is None or v2 is None:
                continue
            compared.add(key)
            if not (math.isnan(v1) and math.isnan(v2)) and not math.isclose(
                v1, v2, rel_tol=METRIC_TOL, abs_tol=METRIC_TOL
            ):
                mismatches.append(f"step {h1.get('step')}: {key} {v1!r} (1 process) vs {v2!r} (2 processes)")
    required = ("loss", "policy_loss") if accumulate else ("loss", "policy_loss", "kl", "rpg/ratio/mean", "rpg/kl/term")
    for key in required:
        if key not in compared:
            mismatches.append(f"{key} was not logged")
    return {"max_abs": max_abs, "max_rel": max_rel, "mismatches": mismatches, "compared": sorted(compared)}


def run(broken: bool = False, timeout: float = 300.0) -> dict:
    """Both runs, at once, in a temporary directory, killed if not done within ``timeout`` seconds; for every
    setting, ``compare``'s dict (``max_abs``, ``max_rel`` the largest over settings, ``mismatches`` and
    ``compared`` by setting) plus the wall time."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model(root / "model")
        deadline = time.monotonic() + timeout
        runs = [start(n, root / name, root / "model", broken and n == 2) for n, name in ((1, "one"), (2, "two"))]
        try:  # both runs at once: three processes
            one = finish(runs[0], 1, root / "one", deadline)
            two = finish(runs[1], 2, root / "two", deadline)
        finally:
            for proc in runs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
    out: dict = {"max_abs": 0.0, "max_rel": 0.0, "mismatches": [], "compared": {}, "wall_s": 0.0}
    for setting in SETTINGS:
        c = compare(one["settings"][setting], two["settings"][setting], setting == "two micro-batches")
        out["max_abs"], out["max_rel"] = max(out["max_abs"], c["max_abs"]), max(out["max_rel"], c["max_rel"])
        out["mismatches"] += [f"{setting}: {m}" for m in c["mismatches"]]
        out["compared"][setting] = c["compared"]
    out["wall_s"] = time.perf_counter() - t0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--break", dest="broken", action="store_true", help="scale process 1's loss by 1.5")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for both runs before they count as hung")
    a = parser.parse_args()
    if a.worker:
        worker(a.out, a.model, a.broken)
        return 0
    result = run(a.broken, a.timeout)
    print(json.dumps({k: v for k, v in result.items() if k != "compared"}, indent=1))
    for setting, keys in result["compared"].items():
        print(f"compared ({setting}):", ", ".join(keys))
    print("MATCH" if not result["mismatches"] else "MISMATCH")
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
