r"""``python -m rpg.demo``: train tiny policies from scratch on CPU and compare the losses, over several seeds.

Experiments (each prints markdown tables of mean ± 95% Student-t intervals over
seeds and writes them, with a figure, to ``--out``):

* ``compare`` (default) — GRPO, DAPO, REINFORCE++, RPG and RPG-REINFORCE with
  one recipe on the ``counting`` task (``--task running-sum`` for the harder one).
* ``offpolicy`` — heavy sample reuse against a fixed reference: the KL each
  penalty attains at equal β against the exact optimum it promises, and the
  exact expected gradient of each penalty as the batch goes off-policy.
* ``distill`` — on-policy distillation of a trained teacher into a fresh
  student (:class:`rpg.OnPolicyDistillationLoss`) against reward alone.
* ``all`` — everything above (both tasks), as stored in the docs:
  ``python -m rpg.demo all --out docs/img``.

Seeds run in parallel processes (``--workers``, default min(runs, cores)), one
torch thread each unless ``--threads`` says otherwise. A run's numbers depend
only on its seed and its thread count (another thread count rounds sums
differently). Wall times exclude a short untimed warm-up.
"""

from .cli import main
from .stats import mean_ci, t_quantile
from .tasks import TASKS, Policy, Task, get_task
from .training import DEFAULT_LOSSES, LOSSES, Recipe, train

__all__ = [
    "DEFAULT_LOSSES",
    "LOSSES",
    "TASKS",
    "Policy",
    "Recipe",
    "Task",
    "get_task",
    "main",
    "mean_ci",
    "t_quantile",
    "train",
]
