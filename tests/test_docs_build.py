"""The documentation site builds with `mkdocs build --strict` (any warning fails it)."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    pytest.importorskip("mkdocstrings")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    page = (tmp_path / "site" / "clipping" / "index.html").read_text()
    assert "RPG-Style Clip" in page and "Algorithm 2" in page
    for name in ("estimators", "objectives", "aggregation", "algorithms"):
        assert "<table>" in (tmp_path / "site" / name / "index.html").read_text(), name
    assert "arithmatex" in (tmp_path / "site" / "math" / "index.html").read_text()
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "RPGLoss" in api and "from_hidden" in api
    shutil.rmtree(tmp_path / "site")
