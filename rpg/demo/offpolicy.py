r"""The off-policy showcase: does a KL penalty keep its promise when each batch is reused many times?

Setting. The counting task, a **fixed** reference (the uniform initial policy),
RLOO advantages (unbiased, no std scaling, so β means the same for every
loss), token-mean aggregation and one PPO clip ε = 0.2 for all. Then every loss
below has the stated objective

    J(θ) = E_{π_θ}[r] − β·KL(π_θ ‖ π_ref)      (sequence-level reverse KL)

— the objective GRPO's k3 penalty is meant to estimate — and each batch is
reused for ``reuse`` AdamW steps (``reuse = 1`` is on-policy).

The promise. With a uniform reference and a reward that adds up over
positions (1/L per right digit), the maximiser of J is known in closed form:
each position puts p*(β) = e^{1/(Lβ)} / (e^{1/(Lβ)} + 9) on the right digit
and spreads the rest evenly, so the reward is p*(β) and the KL is
L·[p* log(10p*) + (1 − p*) log(10(1 − p*)/9)]. The same family with the
*forward* KL(π_ref‖π_θ) — what GRPO's k3 penalty follows on-policy — has
p_F(β) = ½[(1 − Lβ) + √((1 − Lβ)² + 0.4·Lβ)]. Per-token KL terms follow only
a partial gradient of the sequence-level KL (:mod:`rpg.presets`); this maximiser
does not depend on the prefix, so it is a fixed point of the per-token gradients too.

The oracle view (:func:`oracle_errors`) computes, on one position of the same
policy family (a softmax over 10 digits, uniform π_ref), the exact expected
gradient of each KL term over tokens drawn from π_old, and compares it with
∇KL(π_θ‖π_ref) as π_old moves away from π_θ.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import rpg
from rpg import testing as T

from .tasks import DIGITS, TASKS

CLIP = rpg.Clip(0.2, 0.2, dual=None)

# label -> factory(beta) giving a loss with that KL term, the same clip and aggregation for all
PENALTIES = {
    "GRPO k3": lambda beta, clip=CLIP: rpg.GRPOLoss(beta=beta, clip=clip, agg="token-mean"),
    "k2": lambda beta, clip=CLIP: rpg.PolicyLoss(kl="k2", beta=beta, clip=clip),
    "GRPO w·k3 (= URKL)": lambda beta, clip=CLIP: rpg.GRPOLoss(
        beta=beta, clip=clip, agg="token-mean", importance_weighted_kl=True
    ),
    "RPG rkl": lambda beta, clip=CLIP: rpg.RPGLoss("rkl", beta=beta, clip=clip),
    "RPG rkl REINFORCE": lambda beta, clip=CLIP: rpg.RPGLoss("rkl", style="reinforce", beta=beta, clip=clip),
    "RPG urkl REINFORCE": lambda beta, clip=CLIP: rpg.RPGLoss("urkl", style="reinforce", beta=beta, clip=clip),
}


NO_CLIP = ", no clip"


def make_penalty(label: str, beta: float) -> rpg.PolicyLoss:
    """The loss of :data:`PENALTIES` named ``label`` at ``beta``; a label ending in ", no clip" drops the clip."""
    base = label.removesuffix(NO_CLIP)
    if base not in PENALTIES:
        raise ValueError(f"unknown penalty {label!r}; choose from {', '.join(PENALTIES)} (optionally + {NO_CLIP!r})")
    return PENALTIES[base](beta, None) if base != label else PENALTIES[base](beta)


def _length(length: int | None) -> int:
    return TASKS["counting"].length if length is None else length


def optimum_reverse(beta: float, length: int | None = None) -> tuple[float, float]:
    """(reward, KL(π‖π_ref)) of the maximiser of E[r] − β·KL(π‖π_ref) on the counting task, uniform π_ref."""
    L = _length(length)
    x = 1.0 / (L * beta)
    p = 1.0 / (1.0 + (DIGITS - 1) * math.exp(-x))  # e^x / (e^x + 9), stable for large x
    return p, L * _kl_to_uniform(p)


def optimum_forward(beta: float, length: int | None = None) -> tuple[float, float]:
    """(reward, KL(π‖π_ref)) of the maximiser of E[r] − β·KL(π_ref‖π): where GRPO's k3 leads on-policy."""
    L = _length(length)
    b = L * beta
    p = 0.5 * ((1 - b) + math.sqrt((1 - b) ** 2 + 4 * b / DIGITS))
    return p, L * _kl_to_uniform(p)


def _kl_to_uniform(p: float) -> float:
    """KL((p, (1−p)/9, …) ‖ uniform over 10)."""
    q = (1 - p) / (DIGITS - 1)
    return p * math.log(DIGITS * p) + (0.0 if q == 0 else (1 - p) * math.log(DIGITS * q))


def oracle_errors(distances, seeds: int = 20, k: int = DIGITS, sharpness: float = 3.0) -> dict:
    r"""Relative error ‖E_old[∇ℓ_KL] − ∇KL‖ / ‖∇KL‖ of each KL term, exact, vs how far π_old is from π_θ.

    π_θ = softmax(θ) with θ = ``sharpness`` on one digit and N(0, 0.5²) noise
    (a partly trained position), π_ref uniform, and θ_old = θ + d·u for a random
    unit direction u. Each KL term is the loss with advantages 0, β = 1 and no
    clip, so its expected gradient Σ_a π_old(a)·∇ℓ(a) (:func:`rpg.testing.expected_gradient`)
    should equal ∇KL(π_θ‖π_ref) (reverse) — or ∇KL(π_ref‖π_θ) (forward), also reported.

    Returns ``{"distance": [...], "kl_old": [[...] per seed], label: {"reverse": [[...] per seed],
    "forward": [...]}}`` with KL(π_θ‖π_old) per token as the measure of "how off-policy".
    """
    out: dict[str, Any] = {
        "distance": list(distances),
        "kl_old": [],
        **{name: {"reverse": [], "forward": []} for name in PENALTIES},
    }
    zero = torch.zeros(k, dtype=torch.float64)
    ref = torch.zeros(k, dtype=torch.float64)
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        theta = 0.5 * torch.randn(k, generator=gen, dtype=torch.float64)
        theta[int(torch.randint(0, k, (1,), generator=gen))] += sharpness
        u = torch.randn(k, generator=gen, dtype=torch.float64)
        u = u / u.norm()
        want = {d: -T.objective_gradient(d, theta, ref, zero, beta=1.0) for d in ("rkl", "fkl")}
        kl_old = []
        rows: dict[str, dict[str, list[float]]] = {name: {"reverse": [], "forward": []} for name in PENALTIES}
        for dist in distances:
            old = theta + dist * u
            kl_old.append(rpg.kl.kl(torch.log_softmax(theta, -1), torch.log_softmax(old, -1)).item())
            for name, make in PENALTIES.items():
                got = T.expected_gradient(make(1.0, None), theta, old, zero, ref_logits=ref)
                for key, d in (("reverse", "rkl"), ("forward", "fkl")):
                    rows[name][key].append(((got - want[d]).norm() / want[d].norm()).item())
        out["kl_old"].append(kl_old)
        for name in PENALTIES:
            for key in ("reverse", "forward"):
                out[name][key].append(rows[name][key])
    return out
