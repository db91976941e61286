"""Scripts in examples/ run and print what their docstrings promise."""

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _rows(text):
    rows = {}
    for line in text.splitlines():
        parts = line.rsplit(maxsplit=3)
        if len(parts) == 4 and parts[1].endswith("-policy"):
            rows[(parts[0].strip(), parts[1])] = (float(parts[2]), float(parts[3]))
    return rows


def test_exact_gradients_example(capsys):
    runpy.run_path(str(EXAMPLES / "exact_gradients.py"), run_name="__main__")
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 20
    fkl_on, rkl_on = rows[("GRPO k3 (unweighted)", "on-policy")]
    assert fkl_on < 1e-12 < 1e-3 < rkl_on  # GRPO's k3 follows the forward KL on-policy...
    assert min(rows[("GRPO k3 (unweighted)", "off-policy")]) > 1e-3  # ...and neither off-policy
    assert rows[("w * k3 (RPG fix)", "off-policy")][1] < 1e-12
    for div in ("fkl", "rkl", "ufkl", "urkl"):
        for style in ("differentiable", "reinforce"):
            fkl_err, rkl_err = rows[(f"RPGLoss({div!r}, {style})", "off-policy")]
            assert (fkl_err if "f" in div else rkl_err) < 1e-12


# Scripts with a test of their own that also runs their failure path (so not run again here).
DRIVEN_ELSEWHERE = {"trl_two_process.py": "tests/integrations/test_trl_multiprocess.py"}


def test_scripts_driven_elsewhere_exist():
    for script, test in DRIVEN_ELSEWHERE.items():
        assert (EXAMPLES / script).is_file() and (EXAMPLES.parent / test).is_file(), (script, test)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_") and p.name not in DRIVEN_ELSEWHERE),
)
def test_every_example_runs(script, capsys):
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert capsys.readouterr().out
