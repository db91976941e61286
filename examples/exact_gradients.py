"""Which objective does each loss's gradient follow? Exact enumeration on a tabular policy.

Run: ``python examples/exact_gradients.py``. For each loss, the expected gradient over
tokens drawn from π_old is compared with −∇J for J = E_{π_θ}[A] − β·D and each D,
on-policy (π_old = π_θ) and off-policy, with a reference π_ref ≠ π_old. A cell shows
the largest absolute error; ≈ 0 means "this loss follows that objective".
"""

import rpg
from rpg import testing as T

BETA = 0.5


class K3Penalty:
    """GRPO's KL term as a loss: −w·A + β·k3(logp → ref), optionally weighted by w (the RPG fix)."""

    def __init__(self, weighted: bool):
        self.weighted = weighted

    def __call__(self, logp, old_logp, advantages, mask, ref_logp=None):
        w = (logp - old_logp).exp()
        kl = rpg.k3(logp, ref_logp)
        per_token = -w * advantages[:, None] + BETA * (w * kl if self.weighted else kl)
        return type("Out", (), {"per_token": per_token})()


def main() -> None:
    p = T.random_problem(k=8, seed=0, scale=0.7)
    losses = {"GRPO k3 (unweighted)": K3Penalty(False), "w * k3 (RPG fix)": K3Penalty(True)}
    for div in rpg.DIVERGENCES:
        for style in rpg.STYLES:
            losses[f"RPGLoss({div!r}, {style})"] = rpg.RPGLoss(div, style=style, beta=BETA, clip=None)
    header = f"{'loss':32s} {'policy':10s} " + " ".join(f"{'vs ' + d:>9s}" for d in ("fkl", "rkl"))
    print(header)
    print("-" * len(header))
    for name, loss_fn in losses.items():
        for label, old in (("on", p.logits), ("off", p.old_logits)):
            got = T.expected_gradient(loss_fn, p.logits, old, p.rewards, ref_logits=p.ref_logits)
            errs = [
                (got + T.objective_gradient(d, p.logits, p.ref_logits, p.rewards, BETA)).abs().max().item()
                for d in ("fkl", "rkl")
            ]
            print(f"{name:32s} {label + '-policy':10s} " + " ".join(f"{e:9.2e}" for e in errs))


if __name__ == "__main__":
    main()
