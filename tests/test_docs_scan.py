"""What the docs name exists, what the docstrings show runs, and the numbers the prose quotes come from a command.

Scanned: README.md, docs/*.md, benchmarks/README.md, the notebooks' markdown and code cells, and every
docstring of the package (modules, classes, functions, methods; read with ``ast``, so private helpers too).

* A metric name quoted in them (``ratio/...``, ``clip_frac...``, ``select_frac``, ``kl/...``, ``entropy/...``,
  ``rollout_corr/...``, also as TRL's ``rpg/<name>``, and ``a|b`` shorthand) is a key some loss's
  ``out.metrics`` has.
* A dotted ``rpg.xxx`` name (in code blocks, inline code, ``from rpg.x import y`` and mkdocstrings
  cross-references) resolves to a module or attribute.
* Every fenced ``python`` / ``py`` example of a docstring runs as printed, in a fresh namespace.
* Every ``a ± b`` the prose of README and docs quotes is a cell of a table written by the command that
  measured it (docs/img/, docs/_generated/), and every speed or memory ratio the README's performance
  paragraph quotes is in benchmarks/README.md.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import json
import pathlib
import re
import textwrap

import pytest
import torch

import rpg

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = pathlib.Path(rpg.__file__).resolve().parent  # the checkout's rpg/, or the installed wheel's
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
GENERATED = sorted((ROOT / "docs" / "img").glob("*.md")) + sorted((ROOT / "docs" / "_generated").glob("*.md"))


def _rel(path: pathlib.Path) -> str:
    """A page's path from the repository root; a module's as ``rpg/...`` (checkout or installed wheel)."""
    if path.is_relative_to(PKG):
        return str(pathlib.Path("rpg") / path.relative_to(PKG))
    return str(path.relative_to(ROOT))


def _docstrings() -> list[tuple[str, str]]:
    """``(where, docstring)`` of every module, class and function of the package."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    found.append((f"{_rel(path)}:{getattr(node, 'name', '<module>')}", doc))
    return found


def _notebook_text(path: pathlib.Path) -> str:
    return "\n\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"])


def _sources() -> list[tuple[str, str]]:
    return [(_rel(p), p.read_text()) for p in PAGES] + [(_rel(p), _notebook_text(p)) for p in NOTEBOOKS] + _docstrings()


# --- metric names --------------------------------------------------------------------------------

METRIC = re.compile(
    r"""[`'"](?:rpg/)?((?:ratio|kl|entropy|rollout_corr)\w*/[\w|]+|(?:clip|select)_frac\w*(?:/[\w|]+)?)(?=[`'"\\])"""
)


def _expand(name: str) -> list[str]:
    """``ratio/mean|min`` → ratio/mean, ratio/min; ``kl/old_k1|k3`` → kl/old_k1, kl/old_k3."""
    first, *alts = name.split("|")
    head, _, last = first.rpartition("/")
    names = [first]
    for alt in alts:
        stem = last.rpartition("_")[0] + "_" if "_" in last and "_" not in alt else ""
        names.append(f"{head}/{stem}{alt}")
    return names


def _quoted_metric_names(text: str) -> set[str]:
    return {n for m in METRIC.findall(text) for n in _expand(m)}


def _correction_table_names(doc: str) -> set[str]:
    """The first column of a ``| name (rollout_corr/...) |`` table: bare names, comma-separated."""
    names = set()
    for line in doc.splitlines():
        cell = line.split("|")[1] if line.startswith("|") and line.count("|") >= 3 else ""
        for bare in re.findall(r"`+([a-z0-9_]+)`+", cell):
            names.add(f"rollout_corr/{bare}")
    return names


@pytest.fixture(scope="module")
def produced() -> set[str]:
    """Every metric key some loss call produces (all optional inputs given, each kind of correction)."""
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g, dtype=torch.float64) - 1.5  # log-probs stay < 0 after the noise
    logp = old + 0.2 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    beh = old + 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    adv, ent = torch.randn(4, generator=g, dtype=torch.float64), torch.rand(4, 5, generator=g, dtype=torch.float64)
    keys = set()
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            corr = rpg.RolloutCorrection(level=level, mode=mode, lower=0.5, upper=2.0, geo_lower=0.8)
            fn = rpg.GRPOLoss(beta=0.04, correction=corr)
            keys |= set(fn(logp, old, adv, None, ref_logp=ref, behavior_logp=beh, entropy=ent).metrics)
    keys |= set(rpg.KLCovLoss(0.1)(logp, old, adv, None).metrics)  # a selection rule: select_frac
    return keys


def test_the_metric_scan_sees_the_documented_names(produced):
    """The scan is not vacuous: it finds metric names, and every key a loss produces is documented somewhere."""
    quoted = set().union(*(_quoted_metric_names(text) for _, text in _sources()))
    tables = set().union(*(_correction_table_names(d) for w, d in _docstrings() if w.endswith(":correction_metrics")))
    assert len(quoted) >= 15 and len(tables) >= 14
    assert produced <= quoted | tables, sorted(produced - quoted - tables)


@pytest.mark.parametrize("where,text", _sources(), ids=[w for w, _ in _sources()])
def test_quoted_metric_names_exist(where, text, produced):
    missing = sorted(_quoted_metric_names(text) - produced)
    if where.endswith(":correction_metrics") or where == "docs/mismatch.md":
        missing += sorted(_correction_table_names(text) - produced)
    assert not missing, f"{where} names metrics no loss produces: {missing}"


# --- rpg.xxx names -------------------------------------------------------------------------------

