"""rpg.testing.audit: each preset's stated objective holds by exact enumeration, and the audit flags
deliberately wrong losses (a dropped importance weight, a flipped KL sign, a dropped +1)."""

import functools
import pathlib
import re

import pytest
import torch

import rpg
from rpg import advantages as A
from rpg import testing as T
from rpg.audit import M2PO, Seeded

BETA = 0.5
EXACT, BIASED = 1e-10, 1e-2


def _k1_returns(rewards, mask, old_logp, ref_logp):
    return A.reinforce_pp(rewards, mask, old_logp, ref_logp, beta=BETA, whiten_advantages=False)


def _doc(obj) -> str:
    return " ".join(obj.__doc__.split())


# (class whose docstring states it, the configuration audited, audit() arguments)
STATED = [
    (rpg.GRPOLoss, lambda: rpg.GRPOLoss(beta=BETA, clip=None), {}),
    (rpg.GRPOLoss, lambda: rpg.GRPOLoss(beta=BETA, clip=None, importance_weighted_kl=True), {}),
    (rpg.DrGRPOLoss, lambda: rpg.DrGRPOLoss(max_len=2, clip=None), {}),
    (rpg.DAPOLoss, lambda: rpg.DAPOLoss(clip=None), {}),
    (rpg.REINFORCEPlusPlusLoss, lambda: rpg.REINFORCEPlusPlusLoss(clip=None), {}),
    (rpg.REINFORCEPlusPlusLoss, lambda: rpg.REINFORCEPlusPlusLoss(clip=None), dict(beta=BETA, advantages=_k1_returns)),
    (rpg.GSPOLoss, lambda: rpg.GSPOLoss(clip=None), {}),
    (rpg.CISPOLoss, lambda: rpg.CISPOLoss(), {}),
    (rpg.OnPolicyDistillationLoss, lambda: rpg.OnPolicyDistillationLoss(beta=BETA), {}),
    (rpg.DPPOLoss, lambda: rpg.DPPOLoss(), {}),
    (rpg.SAPOLoss, lambda: rpg.SAPOLoss(), {}),
    (rpg.TOPRLoss, lambda: rpg.TOPRLoss(), {}),
    (rpg.GPPOLoss, lambda: rpg.GPPOLoss(), {}),
    (rpg.GPPOLoss, lambda: rpg.GPPOLoss(low=None, high=None), {}),
    (rpg.DROLoss, lambda: rpg.DROLoss(BETA), {}),
    (rpg.PrimeRLLoss, lambda: rpg.PrimeRLLoss(), {}),
    # sequence ratios, selection rules (a generator seeded 0 at every call) and M2PO: paper defaults
    (rpg.GMPOLoss, lambda: rpg.GMPOLoss(), {}),
    (rpg.GMPOLoss, lambda: rpg.GMPOLoss(low=None, high=None), {}),
    (rpg.VESPOLoss, lambda: rpg.VESPOLoss(), {}),
    (rpg.ClipCovLoss, lambda: Seeded(rpg.ClipCovLoss()), {}),
    (rpg.KLCovLoss, lambda: Seeded(rpg.KLCovLoss()), {}),
    (rpg.RolloutCorrection, lambda: rpg.PolicyLoss(correction=M2PO), {}),
]


@pytest.mark.parametrize("cls,make,kwargs", STATED, ids=lambda x: getattr(x, "__name__", ""))
def test_each_preset_docstring_states_its_computed_audit(cls, make, kwargs):
    statement = T.audit(make(), **kwargs).statement()
    assert f"{statement}" in _doc(cls), f"{cls.__name__}'s docstring should say: {statement}"


@pytest.mark.parametrize("style", rpg.STYLES)
@pytest.mark.parametrize("div", rpg.DIVERGENCES)
def test_rpg_losses_follow_their_divergence_on_and_off_policy(div, style):
    a = T.audit(rpg.RPGLoss(div, style=style, beta=BETA, clip=None), objective=div)
    assert a.followed("on-policy") == (div,) and a.followed("off-policy") == (div,)
    assert a.bias(where="on-policy") < EXACT and a.bias(where="off-policy") < EXACT
    assert re.sub(rf"\b{div}\b", "D", a.statement()) in _doc(rpg.RPGLoss)
    # a per-token KL: the whole-response KL's autoregressive term is missed
    assert a.bias(f"seq-{div}", "2 tokens, on-policy") > BIASED


