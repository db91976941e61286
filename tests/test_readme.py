"""The code in README.md and docs/ runs as printed; the quick start's updates move the policy.

Blocks fenced as ```python run; ```py marks an excerpt that needs outside state (a model, a dataset)."""

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_quick_start():
    assert any("rpg.RPGLoss" in block for block in _python_blocks())


@pytest.mark.parametrize("block", _python_blocks())
def test_readme_code_runs(block, capsys):
    torch.manual_seed(0)
    namespace = {}
    exec(compile(block, str(README), "exec"), namespace)
    out = namespace.get("out")
    if out is not None:  # a loss example: a finite loss and sane metrics
        assert torch.isfinite(out.loss)
        assert 0.0 <= out.metrics["clip_frac"] <= 1.0
    assert capsys.readouterr().out.strip()  # it printed its numbers
    if "token_logp" in namespace:  # the optimizer steps changed the policy's log-probs
        assert not torch.allclose(namespace["token_logp"](), namespace["old_logp"])


DOCS = sorted((README.parent / "docs").glob("*.md"))


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_docs_code_runs(page):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    for block in blocks:
        exec(compile(block, str(page), "exec"), {})  # each block asserts what it shows
