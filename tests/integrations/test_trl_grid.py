"""A GRPOConfig grid: every setting is reproduced by RPGGRPOTrainer (TRL's loss and gradient), or refused with a reason.

The grid is every ``loss_type`` × clip (``epsilon``, ``epsilon_high``) × ``delta`` × KL (``beta`` with and without
``use_bias_correction_kl``) × ``importance_sampling_level`` × vLLM correction mode × entropy options
(``top_entropy_quantile``, entropy bonus). Each setting runs TRL's own ``GRPOTrainer._compute_loss`` and
RPGGRPOTrainer's on the same float64 inputs (the harness of ``test_trl_equivalence.py``) and is classified:

* ``matched``: loss and d loss / d logits equal to 1e-12;
* ``refused``: the adapter raised ``ValueError`` (its reason is recorded);
* ``differs``: it accepted the setting and computed something else — must never happen;
* ``error``: any other exception in the adapter — must never happen either.

Settings GRPOConfig itself rejects, or TRL's own loss fails on, are not settings (``invalid``). CI runs a
fixed random sample; ``python -m tests.integrations.test_trl_grid`` runs the whole grid and prints the counts
and the refusal reasons.
"""

import collections
import itertools
import logging
import random
import sys

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

from trl import GRPOTrainer

from rpg.integrations.trl import RPGGRPOTrainer

from .test_trl_equivalence import _config, _inputs, _ours, _stub

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo", "sapo", "vespo")
CLIPS = ((0.2, None), (0.2, 0.28), (0.2, 5.0))  # (epsilon, epsilon_high); cispo caps at epsilon_high
DELTAS = (None, 0.9, 1.1, 1.5)
KLS = ((0.0, True), (0.04, True), (0.04, False))  # (beta, use_bias_correction_kl)
LEVELS = ("token", "sequence")
VLLM = (None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
ENTROPY = ((1.0, 0.0), (0.5, 0.0), (1.0, 0.01), (0.5, 0.01))  # (top_entropy_quantile, entropy_coef)
TOL = 1e-12


def grid():
    """Every setting, as GRPOConfig keyword arguments."""
    axes = (LOSS_TYPES, CLIPS, DELTAS, KLS, LEVELS, VLLM, ENTROPY)
    for lt, (eps, eps_high), delta, (beta, bias), level, vllm, (quantile, coef) in itertools.product(*axes):
        kw = dict(loss_type=lt, epsilon=eps, epsilon_high=eps_high, delta=delta, beta=beta)
        kw.update(use_bias_correction_kl=bias, importance_sampling_level=level)
        kw.update(top_entropy_quantile=quantile, entropy_coef=coef)
        if vllm is not None:
            kw.update(use_vllm=True, vllm_importance_sampling_mode=vllm, vllm_importance_sampling_clip_max=1.5)
        yield kw


def classify(kw):
    """``(status, detail)`` for one setting (see the module docstring)."""
    try:
        args = _config(**kw)
    except (ValueError, TypeError) as e:
        return "invalid", f"GRPOConfig: {e}"
    logits, ids, inputs = _inputs(args, seed=0)
    try:
        want = GRPOTrainer._compute_loss(_stub(args, logits, ids), None, dict(inputs))
        (want_grad,) = torch.autograd.grad(want, logits)
    except Exception as e:  # TRL's own loss fails: not a setting
        return "invalid", f"TRL: {type(e).__name__}: {e}"
    try:
        ours = _ours(args, logits, ids)
    except ValueError as e:
        return "refused", str(e)
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"
    try:
        got = RPGGRPOTrainer._compute_loss(ours, None, dict(inputs))
        (got_grad,) = torch.autograd.grad(got, logits)
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"
    loss_err = (got - want).abs().item()
    grad_err = (got_grad - want_grad).abs().max().item()
    if loss_err <= TOL and grad_err <= TOL:
        return "matched", ""
    return "differs", f"loss {loss_err:.2e}, grad {grad_err:.2e}"


def run(settings):
    counts, reasons, bad = collections.Counter(), collections.Counter(), []
    for kw in settings:
        status, detail = classify(kw)
        counts[status] += 1
        if status == "refused":
            reasons[detail.split(":")[0][:110]] += 1
        elif status in ("differs", "error"):
            bad.append((kw, status, detail))
    return counts, reasons, bad


def test_a_sample_of_the_grid_is_matched_or_refused_never_different():
    settings = list(grid())
    sample = random.Random(0).sample(settings, 400)
    counts, reasons, bad = run(sample)
    assert not bad, bad[:5]
    assert counts["matched"] > 200 and counts["differs"] == 0 and counts["error"] == 0, counts
    # The one refusal is the documented one: TRL's sequence-ratio-weighted KL, which TRL computes wrongly.
    assert set(reasons) == {"importance_sampling_level='sequence' with beta != 0 and use_bias_correction_kl=True"}, (
        reasons
    )


def test_grid_refuses_every_sequence_ratio_weighted_kl():
    """The one computation refused because TRL's is wrong, wherever it occurs in the grid."""
    kw = dict(importance_sampling_level="sequence", beta=0.04, use_bias_correction_kl=True)
    for lt in ("grpo", "dapo", "cispo", "luspo"):
        status, detail = classify({**kw, "loss_type": lt})
        assert status == "refused" and "every token of its response" in detail, (lt, status, detail)


def main() -> None:
    logging.getLogger("rpg.integrations.trl").setLevel(logging.ERROR)  # the unused-setting notes, once per setting
    settings = list(grid())
    counts, reasons, bad = run(settings)
    print(f"{len(settings)} settings: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for reason, n in reasons.most_common():
        print(f"  refused {n:5d}: {reason}")
    for kw, status, detail in bad[:20]:
        print(f"  {status}: {kw}: {detail}")


if __name__ == "__main__":
    sys.exit(main())