def test_the_statements_can_fail():
    """A statement that disagrees with the computed audit is not in the docstring (the check can fail)."""
    a = T.audit(rpg.GRPOLoss(beta=BETA, clip=None))
    assert a.statement() in _doc(rpg.GRPOLoss)
    assert "on-policy rkl; off-policy, per token, rkl" not in _doc(rpg.GRPOLoss)


# --- a user's own loss, and three bugs the audit catches ---------------------------------


def rkl_loss(logp, old_logp, advantages, mask, ref_logp=None, *, bug=None):
    """The REINFORCE form of E[r] − β·KL(π_θ‖π_ref): −sg(w·(A − β(log ρ + 1)))·logp, token mean."""
    ref_logp = old_logp if ref_logp is None else ref_logp
    w = (logp - old_logp).exp().detach()
    log_rho = (logp - ref_logp).detach()
    if bug == "no importance weight":
        w = torch.ones_like(w)
    sign = -1.0 if bug == "flipped KL sign" else 1.0
    plus_one = 0.0 if bug == "dropped +1" else 1.0
    g = w * (advantages[:, None] - sign * BETA * (log_rho + plus_one))
    return -(g * logp * mask).sum() / mask.sum()


def test_a_correct_user_loss_is_exact():
    a = T.audit(rkl_loss, objective="rkl", beta=BETA)
    assert a.bias(where="on-policy") < EXACT and a.bias(where="off-policy") < EXACT
    assert a.followed("off-policy") == ("rkl",) and not a.corrected
    # it takes no behavior_logp: under μ it is uncorrected, and biased
    assert a.bias(where="1 token, off-policy, μ ≠ π_old") > BIASED


@pytest.mark.parametrize(
    "bug,where",
    [
        ("no importance weight", "off-policy"),  # exact on-policy, where w = 1
        ("flipped KL sign", "on-policy"),
        ("dropped +1", "1 token, off-policy, unnormalized"),  # a baseline for normalized policies
    ],
)
def test_the_audit_flags_three_bugs(bug, where):
    a = T.audit(functools.partial(rkl_loss, bug=bug), objective="rkl", beta=BETA)
    assert a.bias(where=where) > 0.1, str(a)
    assert "rkl" not in a.followed(where)
    if bug == "no importance weight":
        assert a.bias(where="on-policy") < EXACT
    if bug == "dropped +1":
        assert a.bias(where="1 token, off-policy") < EXACT and a.followed("off-policy") == ("urkl",)


# --- the table object ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo():
    return T.audit(rpg.GRPOLoss(beta=BETA, clip=None), objective="rkl")


def test_table_rows_records_and_text(grpo):
    assert len(grpo.records) == len(T.SCENARIOS) * len(T.OBJECTIVES)
    assert [r["scenario"] for r in grpo.rows] == [s.name for s in T.SCENARIOS]
    first = grpo.rows[0]
    assert first["closest"] == "fkl = ufkl" and first["fkl"] < EXACT and first["named"] == first["rkl"] > BIASED
    md = grpo.to_markdown()
    assert md.count("\n|") == len(T.SCENARIOS) + 2 and "bias vs rkl" in md
    text = str(grpo)
    assert grpo.statement() in text and "GRPOLoss(beta=0.5" in text
    assert grpo.closest("off-policy") == "ufkl" and grpo.followed("off-policy") == ()
    assert grpo.beta == BETA  # the loss's own β


def test_beta_comes_from_the_loss_or_the_argument():
    assert T.audit(rpg.DAPOLoss(clip=None), scenarios=T.SCENARIOS[:1]).beta == 0.5
    assert T.audit(rpg.DAPOLoss(clip=None), beta=0.2, scenarios=T.SCENARIOS[:1]).beta == 0.2
    with pytest.raises(ValueError, match=r"disagrees with loss_fn\.beta"):
        T.audit(rpg.GRPOLoss(beta=0.1), beta=0.2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(objective="kl"), "valid options"),
        (dict(beta=-1.0), "beta must be > 0"),
        (dict(seeds=()), "seeds"),
        (dict(reduction="avg"), "reduction"),
        (dict(scenarios=(T.Scenario("x", 1, True, True, False),)), "unknown scenario"),
    ],
)
def test_audit_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.audit(rpg.DAPOLoss(clip=None), **kwargs)


def test_audit_query_errors(grpo):
    with pytest.raises(ValueError, match="groups"):
        grpo.bias(where="nowhere")
    with pytest.raises(ValueError, match="ran no scenario"):
        T.audit(rpg.DAPOLoss(clip=None), scenarios=T.SCENARIOS[:1]).bias("E[r]", "off-policy")
    with pytest.raises(ValueError, match="no objective named"):
        T.audit(rpg.DAPOLoss(clip=None), scenarios=T.SCENARIOS[:1]).bias()


