r"""rpg — KL-regularized policy-gradient losses for RL on language models.

Implements the RPG framework (Zhang, Liu, Yuan, Gu, Yao, "On the Design of
KL-Regularized Policy Gradient Algorithms for LLM Reasoning", ICLR 2026,
arXiv 2505.17508): k1/k2/k3 estimators, forward / reverse, normalized /
unnormalized KL-regularized objectives in fully differentiable and
REINFORCE-style forms, RPG-Style Clip, and batching-invariant aggregation —
each loss with a gradient that is exactly the gradient of its objective.

Functional core: :mod:`rpg.kl`, :mod:`rpg.objectives`, :mod:`rpg.clipping`,
:mod:`rpg.aggregation`. Loss classes: :class:`PolicyLoss`, :class:`RPGLoss`.
Exact oracle for tests: :mod:`rpg.testing`.
"""

from . import aggregation, clipping, kl, objectives, testing
from .aggregation import AGG_MODES, aggregate
from .clipping import Clip, Truncate
from .kl import DIVERGENCES, k1, k2, k3
from .losses import STYLES, LossOutput, PolicyLoss, RPGLoss

__version__ = "0.1.0"

__all__ = [
    "AGG_MODES",
    "DIVERGENCES",
    "STYLES",
    "Clip",
    "LossOutput",
    "PolicyLoss",
    "RPGLoss",
    "Truncate",
    "aggregate",
    "aggregation",
    "clipping",
    "k1",
    "k2",
    "k3",
    "kl",
    "objectives",
    "testing",
    "__version__",
]
