"""The training–inference mismatch page cannot rot: its stored tables equal a fresh run of their
generator (examples/rollout_correction_bias.py), each claim the tables carry holds on the fresh
numbers (exact cells below 1e-10, biased ones above 1e-4), and the numbers quoted in its prose are
the tables'."""

import importlib.util
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "mismatch.md"
EXACT, BIASED = 1e-10, 1e-4


def _load():
    path = ROOT / "examples" / "rollout_correction_bias.py"
    spec = importlib.util.spec_from_file_location("rollout_correction_bias", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load()


@pytest.fixture(scope="module")
def fresh():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exactness, bias = gen.exactness_table(), gen.bias_table()
    finally:
        torch.set_num_threads(threads)
    return exactness, bias


def _cells(markdown: str) -> list[list[str]]:
    rows = [line.strip().strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row] for row in rows if not set("".join(row).strip()) <= set("- ")]


def _same(stored: str, new: str) -> bool:
    """Two cells agree: the same text, or numbers that agree to the printed 3 digits (both below
    1e-10 count as the same rounding error, whatever the platform's last bits)."""
    if stored == new:
        return True
    a, b = [[float(x) for x in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", s)] for s in (stored, new)]
    if len(a) != len(b) or not a:
        return False
    return all(
        (x < EXACT and y < EXACT) or abs(x - y) <= 0.006 * max(abs(x), abs(y)) for x, y in zip(a, b, strict=False)
    )


def test_stored_tables_equal_a_fresh_run(fresh):
    exactness, bias = fresh
    want = {
        "mismatch_exactness.md": gen.exactness_markdown(exactness),
        "mismatch_bias.md": gen.bias_markdown(bias),
        "mismatch_bias_compact.md": gen.bias_markdown(bias, gen.COMPACT_ENGINES, gen.COMPACT_ROWS),
    }
    for name, text in want.items():
        stored = _cells((gen.OUT / name).read_text())
        new = _cells(text)
        assert len(stored) == len(new), f"{name}: run `python examples/rollout_correction_bias.py --write`"
        for s_row, n_row in zip(stored, new, strict=False):
            assert len(s_row) == len(n_row) and all(map(_same, s_row, n_row)), (name, s_row, n_row)


def test_the_page_includes_the_tables():
    page = PAGE.read_text()
    for name in ("mismatch_exactness.md", "mismatch_bias.md"):
        assert f'--8<-- "docs/_generated/{name}"' in page
    assert "python examples/rollout_correction_bias.py --write" in page
    assert "mismatch.md" in (ROOT / "mkdocs.yml").read_text()


def test_exactness_claims(fresh):
    exactness, _ = fresh
    none, token, prefix, sequence = (exactness[label] for label, _, _ in gen.WEIGHTS)
    # one token: every weight is exact for every RPG loss, no weight is not
    for row in (token, prefix, sequence):
        assert max(row[gen.TOKEN_COL]) < EXACT
    assert min(none[gen.TOKEN_COL]) > BIASED
    assert len(none[gen.TOKEN_COL]) == 16 * len(gen.PROBLEMS)  # 8 losses x normalized/unnormalized
    # an outcome reward on whole responses: only the sequence product is exact
    assert max(sequence[gen.SEQ_COL]) < EXACT
    for row in (none, token, prefix):
        assert min(row[gen.SEQ_COL]) > BIASED


FULL_SUPPORT = [e for e in gen.ENGINES if not e.startswith("top-p")]
SUPPORT_MISMATCH = [e for e in gen.ENGINES if e.startswith("top-p")]


def test_bias_claims(fresh):
    _, table = fresh
    mean, lo, hi = table["bias"], table["min"], table["max"]
    for e in gen.ENGINES:  # every displayed cell reads unambiguously: exact or biased
        for label in mean:
            assert mean[label][e] < EXACT or mean[label][e] > BIASED, (label, e)
    for e in FULL_SUPPORT:
        assert table["mismatch"][e][1] == 0
        assert hi["sequence Π_t ρ_t, exact"][e] < EXACT
        for label in (
            "none (μ taken for π_old)",
            "token ρ_t, exact",
            "token, truncate ≤ 2 (default)",
            "prefix product Π_{s≤t} ρ_s",
        ):
            assert lo[label][e] > 1e-5, (label, e)  # biased on every problem
        # the prefix product beats the token weight, and the token weight no weight at all
        prefix, token, none = (
            mean[k][e] for k in ("prefix product Π_{s≤t} ρ_s", "token ρ_t, exact", "none (μ taken for π_old)")
        )
        assert prefix < token < none
    for e in SUPPORT_MISMATCH:  # no weight corrects responses μ never samples
        assert table["mismatch"][e][1] > 0
        for label in mean:
            assert lo[label][e] > BIASED, (label, e)
    big = "noise σ = 0.5"  # where the bounds bind: truncating the sequence weight beats any token weight
    assert EXACT < mean["sequence, truncate ≤ 2"][big] < mean["prefix product Π_{s≤t} ρ_s"][big]


def test_numbers_in_the_prose_are_the_tables():
    text = PAGE.read_text().split("What the table shows:")[1].split("## In code")[0]
    table = (gen.OUT / "mismatch_bias.md").read_text()
    cells = {c for row in _cells(table) for c in row}
    settings = {"0.05", "0.2", "0.5", "0.95", "0.8"}  # σ, top-p and the [0.5, 2] band
    quoted = [x for x in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", text) if x not in settings]
    assert len(quoted) >= 10
    missing = [x for x in quoted if x not in cells]
    assert not missing, missing


def test_support_oracle_equals_the_library_oracle_on_full_support():
    p = gen.T.random_sequence_problem(k=4, seed=1)
    mu = gen._noise(p.logits, 0.3, 0)
    for c in gen.CORRECTIONS:
        loss_fn = gen.policy_gradient(c.correction)
        want = gen.T.correction_bias(loss_fn, p, mu, weights=c.weights, behavior=c.behavior)
        got = gen.support_bias(loss_fn, p, mu, weights=c.weights, behavior=c.behavior)
        assert abs(got - want) < 1e-12, c.label


def test_top_p_engine():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, *[0.0] * 16], dtype=torch.float64)  # K = 4
    mu = gen.top_p(logits, 0.8)
    first = mu[:4]
    probs = torch.softmax(logits[:4], -1)  # 0.644, 0.237, 0.087, 0.032: the first two reach 0.8
    assert torch.isinf(first[2:]).all() and torch.isfinite(first[:2]).all()
    torch.testing.assert_close(first[:2].exp(), probs[:2] / probs[:2].sum())
    second = mu[4:].view(4, 4)  # uniform rows: the mass before the 4th token is 0.75 < 0.8, so all stay
    assert torch.isfinite(second).all()
