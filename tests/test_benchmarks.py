"""The benchmark scripts run end to end at toy sizes (peers optional), so they cannot rot."""

import pathlib
import subprocess
import sys
import types

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,args",
    [
        ("loss_speed.py", ["--tokens", "2048", "--seq-len", "256", "--runs", "2", "--no-compile"]),
        ("logprobs_memory.py", ["--n", "64", "--h", "8", "--v", "300", "--runs", "1"]),
    ],
)
def test_benchmark_runs(script, args):
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| rpg " in out.stdout and "|---|" in out.stdout


def test_trl_step_benchmark_runs(tmp_path, monkeypatch, capsys):
    """In this process (a fresh interpreter importing TRL costs most of a minute on a loaded machine)."""
    pytest.importorskip("trl", reason="the trl extra is not installed")
    monkeypatch.syspath_prepend(str(BENCH))
    import trl_step

    sizes = ["--batch", "2", "--prompt-len", "4", "--completion-len", "8", "--h", "16", "--v", "64", "--layers", "1"]
    monkeypatch.setattr(sys, "argv", ["trl_step.py", *sizes, "--runs", "1", "--peak-runs", "0"])
    trl_step.main()
    out = capsys.readouterr().out
    assert "| RPGGRPOTrainer(fused_head=True) |" in out and "|---|" in out
    # What each fresh process of the peak measurement runs:
    args = types.SimpleNamespace(
        batch=2, prompt_len=4, completion_len=8, h=16, v=64, layers=1, dtype="float32", device="cpu", masks=True
    )
    assert trl_step.peak_child(trl_step.FUSED, args, str(tmp_path)) >= 0
