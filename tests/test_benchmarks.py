"""The benchmark scripts run end to end at toy sizes (peers optional), so they cannot rot."""

import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


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


def test_trl_step_benchmark_runs():
    pytest.importorskip("trl", reason="the trl extra is not installed")
    args = ["--batch", "2", "--prompt-len", "4", "--completion-len", "8", "--h", "16", "--v", "64", "--runs", "1"]
    out = subprocess.run(
        [sys.executable, str(BENCH / "trl_step.py"), *args], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| RPGGRPOTrainer(fused_head=True) |" in out.stdout and "|---|" in out.stdout
