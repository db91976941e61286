"""python -m rpg.demo: runs, writes its table and plot, and is reproducible."""

import subprocess
import sys

import pytest

from rpg import demo


def test_quick_demo_writes_table_and_plot(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rpg.demo", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("GRPO", "DAPO", "REINFORCE++", "RPG", "RPG-REINFORCE"):
        assert f"| {name} |" in out.stdout
    assert (tmp_path / "demo.md").read_text().startswith("| loss |")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_same_seed_same_numbers():
    a = demo.train("RPG-REINFORCE", 5, seed=3)
    b = demo.train("RPG-REINFORCE", 5, seed=3)
    assert a["rewards"] == b["rewards"] and a["kls"] == b["kls"]
    assert demo.train("RPG-REINFORCE", 5, seed=4)["rewards"] != a["rewards"]


def test_learning_happens():
    """Sixty steps lift the mean reward well above chance (0.1)."""
    result = demo.train("GRPO", 60, seed=0)
    assert sum(result["rewards"][-10:]) / 10 > 0.25


def test_reward_rule():
    import torch

    prompts = torch.tensor([3, 9])
    tokens = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 0, 1, 0, 0, 0]])
    assert demo.reward(prompts, tokens).tolist() == [1.0, 0.5]


def test_unknown_loss_name():
    with pytest.raises(SystemExit, match="unknown loss"):
        demo.main(["--losses", "PPO2", "--quick"])
