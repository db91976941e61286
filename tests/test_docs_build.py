"""The documentation site builds with `mkdocs build --strict` (any warning fails it), and renders what it promises."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    pytest.importorskip("mkdocstrings")
    out_dir = tmp_path_factory.mktemp("docs") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out_dir


def test_mkdocs_build_strict(site):
    page = (site / "clipping" / "index.html").read_text()
    assert "RPG-Style Clip" in page and "Algorithm 2" in page
    for name in ("estimators", "objectives", "aggregation", "algorithms"):
        assert "<table>" in (site / name / "index.html").read_text(), name
    assert "arithmatex" in (site / "math" / "index.html").read_text()
    api = (site / "api" / "index.html").read_text()
    assert "RPGLoss" in api and "from_hidden" in api


def test_api_reference_lists_each_public_object_once(site):
    api = (site / "api" / "index.html").read_text()
    ids = re.findall(r'id="(rpg\.[\w.]+)"', api)
    for module in ("rpg.integrations.verl", "rpg.integrations.trl", "rpg.integrations.trl.RPGGRPOTrainer"):
        assert module in ids, module
    assert ids.count("rpg.metrics.LossOutput") == 1 and "rpg.losses.LossOutput" not in ids
    private = [i for i in ids if re.search(r"\._(?!_)", i)]
    assert not private, private


@pytest.mark.parametrize("name", ["estimators", "objectives", "clipping"])
def test_math_pages_derive_and_work_an_example(site, name):
    page = (site / name / "index.html").read_text()
    assert page.count('class="arithmatex"') >= 5, "the math in LaTeX"
    assert "Worked example" in page and re.search(r'<div class="[^"]*highlight', page), "a worked example in code"


def test_math_renders_offline(site):
    """KaTeX is bundled: no page loads a script, style sheet or font from another host."""
    assert (site / "assets" / "katex" / "katex.min.js").is_file()
    assert list((site / "assets" / "katex" / "fonts").glob("*.woff2"))
    for page in site.rglob("*.html"):
        html = page.read_text()
        remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?:)?//[^"]+"', html)
        assert not remote, (page, remote)
    math = (site / "math" / "index.html").read_text()
    assert "assets/katex/katex.min.js" in math and "katex-init.js" in math


def test_api_reference_renders_no_raw_roles(site):
    """Docstrings use mkdocstrings cross-references: no Sphinx role or reST literal marker shows raw."""
    import re

    api_text = re.sub(r"<[^>]+>", "", (site / "api" / "index.html").read_text())
    assert not re.search(r":(class|func|mod|meth|attr|data|obj|exc):", api_text)
    assert "::" not in api_text
