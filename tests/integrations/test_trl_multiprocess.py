"""RPGGRPOTrainer data-parallel on two CPU processes (gloo) vs one process with the same global batch.

Drives examples/trl_two_process.py: both runs train three steps of an rpg loss with a reference model
and a token mean over the global batch, with one and with two micro-batches per step; every optimizer step's
gradient and every logged value it compares must agree.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "trl_two_process.py"


def _script():
    spec = importlib.util.spec_from_file_location("trl_two_process", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["trl_two_process"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_processes_give_the_gradient_and_logs_of_one():
    script = _script()
    result = script.run(timeout=240.0)
    assert not result["mismatches"], "\n".join(result["mismatches"])
    one, two = (result["compared"][s] for s in script.SETTINGS)
    assert {"loss", "policy_loss", "kl", "entropy", "rpg/ratio/mean", "rpg/kl/term", "rpg/clip_frac"} <= set(one)
    assert {"loss", "policy_loss", "grad_norm", "reward"} <= set(two)
    assert 0.0 < result["max_rel"] < script.GRAD_RTOL  # nonzero: the runs really are different processes


def _result(grads, loss=1.0):
    return {"grads": grads, "logs": [{"step": 1, "loss": loss, "policy_loss": loss, "kl": 0.1}], "nproc": 1}


def test_the_comparison_catches_a_process_weighted_differently():
    """compare() on made-up results: float32-size noise passes, a gradient off by 1 % or a loss off by
    1e-4 (relative) fails, and so does a missing step or a missing logged value."""
    script = _script()
    g = torch.linspace(-1.0, 1.0, 50, dtype=torch.float64)
    one = _result([g, 2 * g])
    logs = [{**h, "rpg/ratio/mean": 1.0, "rpg/kl/term": 0.1} for h in one["logs"]]
    one["logs"] = logs
    same = {**_result([g * (1 + 1e-8), 2 * g]), "logs": [dict(h) for h in logs]}
    assert script.compare(one, same)["mismatches"] == []
    off = {**_result([g, 2 * g * 1.01]), "logs": [dict(h) for h in logs]}
    assert any("gradient of step 2" in m for m in script.compare(one, off)["mismatches"])
    loss_off = {**_result([g, 2 * g]), "logs": [{**h, "loss": 1.0001} for h in logs]}
    assert any("loss" in m for m in script.compare(one, loss_off)["mismatches"])
    short = {**_result([g]), "logs": [dict(h) for h in logs]}
    assert any("optimizer steps" in m for m in script.compare(one, short)["mismatches"])
    unlogged = {**_result([g, 2 * g]), "logs": [{k: v for k, v in h.items() if k != "kl"} for h in logs]}
    assert script.compare(one, unlogged)["mismatches"]


class _TwoProcesses:
    """An accelerator stand-in for process 0 of two: ``gather`` returns process 0's row (checked to be the
    one passed) stacked over process 1's."""

    num_processes = 2

    def __init__(self, row1):
        self.row1 = row1
        self.rows = []

    def gather(self, x):
        self.rows.append(x)
        return torch.cat([x, self.row1])


def test_rpg_metrics_reduced_over_processes_equal_the_full_batch_metrics():
    """The trainer's reduction of two processes' per-call rpg metrics gives the full batch's metrics (float64,
    1e-12): token means, min/max, and the ESS recombined from Σw and Σw²; the processes hold 5 and 2 rows with
    different token counts."""

    import rpg
    from rpg.integrations._trl_step import _across_processes

    from ..conftest import make_batch

    logp, old, adv, mask, ref = make_batch(7, 5, seed=3, spread=0.6)
    mask[5:, 3:] = False  # process 1's responses are shorter
    loss_fn = rpg.RPGLoss("urkl", style="reinforce", beta=0.05, agg="token-mean")
    full = loss_fn(logp, old, adv, mask, ref_logp=ref).metrics
    halves = [slice(0, 5), slice(5, 7)]
    outs = [loss_fn(logp[s], old[s], adv[s], mask[s], ref_logp=ref[s]).metrics for s in halves]
    assert float(mask[halves[0]].sum()) / 5 != float(mask[halves[1]].sum()) / 2  # unequal tokens per row
    names = list(outs[0])
    row1 = torch.tensor([[*(outs[1][k] for k in names), float(mask[halves[1]].sum())]], dtype=torch.float64)

    accelerator = _TwoProcesses(row1)
    logged = _across_processes(accelerator, outs[0], mask[halves[0]])
    assert len(accelerator.rows) == 1
    assert set(logged) == set(full)
    for k, v in full.items():
        assert abs(logged[k] - v) <= 1e-12 * max(1.0, abs(v)), (k, logged[k], v)
    # a per-process mean (what logging process 0's own value gives) is not the full batch's
    assert abs(outs[0]["ratio/mean"] - full["ratio/mean"]) > 1e-3


def test_a_process_without_tokens_leaves_the_reduced_metrics_those_of_the_others():
    """A process whose micro-batch has no response token logs 0 for every rpg metric: the reduction gives it
    weight 0 in the token means and leaves it out of min/max and the ESS, so the result is the other
    process's batch metrics (float64, 1e-12)."""

    import rpg
    from rpg.integrations._trl_step import _across_processes

    from ..conftest import make_batch

    logp, old, adv, mask, ref = make_batch(7, 5, seed=4, spread=0.6)
    mask[5:] = False  # process 1 holds rows 5 and 6, both empty
    loss_fn = rpg.RPGLoss("urkl", style="reinforce", beta=0.05, agg="token-mean")
    full = loss_fn(logp, old, adv, mask, ref_logp=ref).metrics
    halves = [slice(0, 5), slice(5, 7)]
    outs = [loss_fn(logp[s], old[s], adv[s], mask[s], ref_logp=ref[s]).metrics for s in halves]
    assert all(v == 0.0 for v in outs[1].values())  # what the empty process logs
    assert full["ratio/min"] > 0.1  # a min that took the empty process's 0 would be caught
    names = list(outs[0])
    row1 = torch.tensor([[*(outs[1][k] for k in names), 0.0]], dtype=torch.float64)
    logged = _across_processes(_TwoProcesses(row1), outs[0], mask[halves[0]])
    for k, v in full.items():
        assert abs(logged[k] - v) <= 1e-12 * max(1.0, abs(v)), (k, logged[k], v)
