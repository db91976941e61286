r"""One training run: sample groups from π_old, reuse the batch for several AdamW steps, log what happened.

Every loss gets the same loop (the RPG paper's setting, scaled down): each step
draws ``prompts`` contexts and ``group`` strings per context from the current
policy π_old, computes advantages, then makes ``epochs × minibatches`` AdamW
steps on that batch — all but the first off-policy, which is what the
importance ratio w = π_θ/π_old and the clip are for. The reference π_ref is the
initial policy, reset to π_θ every ``ref_every`` steps (the paper's iterative
reference, :class:`rpg.ReferenceUpdate`) or never (``ref_every=None``), or a
fixed teacher (distillation).

Logged per step: the batch's mean reward, the sequence-level KL(π_θ‖π_ref)
(exact per-position KLs summed along the sampled strings), the mean entropy per
token, the clip fraction over the step's updates, and KL(π_θ‖π_old) per token at
the end of the step's updates (how far the reuse moved the policy off the
batch's sampler).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

import rpg

from .tasks import Policy, Task, exact_kl, get_task


@dataclass(frozen=True)
class Recipe:
    """The training settings shared by every loss of a comparison."""

    steps: int = 300
    prompts: int = 16  # contexts per batch
    group: int = 8  # strings sampled per context
    lr: float = 3e-3
    epochs: int = 2  # passes over each batch
    minibatches: int = 2  # optimizer steps per pass
    ref_every: int | None = 10  # π_ref ← π_θ every this many steps; None: fixed reference
    entropy_coef: float = 0.0  # loss − coef · mean entropy per token
    width: int = 64
    warm_start: int = 0  # supervised steps (cross-entropy on right answers) before RL

    def with_(self, **changes) -> Recipe:
        return replace(self, **changes)


# advantage estimators: (rewards [B], mask [B, L], old_logp, ref_logp, group) -> [B] or [B, L]
def _grpo(r, mask, old, ref, group):
    return rpg.advantages.grpo(r, group)


def _mean_only(r, mask, old, ref, group):
    return rpg.advantages.grpo(r, group, scale="none")


def _rloo(r, mask, old, ref, group):
    return rpg.advantages.rloo(r, group)


def _reinforce_pp(r, mask, old, ref, group):
    return rpg.advantages.reinforce_pp(r, mask, old, ref, beta=0.01)


def _distill(r, mask, old, ref, group):
    return None


ADVANTAGES: dict[str, Callable] = {
    "grpo": _grpo,
    "mean": _mean_only,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
    "none": _distill,
}

# name -> (loss factory taking the task's length, name of its advantage estimator in ADVANTAGES)
LOSSES: dict[str, tuple[Callable[[int], rpg.PolicyLoss], str]] = {
    "GRPO": (lambda L: rpg.GRPOLoss(beta=0.04), "grpo"),
    "GRPO-IW": (lambda L: rpg.GRPOLoss(beta=0.04, importance_weighted_kl=True), "grpo"),
    "Dr.GRPO": (lambda L: rpg.DrGRPOLoss(max_len=L), "mean"),
    "DAPO": (lambda L: rpg.DAPOLoss(), "grpo"),
    "REINFORCE++": (lambda L: rpg.REINFORCEPlusPlusLoss(), "reinforce_pp"),
    "CISPO": (lambda L: rpg.CISPOLoss(), "grpo"),
    "RPG": (lambda L: rpg.RPGLoss("urkl", style="differentiable", beta=0.01), "grpo"),
    "RPG-REINFORCE": (lambda L: rpg.RPGLoss("urkl", style="reinforce", beta=0.01), "grpo"),
}
DEFAULT_LOSSES = ("GRPO", "DAPO", "REINFORCE++", "RPG", "RPG-REINFORCE")


def check_loss_names(names) -> list[str]:
    names = list(names)
    bad = [n for n in names if n not in LOSSES]
    if bad or not names:
        raise ValueError(f"unknown loss {', '.join(map(repr, bad)) or '(none)'}; choose from {', '.join(LOSSES)}")
    return names


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def train(
    task: Task | str,
    loss: str | rpg.PolicyLoss,
    recipe: Recipe = Recipe(),
    seed: int = 0,
    *,
    advantages: str | None = None,
    teacher: Policy | None = None,
    init: dict | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict:
    """Train one policy and return its curves and summary numbers.

    Args:
        task: a :class:`Task` or its name.
        loss: a name from :data:`LOSSES`, or any rpg loss (then ``advantages`` names the estimator).
        recipe: the shared settings.
        seed: seeds the initialisation, the sampling and the mini-batch order.
        advantages: a key of :data:`ADVANTAGES` (default: the named loss's own).
        teacher: a fixed π_ref (on-policy distillation); ``recipe.ref_every`` is then ignored.
        init: a state dict to start from instead of the zero-last-layer initialisation.
        progress: called with each step's mean reward.
    """
    task = get_task(task) if isinstance(task, str) else task
    if isinstance(loss, str):
        factory, adv_name = LOSSES[check_loss_names([loss])[0]]
        loss_fn, name = factory(task.length), loss
    else:
        loss_fn, adv_name, name = loss, "rloo", repr(loss)
    adv_name = advantages or adv_name
    if adv_name not in ADVANTAGES:
        raise ValueError(f"advantages must be one of {', '.join(ADVANTAGES)}, got {adv_name!r}")
    advantage_fn = ADVANTAGES[adv_name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = Policy(task.length, recipe.width)
    if init is not None:
        policy.load_state_dict(init)
    if recipe.warm_start:
        supervised(policy, task, recipe.warm_start, recipe.lr, recipe.prompts * recipe.group, seed)
    reference = (teacher if teacher is not None else copy.deepcopy(policy)).requires_grad_(False)
    schedule = rpg.ReferenceUpdate(every=recipe.ref_every) if teacher is None and recipe.ref_every else None
    opt = torch.optim.AdamW(policy.parameters(), lr=recipe.lr)
    log: dict[str, list] = {k: [] for k in ("rewards", "kls", "entropy", "clips", "old_kl")}
    n = recipe.prompts * recipe.group
    start = time.perf_counter()
    for _ in range(recipe.steps):
        contexts = task.contexts(recipe.prompts, gen).repeat_interleave(recipe.group, 0)
        tokens = policy.sample(contexts, gen)
        r = task.reward(contexts, tokens)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        with torch.no_grad():
            old_logits = policy.logits(contexts, tokens)
            old_logp = rpg.logprobs.from_logits(old_logits, tokens)
            ref_logits = reference.logits(contexts, tokens)
            ref_logp = rpg.logprobs.from_logits(ref_logits, tokens)
            log["kls"].append(exact_kl(old_logits, ref_logits).mean().item())
            log["entropy"].append(_entropy(old_logits).mean().item())
        adv = advantage_fn(r, mask, old_logp, ref_logp, recipe.group)
        clips = []
        for _ in range(recipe.epochs):
            for part in torch.randperm(n, generator=gen).chunk(recipe.minibatches):
                logits = policy.logits(contexts[part], tokens[part])
                logp = rpg.logprobs.from_logits(logits, tokens[part])
                out = loss_fn(
                    logp, old_logp[part], None if adv is None else adv[part], mask[part], ref_logp=ref_logp[part]
                )
                total = out.loss
                if recipe.entropy_coef:
                    total = total - recipe.entropy_coef * _entropy(logits).mean()
                opt.zero_grad()
                total.backward()
                opt.step()
                clips.append(out.local_metrics["clip_frac"])
        with torch.no_grad():
            new = torch.log_softmax(policy.logits(contexts, tokens), -1)
            old = torch.log_softmax(old_logits, -1)
            log["old_kl"].append((new.exp() * (new - old)).sum(-1).mean().item())
        log["rewards"].append(r.mean().item())
        log["clips"].append(sum(clips) / len(clips))
        if schedule is not None and schedule.step():
            reference.load_state_dict(policy.state_dict())
        if progress is not None:
            progress(log["rewards"][-1])
    wall = time.perf_counter() - start
    return {
        "name": name,
        "task": task.name,
        "seed": seed,
        **log,
        **summarize(log),
        "wall": wall,
        "policy": policy.state_dict(),
    }


def supervised(policy: Policy, task: Task, steps: int, lr: float, batch: int, seed: int) -> float:
    """A short supervised warm start: ``steps`` AdamW steps of cross-entropy on right answers; returns the last
    batch's per-digit accuracy. Its own random stream, so the RL phase draws the same samples with or without it."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    accuracy = float("nan")
    for _ in range(steps):
        contexts = task.contexts(batch, gen)
        targets = task.targets(contexts)
        logits = policy.logits(contexts, targets)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        accuracy = (logits.argmax(-1) == targets).float().mean().item()
    return accuracy


def summarize(log: dict) -> dict:
    """Final reward (mean of the last tenth of steps), reward AUC (mean over all steps), mean KL and clip fraction."""
    rewards = log["rewards"]
    tail = rewards[-max(1, len(rewards) // 10) :]
    return {
        "final": sum(tail) / len(tail),
        "area": sum(rewards) / len(rewards),
        "kl": sum(log["kls"]) / len(log["kls"]),
        "clip": sum(log["clips"]) / len(log["clips"]),
        "final_kl": sum(log["kls"][-len(tail) :]) / len(tail),
        "final_entropy": sum(log["entropy"][-len(tail) :]) / len(tail),
    }
