"""The code in README.md and docs/ runs as printed; the quick start's updates move the policy.

Blocks fenced as ```python run; ```py marks an excerpt that needs outside state (a model, a dataset)."""

import pathlib
import re

import pytest
import torch

import rpg

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


def _quick_start():
    (block,) = [b for b in _python_blocks() if "token_logp" in b and "rpg.RPGLoss" in b]
    return block


def test_quick_start_clips_few_tokens(capsys):
    """Four off-policy steps at the quick start's learning rate move the policy without clipping most tokens."""
    torch.manual_seed(0)
    namespace = {}
    exec(compile(_quick_start(), str(README), "exec"), namespace)
    metrics = namespace["out"].metrics
    assert 0.0 <= metrics["clip_frac"] <= 0.1, metrics
    assert 1.0 < metrics["ratio/max"] < 1.5, metrics


def _excerpts(text, needle):
    return [b for b in re.findall(r"```py\n(.*?)```", text, flags=re.S) if needle in b]


@pytest.mark.parametrize("page", [README, README.parent / "docs" / "integrations.md"], ids=["README", "integrations"])
def test_trl_excerpt_runs_with_a_tiny_model(page, tmp_path, monkeypatch):
    """The TRL excerpt runs as printed once given what it says is the user's (a model, tokenizer, reward
    function and dataset: here a tiny random Llama on CPU). Only the GRPOConfig is shrunk for CPU: two
    steps, short completions, no bf16."""
    trl = pytest.importorskip("trl", reason="the trl extra is not installed")
    from datasets import Dataset

    from tests.integrations.test_trl import _model, _tokenizer, count_a

    (block,) = _excerpts(page.read_text(), "RPGGRPOTrainer")
    real = trl.GRPOConfig
    cpu = dict(
        use_cpu=True,
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    monkeypatch.setattr(trl, "GRPOConfig", lambda **kwargs: real(**{**kwargs, **cpu}))
    monkeypatch.chdir(tmp_path)
    tokenizer = _tokenizer()
    namespace = {
        "model": _model(len(tokenizer)),
        "tokenizer": tokenizer,
        "reward_fn": count_a,
        "dataset": Dataset.from_dict({"prompt": ["abc", "hgf"] * 4}),
    }
    exec(compile(block, str(page), "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2


USER_PAGES = [README, README.parent / "benchmarks" / "README.md", *DOCS]
TRACKING = re.compile(
    r"\bissue\b|being built|\bTargets?\s*\(|no GPU run|DESIGN\s*§|\bTODO\b|\bFIXME\b|\bnot yet\b", re.I
)


@pytest.mark.parametrize("page", USER_PAGES, ids=[str(p.relative_to(README.parent)) for p in USER_PAGES])
def test_no_internal_tracking_language(page):
    hits = [line for line in page.read_text().splitlines() if TRACKING.search(line)]
    assert not hits, hits


def test_install_hints_name_the_distribution():
    """`rpg` on PyPI is another project: every install hint names `rpg-losses` or installs the clone (`.[extra]`)."""
    root = README.parent
    assert re.search(r'^name = "rpg-losses"', (root / "pyproject.toml").read_text(), flags=re.M)
    integrations = pathlib.Path(rpg.__file__).parent / "integrations"  # the checkout's, or the installed wheel's
    for page in [README, *DOCS, integrations / "trl.py", integrations / "verl.py"]:
        text = page.read_text()
        assert not re.search(r"""['"\s]rpg\[""", text), page  # `pip install "rpg[verl]"` installs the other project
        for hint in re.findall(r"pip install[^\n`]*", text):
            assert "rpg[" not in hint and " rpg " not in hint + " ", (page, hint)


@pytest.mark.parametrize("extra", ["trl", "verl"])
def test_missing_extra_names_the_distribution(extra):
    """Without the framework installed, importing the integration says which distribution extra to install."""
    import subprocess
    import sys

    code = (
        f"import sys; sys.modules[{extra!r}] = None\n"
        f"try:\n    import rpg.integrations.{extra}\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=README.parent, timeout=120)
    assert f"pip install 'rpg-losses[{extra}]'" in out.stdout, out.stdout + out.stderr
