r"""The command line: ``python -m rpg.demo [compare|offpolicy|distill|all] [options]``."""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

from . import distill as _distill
from . import offpolicy as _offpolicy
from . import plots
from .runner import default_workers, run_jobs
from .stats import fmt, mean_ci
from .tasks import TASKS
from .training import DEFAULT_LOSSES, LOSSES, Recipe, check_loss_names, train

# The settings of the stored results. --quick shrinks them for CI.
RECIPES = {
    "counting": Recipe(steps=400, lr=1e-2, entropy_coef=0.03),
    "running-sum": Recipe(steps=400, lr=1e-2, entropy_coef=0.03, warm_start=20),
}
DEFAULT_SEEDS = {"compare": 5, "offpolicy": 3, "distill": 5}
QUICK_STEPS = 6


# --- jobs (top-level functions: they are pickled into worker processes) -----------------------


def compare_job(task: str, loss: str, recipe: Recipe, seed: int, warmup: bool = False) -> dict:
    result = train(task, loss, recipe.with_(steps=2) if warmup else recipe, seed)
    result.pop("policy")
    return result


def _describe(r: dict) -> str:
    return f"{r['name']} seed {r['seed']}: final reward {r['final']:.3f}"


# --- compare ----------------------------------------------------------------------------------


def compare_table(groups: dict[str, list[dict]]) -> str:
    header = ["loss", "final reward", "reward AUC", "KL to ref", "final entropy", "clip frac", "wall s"]
    rows = [
        [
            name,
            fmt([r["final"] for r in rs]),
            fmt([r["area"] for r in rs]),
            fmt([r["kl"] for r in rs]),
            fmt([r["final_entropy"] for r in rs]),
            fmt([r["clip"] for r in rs]),
            fmt([r["wall"] for r in rs], 1),
        ]
        for name, rs in groups.items()
    ]
    return _markdown(header, rows)


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def run_compare(
    task: str, losses, recipe: Recipe, seeds: list[int], out: str, workers=None, threads=None, quiet=False
) -> dict[str, list[dict]]:
    jobs = [
        (compare_job, {"task": task, "loss": name, "recipe": recipe, "seed": s}, (task, name))
        for name in losses
        for s in seeds
    ]
    results = run_jobs(jobs, workers, threads, _describe, quiet)
    groups = {name: [r for r in results if r["name"] == name] for name in losses}
    stem = "demo" if task == "counting" else f"demo_{task.replace('-', '_')}"
    text = compare_table(groups)
    b = recipe.prompts * recipe.group
    heading = (
        f"{task} task, {recipe.steps} steps x {b} samples, {recipe.epochs * recipe.minibatches} AdamW steps "
        f"per batch, seeds {_seed_list(seeds)}; mean ± 95% CI over seeds"
    )
    _write(out, f"{stem}.md", text + "\n")
    print(f"\n{heading}\n\n{text}")
    kl_label = (
        f"KL(π_θ‖π_ref) per string (π_ref ← π_θ every {recipe.ref_every} steps)"
        if recipe.ref_every
        else "KL(π_θ‖π_ref) per string (fixed π_ref)"
    )
    _report_plot(plots.training_curves(groups, os.path.join(out, f"{stem}.png"), f"{task} task", kl_label), out, stem)
    return groups


# --- off-policy -------------------------------------------------------------------------------

_LABELS = tuple(_offpolicy.PENALTIES)
# every penalty with 16 AdamW steps per batch, w·k3 also without the clip; on-policy controls (1 step per
# batch, run longer to converge)
OFFPOLICY: dict[str, Any] = {
    "betas": (0.02, 0.05, 0.1, 0.2),
    "arms": (
        *tuple((n, 16) for n in _LABELS),
        ("GRPO w·k3 (= URKL), no clip", 16),
        ("GRPO k3", 1),
        ("GRPO w·k3 (= URKL)", 1),
    ),
    "steps": {16: 250, 1: 1200},
    "lr": 3e-3,
}
OFFPOLICY_QUICK: dict[str, Any] = {
    "betas": (0.05, 0.2),
    "arms": (*tuple((n, 4) for n in _LABELS), ("GRPO k3", 1)),
    "steps": {4: 4, 1: 4},
    "lr": 3e-3,
}


