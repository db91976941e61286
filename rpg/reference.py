r"""When to move the reference policy: the iterative reference update (paper §5).

RPG regularises toward a reference that is periodically reset to the current
policy, π_ref ← π_θ, so the KL term acts as a trust region around recent
iterates instead of pulling back to the initial model. With
``ref_logp = old_logp`` (the losses' default) the reference is the behaviour
policy of each batch — the limit of updating every step.

[`ReferenceUpdate`][rpg.reference.ReferenceUpdate] is a small stateful helper for the training loop (not a
loss: losses hold no trainer state). It says *when* to reset; copying the
weights is yours:

```python
import copy, torch, rpg

policy = torch.nn.Linear(4, 6)  # a toy policy: 6 actions at each of 3 positions
ref_model = copy.deepcopy(policy)
x, tokens = torch.randn(8, 3, 4), torch.randint(0, 6, (8, 3))
adv, mask = torch.randn(8), torch.ones(8, 3, dtype=torch.bool)
loss_fn, opt = rpg.RPGLoss("rkl", beta=0.1), torch.optim.SGD(policy.parameters(), lr=0.5)


def token_logp(model):
    return model(x).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


schedule = rpg.ReferenceUpdate(every=10, kl_target=0.05)
for step in range(30):
    logp = token_logp(policy)
    with torch.no_grad():
        ref_logp = token_logp(ref_model)
    out = loss_fn(logp, logp.detach(), adv, mask, ref_logp=ref_logp)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    if schedule.step(out.metrics["kl/ref_k3"]):
        ref_model.load_state_dict(policy.state_dict())
```
"""

from __future__ import annotations

import math

__all__ = ["ReferenceUpdate"]


class ReferenceUpdate:
    r"""Decides when to set π_ref ← π_θ: every ``every`` steps and/or when the KL drifts past a target.

    Args:
        every: reset after this many steps since the last reset (``None``: never by count).
        kl_target: reset when the exponential moving average of the per-token KL
            to the reference exceeds this (``None``: never by KL).
        ema: smoothing of that average, in [0, 1): m ← ema·m + (1 − ema)·kl.
            The first observation after a reset initialises m.

    [`step`][rpg.reference.ReferenceUpdate.step] returns ``True`` when the caller should copy the policy into
    the reference now; the counters then restart.
    """

    def __init__(self, every: int | None = None, kl_target: float | None = None, ema: float = 0.9) -> None:
        if every is None and kl_target is None:
            raise ValueError("ReferenceUpdate needs every=<steps> and/or kl_target=<KL>")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int or None, got {every!r}")
        if kl_target is not None and not (kl_target > 0 and math.isfinite(kl_target)):
            raise ValueError(f"kl_target must be a positive finite number or None, got {kl_target!r}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.every, self.kl_target, self.ema = every, kl_target, ema
        self.steps_since_update = 0
        self.kl_average: float | None = None

    def step(self, kl: float | None = None) -> bool:
        """Record one optimisation step (with its token-level KL to π_ref, if tracked); True = reset now."""
        self.steps_since_update += 1
        if self.kl_target is not None:
            if kl is None or not math.isfinite(kl):
                raise ValueError(f"kl_target is set: step() needs the step's finite KL value, got {kl!r}")
            a = self.kl_average
            self.kl_average = kl if a is None else self.ema * a + (1 - self.ema) * kl
        due = self.every is not None and self.steps_since_update >= self.every
        drifted = self.kl_target is not None and self.kl_average is not None and self.kl_average > self.kl_target
        if due or drifted:
            self.steps_since_update, self.kl_average = 0, None
            return True
        return False

    def __repr__(self) -> str:
        return f"ReferenceUpdate(every={self.every!r}, kl_target={self.kl_target!r}, ema={self.ema!r})"
