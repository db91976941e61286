r"""rpg — KL-regularized policy-gradient losses for RL on language models.

Implements the RPG framework (Zhang, Liu, Yuan, Gu, Yao, "On the Design of
KL-Regularized Policy Gradient Algorithms for LLM Reasoning", ICLR 2026,
arXiv 2505.17508): k1/k2/k3 estimators, forward / reverse, normalized /
unnormalized KL-regularized objectives in fully differentiable and
REINFORCE-style forms, RPG-Style Clip, and batching-invariant aggregation —
each loss with a gradient that is exactly the gradient of its objective — and
GRPO, Dr. GRPO, DAPO, REINFORCE++, GSPO, CISPO, DPPO, SAPO, TOPR, GPPO / CE-GPPO,
DRO (Kimi-1.5), prime-rl's loss, GMPO, VESPO, Clip-Cov, KL-Cov and on-policy distillation as
configurations of the same [`PolicyLoss`][rpg.losses.PolicyLoss] (sequence-level ratios and kernels in
[`rpg.sequence`][rpg.sequence], token selection rules in [`rpg.selection`][rpg.selection]).

Functional core: [`rpg.kl`][rpg.kl], [`rpg.objectives`][rpg.objectives], [`rpg.clipping`][rpg.clipping],
[`rpg.aggregation`][rpg.aggregation], [`rpg.correction`][rpg.correction], [`rpg.advantages`][rpg.advantages], [`rpg.logprobs`][rpg.logprobs]; the loss as
one function, [`policy_loss`][rpg.functional.policy_loss], of a frozen [`LossConfig`][rpg.config.LossConfig]. Loss classes: [`PolicyLoss`][rpg.losses.PolicyLoss],
[`RPGLoss`][rpg.losses.RPGLoss] and the presets of [`rpg.presets`][rpg.presets]. Exact oracles for
tests: [`rpg.testing`][rpg.testing].
"""

from . import (
    advantages,
    aggregation,
    clipping,
    config,
    correction,
    functional,
    kl,
    logprobs,
    metrics,
    objectives,
    presets,
    selection,
    sequence,
    testing,
)
from .aggregation import AGG_MODES, aggregate
from .clipping import Clip, ClipRule, GradientPreservingClip, SignedTruncate, SoftGate, Truncate, TrustRegion
from .config import RATIOS, STYLES, LossConfig
from .correction import RolloutCorrection
from .functional import policy_loss
from .fused import FusedLinearLoss
from .kl import k1, k2, k3
from .losses import PolicyLoss, RPGLoss
from .metrics import LossOutput
from .objectives import DIVERGENCES, ESTIMATORS, KL_TERMS
from .presets import (
    CISPOLoss,
    ClipCovLoss,
    DAPOLoss,
    DPPOLoss,
    DrGRPOLoss,
    DROLoss,
    GMPOLoss,
    GPPOLoss,
    GRPOLoss,
    GSPOLoss,
    KLCovLoss,
    OnPolicyDistillationLoss,
    PrimeRLLoss,
    REINFORCEPlusPlusLoss,
    SAPOLoss,
    TOPRLoss,
    VESPOLoss,
)
from .reference import ReferenceUpdate

__version__ = "0.1.0"

__all__ = [
    "AGG_MODES",
    "DIVERGENCES",
    "ESTIMATORS",
    "KL_TERMS",
    "RATIOS",
    "STYLES",
    "CISPOLoss",
    "Clip",
    "ClipRule",
    "DAPOLoss",
    "DPPOLoss",
    "DrGRPOLoss",
    "FusedLinearLoss",
    "GRPOLoss",
    "GSPOLoss",
    "LossConfig",
    "LossOutput",
    "OnPolicyDistillationLoss",
    "PolicyLoss",
    "REINFORCEPlusPlusLoss",
    "RPGLoss",
    "RolloutCorrection",
    "ReferenceUpdate",
    "Truncate",
    "TrustRegion",
    "advantages",
    "aggregate",
    "aggregation",
    "clipping",
    "config",
    "correction",
    "functional",
    "k1",
    "k2",
    "k3",
    "kl",
    "logprobs",
    "metrics",
    "objectives",
    "policy_loss",
    "presets",
    "testing",
    "__version__",
    # token-level families (SAPO, TOPR, GPPO / CE-GPPO, DRO, prime-rl) and their clip rules
    "DROLoss",
    "GPPOLoss",
    "GradientPreservingClip",
    "PrimeRLLoss",
    "SAPOLoss",
    "SignedTruncate",
    "SoftGate",
    "TOPRLoss",
    "GMPOLoss",
    "VESPOLoss",
    "ClipCovLoss",
    "KLCovLoss",
    "selection",
    "sequence",
]