# --- the "Every loss, audited" page and the testing page --------------------------------------

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


@pytest.fixture(scope="module")
def audited():
    from rpg import audit as page

    return page.run()


def _numbers_agree(stored: str, fresh: str) -> bool:
    """The same text, and numbers that agree to one unit of their last printed digit (2 significant
    digits: a platform's last bits may round the other way)."""
    if NUMBER.sub("#", stored) != NUMBER.sub("#", fresh):
        return False
    for a, b in zip(NUMBER.findall(stored), NUMBER.findall(fresh), strict=True):
        if a != b:
            decimals = len(a.split("e")[0].partition(".")[2])
            if "e" in a or "e" in b or abs(float(a) - float(b)) > 1.01 * 10.0**-decimals:
                return False
    return True


def test_the_audit_page_is_a_fresh_run(audited):
    from rpg import audit as page

    stored = (ROOT / "docs" / "audit.md").read_text()
    assert _numbers_agree(stored, page.page(audited)), (
        "docs/audit.md is stale: run `python -m rpg.audit --write docs/audit.md`"
    )
    assert "audit.md" in (ROOT / "mkdocs.yml").read_text() and "testing.md" in (ROOT / "mkdocs.yml").read_text()


def test_the_staleness_check_can_fail():
    assert _numbers_agree("bias 0.25 and < 1e-10", "bias 0.26 and < 1e-10")
    assert not _numbers_agree("bias 0.25", "bias 0.28")
    assert not _numbers_agree("follows rkl", "follows urkl")


def test_the_page_claims_hold(audited):
    """Which rows follow their named objective, on-policy and off-policy (one token)."""
    not_on = {row.name for row, a in audited if a.bias(where="on-policy") >= EXACT}
    assert not_on == {"GRPOLoss, k3", "KL in reward, k2 returns", "ClipCovLoss"}
    not_off = {row.name for row, a in audited if a.bias(where="1 token, off-policy") >= EXACT}
    assert not_off == {
        "GRPOLoss, k3",
        "KL in reward, k1 returns",
        "KL in reward, k2 returns",
        "DPPOLoss",
        # the token-level families: each changes the importance weight off-policy by design
        "SAPOLoss",
        "TOPRLoss",
        "GPPOLoss",
        "DROLoss",
        "PrimeRLLoss",
        # the sequence-level and selection families
        "GMPOLoss",
        "VESPOLoss",
        "ClipCovLoss",
        "KLCovLoss",
    }
    # every per-response objective is missed off-policy with per-token ratios only
    assert min(a.bias(where="2 tokens, off-policy") for _, a in audited) > BIASED


def test_python_m_rpg_audit_writes_the_page(audited, tmp_path, monkeypatch, capsys):
    from rpg import audit as page

    monkeypatch.setattr(page, "run", lambda rows=None: audited)
    assert page.main(["--write", str(tmp_path / "audit.md")]) == 0
    assert (tmp_path / "audit.md").read_text() == page.page(audited)
    assert page.main([]) == 0 and capsys.readouterr().out == page.page(audited)


def test_the_testing_page_runs_and_its_tests_pass(capsys):
    """Each Python block of docs/testing.md runs on its own, and the pytest recipe's tests pass."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "testing.md").read_text(), flags=re.S)
    assert len(blocks) >= 4
    ran = []
    for block in blocks:
        namespace = {}
        exec(compile(block, "docs/testing.md", "exec"), namespace)
        for name, fn in namespace.items():
            if name.startswith("test_") and callable(fn):
                fn()
                ran.append(name)
    assert ran == ["test_my_loss_follows_the_reverse_kl_off_policy", "test_my_loss_audit"]
    assert "relative bias" in capsys.readouterr().out


def test_the_peer_tables_are_a_fresh_run_of_verls_and_trls_code():
    pytest.importorskip("verl.trainer.ppo.core_algos", reason="the verl extra is not installed")
    pytest.importorskip("trl", reason="the trl extra is not installed")
    import importlib.util

    spec = importlib.util.spec_from_file_location("audit_peers", ROOT / "examples" / "audit_peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    stored = peers.OUT.read_text()
    assert _numbers_agree(stored, peers.markdown()), "run `python examples/audit_peers.py --write`"
    assert '--8<-- "docs/_generated/audit_peers.md"' in (ROOT / "docs" / "audit.md").read_text()