DOTTED = re.compile(r"(?<![\w./-])rpg(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^\s*from (rpg(?:\.\w+)*) import ([\w, ()]+)$", re.M)
# Integrations that import their framework, and the framework: names and examples in them are checked only where
# it is installed (SkyRL and AReaL run in their own Python 3.12 environment, .ci/skyrl).
OPTIONAL = {
    "rpg.integrations.trl": "trl",
    "rpg.integrations.verl": "verl",
    "rpg.integrations.skyrl": "skyrl",
    "rpg.integrations.areal": "areal",
}


def _missing_framework(where: str) -> str | None:
    """The framework a docstring's module needs and this environment lacks, or ``None``."""
    module = where.split(":", 1)[0].removesuffix(".py").replace("/", ".")
    framework = OPTIONAL.get(module)
    return framework if framework is not None and importlib.util.find_spec(framework) is None else None


def _code(text: str) -> str:
    """Fenced blocks, inline code and cross-reference targets of a page or docstring."""
    fenced = re.findall(r"```[\w-]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`+([^`\n]+)`+", re.sub(r"```.*?```", "", text, flags=re.S))
    targets = re.findall(r"\]\[(rpg(?:\.\w+)+)\]", text)
    return "\n".join(fenced + inline + targets)


def _names(text: str) -> set[str]:
    code = _code(text)
    names = set(DOTTED.findall(code))
    for module, imported in FROM_IMPORT.findall(code):
        names |= {f"{module}.{part.split()[0]}" for part in imported.strip("()").split(",") if part.strip()}
    return names


def _resolve(name: str):
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        module = ".".join(parts[:i])
        if module in OPTIONAL and importlib.util.find_spec(OPTIONAL[module]) is None:
            return None  # needs its framework, which is not installed here: not checked
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module and not module.startswith(f"{e.name}."):
                raise
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)  # AttributeError names what is missing
        return obj
    raise ModuleNotFoundError(name)


def test_the_name_scan_sees_names():
    found = set().union(*(_names(text) for _, text in _sources()))
    assert len(found) >= 60 and {"rpg.RPGLoss", "rpg.testing.expected_gradient", "rpg.demo"} <= found


@pytest.mark.parametrize("where,text", _sources(), ids=[w for w, _ in _sources()])
def test_named_rpg_objects_exist(where, text):
    missing = []
    for name in sorted(_names(text)):
        try:
            _resolve(name)
        except (AttributeError, ModuleNotFoundError) as e:
            missing.append(f"{name} ({e})")
    assert not missing, f"{where} names what does not exist: {missing}"


# --- docstring examples --------------------------------------------------------------------------

FENCE = re.compile(r"^[ \t]*```(?:python|py)[ \t]*\n(.*?)^[ \t]*```", re.S | re.M)
EXAMPLES = [(where, textwrap.dedent(code)) for where, doc in _docstrings() for code in FENCE.findall(doc)]


def test_there_are_docstring_examples():
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("where,code", EXAMPLES, ids=[f"{w}#{i}" for i, (w, _) in enumerate(EXAMPLES)])
def test_docstring_example_runs(where, code):
    if (framework := _missing_framework(where)) is not None:
        pytest.skip(f"{where} needs {framework}, which is not installed in this environment")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, where, "exec"), {"__name__": "__docstring_example__"})
    finally:
        torch.set_num_threads(threads)


# --- text a user reads ---------------------------------------------------------------------------


def test_demo_help_is_plain_text(capsys):
    demo = importlib.import_module("rpg.demo")
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert "python -m rpg.demo" in out and "--out" in out
    assert not re.search(r"``|:class:|:func:|:mod:|\]\[", out), out


def test_install_hints_in_docstrings_name_the_distribution():
    """`rpg` on PyPI is another project: a docstring's install hint names `rpg-losses`."""
    for where, doc in _docstrings():
        for hint in re.findall(r"pip install[^\n`]*", doc):
            assert "rpg-losses" in hint or ".[" in hint, (where, hint)


PLUS_MINUS = re.compile(r"\d[\d.]*\s±\s[\d.]+")


def _prose(text: str) -> str:
    """A page without its code blocks, included snippets and table rows."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("|", "--8<--")))


def _generated_cells() -> set[str]:
    return set(PLUS_MINUS.findall("\n".join(p.read_text() for p in GENERATED)))


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md")), *NOTEBOOKS], ids=_rel)
def test_quoted_intervals_are_cells_of_generated_tables(page):
    """A mean ± interval quoted in prose is copied from a table its command wrote, not typed in."""
    text = _notebook_text(page) if page.suffix == ".ipynb" else page.read_text()
    if page.suffix == ".ipynb":  # markdown cells only
        text = "\n\n".join(
            "".join(c["source"]) for c in json.loads(page.read_text())["cells"] if c["cell_type"] == "markdown"
        )
    stray = sorted(set(PLUS_MINUS.findall(_prose(text))) - _generated_cells())
    assert not stray, f"{_rel(page)} quotes intervals no generated table has: {stray}"


def test_readme_ratios_are_the_benchmark_tables():
    section = README.read_text().split("## Performance", 1)[1].split("\n## ", 1)[0]
    bench = (ROOT / "benchmarks" / "README.md").read_text()
    ratios = re.findall(r"(\d+\.\d+)(?:–(\d+\.\d+))?×", section)
    assert len(ratios) >= 8
    for low, high in ratios:
        for value in filter(None, (low, high)):
            assert re.search(rf"(?<![\d.]){re.escape(value)}(?![\d])", bench), (
                f"README's {value}× is not in benchmarks/README.md"
            )