def offpolicy_job(label: str, beta: float, reuse: int, steps: int, lr: float, seed: int, warmup: bool = False) -> dict:
    """One run of the showcase: fixed uniform reference, RLOO advantages, ``reuse`` AdamW steps per batch."""
    epochs, minibatches = (1, 1) if reuse == 1 else (reuse // 2, 2)
    recipe = Recipe(steps=2 if warmup else steps, lr=lr, epochs=epochs, minibatches=minibatches, ref_every=None)
    result = train("counting", _offpolicy.make_penalty(label, beta), recipe, seed, advantages="rloo")
    result.pop("policy")
    tail = max(1, recipe.steps // 5)
    result.update(
        name=label,
        beta=beta,
        reuse=reuse,
        final=sum(result["rewards"][-tail:]) / tail,
        final_kl=sum(result["kls"][-tail:]) / tail,
    )
    return result


def run_offpolicy(
    seeds: list[int],
    out: str | None,
    betas,
    arms,
    steps: dict,
    lr: float,
    oracle_seeds: int,
    workers=None,
    threads=None,
    quiet=False,
) -> dict:
    """The showcase: every (penalty, steps per batch) arm at every β and seed, plus the exact oracle view."""
    jobs = [
        (offpolicy_job, {"label": n, "beta": b, "reuse": k, "steps": steps[k], "lr": lr, "seed": s}, (n, k))
        for b in betas
        for n, k in arms
        for s in seeds
    ]
    results = run_jobs(
        jobs, workers, threads, lambda r: f"{r['name']} β={r['beta']} x{r['reuse']}: KL {r['final_kl']:.2f}", quiet
    )
    runs: dict = {}
    for r in results:
        runs.setdefault((r["name"], r["beta"], r["reuse"]), []).append(r)
    distances = [0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    oracle = _offpolicy.oracle_errors(distances, seeds=oracle_seeds)
    header = ["KL term", "steps/batch", *[f"β={b}" for b in betas]]
    rows = [
        ["promised (exact optimum)", "—", *[f"{_offpolicy.optimum_reverse(b)[1]:.2f}" for b in betas]],
        ["forward-KL optimum", "—", *[f"{_offpolicy.optimum_forward(b)[1]:.2f}" for b in betas]],
    ]
    rows += [[n, str(k), *[fmt([r["final_kl"] for r in runs[(n, b, k)]], 2) for b in betas]] for n, k in arms]
    kl_table = _markdown(header, rows)
    rows = [
        ["promised (exact optimum)", "—", *[f"{_offpolicy.optimum_reverse(b)[0]:.3f}" for b in betas]],
        ["forward-KL optimum", "—", *[f"{_offpolicy.optimum_forward(b)[0]:.3f}" for b in betas]],
    ]
    rows += [[n, str(k), *[fmt([r["final"] for r in runs[(n, b, k)]]) for b in betas]] for n, k in arms]
    reward_table = _markdown(header, rows)
    reuses = sorted({k for _, k in arms})
    old = {
        k: mean_ci([sum(r["old_kl"]) / len(r["old_kl"]) for (n, b, kk), rs in runs.items() if kk == k for r in rs])
        for k in reuses
    }
    columns = list(zip(*oracle["kl_old"], strict=False))[::3]
    orows = [
        [n, *[fmt(c, 4) for c in list(zip(*oracle[n]["reverse"], strict=False))[::3]]] for n in _offpolicy.PENALTIES
    ]
    oracle_table = _markdown(["KL term", *[f"KL(θ‖θ_old) = {sum(c) / len(c):.3f}" for c in columns]], orows)
    old_text = "; ".join(f"{k} step{'s' if k > 1 else ''}/batch: {fmt_pair(old[k], 4)}" for k in reuses)
    steps_text = ", ".join(f"{steps[k]} batches at {k} step{'s' if k > 1 else ''}/batch" for k in reuses)
    text = (
        f"Fixed uniform reference, RLOO advantages, PPO clip 0.2 (unless marked no clip), lr {lr}; "
        f"{steps_text}; seeds {_seed_list(seeds)}; mean ± 95% CI over seeds of the last fifth of each run.\n\n"
        f"KL(π_θ‖π_ref) per string:\n\n{kl_table}\n\nreward:\n\n{reward_table}\n\n"
        f"KL(π_θ‖π_old) per token after each batch's updates (how off-policy the last update is): {old_text}\n\n"
        f"Exact relative error ‖E_old[∇ℓ] − ∇KL(π_θ‖π_ref)‖ / ‖∇KL‖ of each KL term (β = 1, no clip), "
        f"{oracle_seeds} random problems:\n\n{oracle_table}\n"
    )
    summary = offpolicy_summary(runs)
    if out is not None:
        _write(out, "demo_offpolicy.md", text)
        fig = plots.offpolicy_figure(
            summary,
            list(betas),
            _offpolicy.optimum_reverse,
            _offpolicy.optimum_forward,
            oracle,
            os.path.join(out, "demo_offpolicy.png"),
        )
    print("\n" + text)
    if out is not None:
        _report_plot(fig is not None, out, "demo_offpolicy")
    return {"runs": runs, "summary": summary, "oracle": oracle, "text": text}


def offpolicy_summary(runs: dict) -> dict:
    """(penalty, β, steps per batch) -> {"kl": (mean, half-width), "reward": (mean, half-width)} over seeds."""
    return {
        key: {"kl": mean_ci([r["final_kl"] for r in rs]), "reward": mean_ci([r["final"] for r in rs])}
        for key, rs in runs.items()
    }


def fmt_pair(pair, digits=3) -> str:
    m, h = pair
    return f"{m:.{digits}f}" if math.isnan(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


# --- distillation -----------------------------------------------------------------------------

DISTILL_STEPS = 200  # student steps; the peaked teacher uses the comparison's recipe (400 steps)


def run_distill(
    recipe: Recipe,
    student_steps: int,
    seeds: list[int],
    out: str | None,
    quick: bool = False,
    workers=None,
    threads=None,
    quiet=False,
) -> dict:
    """Train both teachers per seed, then a fresh student by each arm of :data:`rpg.demo.distill.ARMS`."""
    jobs: list[tuple[Callable[..., Any], dict[str, Any], object]] = [
        (_distill.teacher_job, {"kind": kind, "recipe": recipe, "seed": 1000 + s, "quick": quick}, ("t", kind))
        for kind in _distill.TEACHERS
        for s in seeds
    ]
    done = run_jobs(jobs, workers, threads, lambda r: f"{r['name']} teacher seed {r['seed']}: {r['final']:.3f}", quiet)
    teachers = {kind: [t for t in done if t["name"] == kind] for kind in _distill.TEACHERS}
    student = recipe.with_(steps=student_steps)
    jobs = []
    for arm, (kind, _) in _distill.ARMS.items():
        for i, s in enumerate(seeds):
            state = None if kind is None else teachers[kind][i]["policy"]
            jobs.append(
                (_distill.student_job, {"arm": arm, "recipe": student, "seed": s, "teacher_state": state}, ("s", arm))
            )
    results = run_jobs(jobs, workers, threads, lambda r: f"{r['name']} seed {r['seed']}: {r['final']:.3f}", quiet)
    groups = {arm: [r for r in results if r["name"] == arm] for arm in _distill.ARMS}
    level = 0.9
    header = [
        "student trained by",
        "final reward",
        "reward AUC",
        f"steps to {level}",
        "seeds that got there",
        "final KL to teacher",
    ]
    rows = []
    for arm, rs in groups.items():
        hit = [_distill.steps_to(r["rewards"], level) for r in rs]
        reached = [h for h in hit if not math.isnan(h)]
        rows.append(
            [
                arm,
                fmt([r["final"] for r in rs]),
                fmt([r["area"] for r in rs]),
                fmt(reached, 0) if reached else "—",
                f"{len(reached)}/{len(rs)}",
                "—" if _distill.ARMS[arm][0] is None else fmt([r["final_kl"] for r in rs], 2),
            ]
        )
    table = _markdown(header, rows)
    t_rows = [
        [kind, fmt([t["final"] for t in ts]), fmt([t["final_entropy"] for t in ts], 3)] for kind, ts in teachers.items()
    ]
    t_table = _markdown(["teacher", "final reward", "final entropy (nats/digit)"], t_rows)
    text = (
        f"{TASK_TEXT}; students {student_steps} steps x {student.prompts * student.group} samples, "
        f"lr {student.lr}, "
        f"seeds {_seed_list(seeds)} (teachers: seed + 1000); steps to {level}: first step whose 10-step mean "
        f"reward reaches it, over the seeds that got there; KL per string.\n\n"
        f"{t_table}\n\n{table}\n"
    )
    print("\n" + text)
    if out is not None:
        _write(out, "demo_distill.md", text)
        fig = plots.distill_figure(groups, os.path.join(out, "demo_distill.png"), "counting task")
        _report_plot(fig is not None, out, "demo_distill")
    return {"teachers": teachers, "groups": groups, "text": text}


TASK_TEXT = "counting task"


# --- helpers ----------------------------------------------------------------------------------


def _seed_list(seeds) -> str:
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _write(out: str, name: str, text: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        f.write(text)


def _report_plot(ok: bool, out: str, stem: str) -> None:
    print(f"plot: {os.path.join(out, stem + '.png')}" if ok else "(matplotlib is not installed: no plot)")


def plain_text(doc: str) -> str:
    """A docstring as terminal text: ``code`` and :role:`name` to their text, [`name`][target] to name."""
    doc = re.sub(r"\[`([^`]+)`\]\[[^\]]*\]", r"\1", doc)
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return re.sub(r"``([^`]+)``", r"\1", doc)


def main(argv: list[str] | None = None):
    from . import __doc__ as doc

    ap = argparse.ArgumentParser(
        prog="python -m rpg.demo",
        description=plain_text(doc or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "experiment",
        nargs="?",
        default="compare",
        choices=("compare", "offpolicy", "distill", "all"),
        help="what to run (default: compare)",
    )
    ap.add_argument("--task", default="counting", choices=tuple(TASKS), help="compare: the task (default: counting)")
    ap.add_argument(
        "--losses", default=",".join(DEFAULT_LOSSES), help=f"compare: comma-separated, from {', '.join(LOSSES)}"
    )
    defaults = ", ".join(f"{k} {v}" for k, v in DEFAULT_SEEDS.items())
    ap.add_argument("--seeds", type=int, default=None, help=f"number of seeds (default: {defaults})")
    ap.add_argument("--seed", type=int, default=0, help="first seed; seeds are SEED, SEED+1, ... (default 0)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: the task's recipe)")
    ap.add_argument("--workers", type=int, default=None, help="parallel processes (default: min(runs, cores))")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker process (default 1; with one worker: torch's own setting)",
    )
    ap.add_argument("--out", default="demo_out", help="folder for the tables (.md) and plots (.png)")
    ap.add_argument("--quick", action="store_true", help="a few steps and two seeds per setting (CI)")
    args = ap.parse_args(argv)
    try:
        losses = check_loss_names(n.strip() for n in args.losses.split(",") if n.strip())
    except ValueError as e:
        ap.error(str(e))
    for name, value in (
        ("--seeds", args.seeds),
        ("--steps", args.steps),
        ("--workers", args.workers),
        ("--threads", args.threads),
    ):
        if value is not None and value < 1:
            ap.error(f"{name} must be >= 1, got {value}")
    wanted = ("compare", "offpolicy", "distill") if args.experiment == "all" else (args.experiment,)
    common = {"workers": args.workers, "threads": args.threads, "out": args.out}
    start = time.perf_counter()
    done = {}

    def seeds_for(kind):
        n = args.seeds or (2 if args.quick else DEFAULT_SEEDS[kind])
        return list(range(args.seed, args.seed + n))

    def timed(label, fn):
        t0 = time.perf_counter()
        done[label] = fn()
        print(f"[{label}: {time.perf_counter() - t0:.0f} s]")

    if "compare" in wanted:
        tasks = tuple(TASKS) if args.experiment == "all" else (args.task,)
        for task in tasks:
            recipe = RECIPES[task].with_(steps=QUICK_STEPS if args.quick else args.steps or RECIPES[task].steps)
            timed(task, lambda t=task, r=recipe: run_compare(t, losses, r, seeds_for("compare"), **common))
    if "offpolicy" in wanted:
        o = OFFPOLICY_QUICK if args.quick else OFFPOLICY
        steps = {k: args.steps for k in o["steps"]} if args.steps and not args.quick else o["steps"]
        timed(
            "offpolicy",
            lambda: run_offpolicy(
                seeds_for("offpolicy"),
                betas=o["betas"],
                arms=o["arms"],
                steps=steps,
                lr=o["lr"],
                oracle_seeds=3 if args.quick else 20,
                **common,
            ),
        )
    if "distill" in wanted:
        recipe = RECIPES["counting"].with_(steps=QUICK_STEPS) if args.quick else RECIPES["counting"]
        student_steps = QUICK_STEPS if args.quick else args.steps or DISTILL_STEPS
        timed("distill", lambda: run_distill(recipe, student_steps, seeds_for("distill"), quick=args.quick, **common))
    print(f"\ntotal {time.perf_counter() - start:.0f} s with {args.workers or default_workers(10**6)} worker(s)")
    return done
