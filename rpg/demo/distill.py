r"""On-policy distillation: a fresh student learns from a trained teacher's log-probs on its own samples.

For each seed two teachers are trained on the counting task:

* **soft** — the KL-regularised policy of the off-policy showcase: w·k3 (URKL) with
  β = 0.02 against the fixed uniform initial policy, RLOO advantages, 16 AdamW steps
  per batch for 250 batches. It is right most of the time but keeps some entropy,
  so its log-probs stay bounded;
* **peaked** — the comparison's recipe (RPG-REINFORCE, entropy bonus, 400 steps):
  about as accurate, but nearly deterministic (log-probs down to about −60).

Then a fresh student (uniform start) is trained with the same batch size,
optimizer and learning rate as the comparison, each arm for the same number of
steps:

* **reward** — by reward alone (RPG-REINFORCE and the comparison's recipe);
* **distill** — :class:`rpg.OnPolicyDistillationLoss` with the teacher's
  log-probs of the student's sampled digits as ``ref_logp`` and no reward
  (``advantages=None``): per token ℓ = −sg(w·(−β log ρ))·logp, ρ = π_θ/π_teacher,
  whose expected gradient is ∇KL(π_θ‖π_teacher) per position, on- and off-policy;
* **distill + reward** — the same loss with the task's RLOO advantages added.

The student never sees the teacher's samples, only its log-probs on the
student's own strings; the reward curves (one point per batch of samples)
measure sample efficiency.
"""

from __future__ import annotations

from typing import Any

import rpg

from .offpolicy import PENALTIES
from .tasks import Policy, get_task
from .training import Recipe, train

TASK = "counting"
TEACHERS = ("soft", "peaked")
# arm -> (teacher, advantages); the "reward" arm has no teacher
ARMS = {
    "reward": (None, None),
    "distill": ("soft", "none"),
    "distill + reward": ("soft", "rloo"),
    "distill, peaked teacher": ("peaked", "none"),
}
SOFT_TEACHER: dict[str, Any] = {"beta": 0.02, "steps": 250, "lr": 3e-3, "epochs": 8, "minibatches": 2}


def teacher_job(kind: str, recipe: Recipe, seed: int, quick: bool = False, warmup: bool = False) -> dict:
    """Train a teacher of ``kind`` (see :data:`TEACHERS`); returns its curves and weights."""
    if kind == "soft":
        s = SOFT_TEACHER
        soft = Recipe(
            steps=2 if warmup else (recipe.steps if quick else s["steps"]),
            lr=s["lr"],
            epochs=s["epochs"],
            minibatches=s["minibatches"],
            ref_every=None,
        )
        result = train(TASK, PENALTIES["GRPO w·k3 (= URKL)"](s["beta"]), soft, seed, advantages="rloo")
    elif kind == "peaked":
        result = train(TASK, "RPG-REINFORCE", recipe.with_(steps=2) if warmup else recipe, seed)
    else:
        raise ValueError(f"kind must be one of {TEACHERS}, got {kind!r}")
    result["name"] = kind
    return result


def student_job(arm: str, recipe: Recipe, seed: int, teacher_state: dict | None = None, warmup: bool = False) -> dict:
    """Train a fresh student by ``arm`` (a key of :data:`ARMS`); no weights are returned."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {tuple(ARMS)}, got {arm!r}")
    recipe = recipe.with_(steps=2) if warmup else recipe
    kind, advantages = ARMS[arm]
    if kind is None:
        result = train(TASK, "RPG-REINFORCE", recipe, seed)
    else:
        if teacher_state is None:
            raise ValueError(f"arm {arm!r} distils from a teacher: pass teacher_state (the teacher's weights)")
        teacher = Policy(get_task(TASK).length, recipe.width)
        teacher.load_state_dict(teacher_state)
        # no exploration bonus: the teacher's log-probs are a dense signal, and the bonus would change the target
        result = train(
            TASK,
            rpg.OnPolicyDistillationLoss(beta=1.0),
            recipe.with_(entropy_coef=0.0),
            seed,
            teacher=teacher,
            advantages=advantages,
        )
    result.pop("policy")
    result["name"] = arm
    return result


def steps_to(curve: list[float], level: float, window: int = 10) -> float:
    """First step at which the trailing ``window``-step mean reward reaches ``level`` (NaN if never)."""
    acc = 0.0
    for i, x in enumerate(curve):
        acc += x
        if i >= window:
            acc -= curve[i - window]
        if i + 1 >= window and acc / window >= level:
            return float(i + 1)
    return float("nan")
