r"""``python -m rpg.audit``: every loss of rpg, audited by exact enumeration — the "Every loss, audited" page.

    python -m rpg.audit                          # print the page (Markdown)
    python -m rpg.audit --write docs/audit.md    # ...and write it

Each row of ``ROWS`` is one loss configuration and the objective its paper names; the page
holds [`rpg.testing.audit`][rpg.testing.audit]'s numbers for every row, and the answers they
give to the questions recent papers ask about KL estimators. A new loss is one more ``Row``.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import advantages as _advantages
from .correction import RolloutCorrection
from .kl import DIVERGENCES
from .losses import PolicyLoss, RPGLoss
from .presets import (
    CISPOLoss,
    ClipCovLoss,
    DAPOLoss,
    DPPOLoss,
    DrGRPOLoss,
    DROLoss,
    GMPOLoss,
    GPPOLoss,
    GRPOLoss,
    GSPOLoss,
    KLCovLoss,
    OnPolicyDistillationLoss,
    PrimeRLLoss,
    REINFORCEPlusPlusLoss,
    SAPOLoss,
    TOPRLoss,
    VESPOLoss,
)
from .testing import OBJECTIVES, SCENARIOS, Audit, audit

__all__ = ["Row", "ROWS", "BETA", "Seeded", "M2PO", "run", "table", "page", "main"]

BETA = 0.5  # β of every KL in the table: large, so that a KL term's bias is plain to see
EXACT = 1e-10  # below this a relative bias is rounding error


class Row(NamedTuple):
    """One audited loss: its label, a factory of the loss, the objective its paper names (a key of
    ``rpg.testing.OBJECTIVES``), a note, and ``audit()``'s ``beta`` / ``advantages`` where the KL lives
    outside the loss (in the reward)."""

    name: str
    make: Callable[[], Callable]
    objective: str
    notes: str = ""
    beta: float | None = None
    advantages: Callable | None = None


class Seeded:
    """A loss called with a fresh ``torch.Generator`` seeded ``seed`` at every call (a random selection
    rule, Clip-Cov's, then draws the same tokens on the same batch: the audit is deterministic)."""

    def __init__(self, loss: Callable, seed: int = 0) -> None:
        self.loss, self.seed = loss, seed

    def __call__(self, *args, **kwargs):
        return self.loss(*args, generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def __repr__(self) -> str:
        return f"{self.loss!r} with generator seed {self.seed}"


M2PO = RolloutCorrection(mode="truncate", lower=1.0, upper=1.0, m2_upper=0.04, count_rejected=False)
"""M2PO as AReaL runs it: the second-moment filter at the paper's τ = 0.04, weight 1, rejected tokens dropped."""


def _returns(estimator: str) -> Callable:
    """REINFORCE++ returns with the KL shaped into the reward (β = ``BETA``, γ = 1, no whitening)."""
    return functools.partial(_reinforce_pp, estimator=estimator)


def _reinforce_pp(rewards, mask, old_logp, ref_logp, *, estimator):
    return _advantages.reinforce_pp(
        rewards, mask, old_logp, ref_logp, beta=BETA, estimator=estimator, whiten_advantages=False
    )


ROWS: list[Row] = [
    *(
        Row(f"RPGLoss {d}, {style}", functools.partial(RPGLoss, d, style, BETA, None), d, "paper §3–§4")
        for d in DIVERGENCES
        for style in ("differentiable", "reinforce")
    ),
    Row("GRPOLoss, k3", lambda: GRPOLoss(BETA, None), "rkl", "k3 as a loss; GRPO names the reverse KL"),
    Row(
        "GRPOLoss, importance-weighted k3",
        lambda: GRPOLoss(BETA, None, importance_weighted_kl=True),
        "urkl",
        "w·k3 with w differentiable",
    ),
    Row("DrGRPOLoss", lambda: DrGRPOLoss(max_len=2, clip=None), "E[r]"),
    Row("DAPOLoss", lambda: DAPOLoss(clip=None), "E[r]"),
    Row(
        "REINFORCEPlusPlusLoss",
        lambda: REINFORCEPlusPlusLoss(clip=None),
        "E[r]",
        "the loss alone; its KL is in the reward",
    ),
    Row(
        "KL in reward, k1 returns",
        lambda: REINFORCEPlusPlusLoss(clip=None),
        "seq-urkl",
        "rpg.advantages.reinforce_pp(estimator='k1', γ = 1, no whitening)",
        BETA,
        _returns("k1"),
    ),
    Row(
        "KL in reward, k2 returns",
        lambda: REINFORCEPlusPlusLoss(clip=None),
        "seq-urkl",
        "rpg.advantages.reinforce_pp(estimator='k2', γ = 1, no whitening)",
        BETA,
        _returns("k2"),
    ),
    Row("GSPOLoss", lambda: GSPOLoss(clip=None), "E[r]", "sequence ratio"),
    Row("CISPOLoss", CISPOLoss, "E[r]", "default cap w ≤ 5"),
    Row("OnPolicyDistillationLoss", lambda: OnPolicyDistillationLoss(BETA), "urkl", "π_ref = the teacher"),
    Row("DPPOLoss", DPPOLoss, "E[r]", "default trust region δ = 0.15"),
    Row("SAPOLoss", SAPOLoss, "E[r]", "default gate τ = (1, 1.05); no clip to turn off"),
    Row("TOPRLoss", TOPRLoss, "E[r]", "w̄ = 1 for A > 0, min(w, 1) for A ≤ 0"),
    Row("GPPOLoss", GPPOLoss, "E[r]", "default ε = (0.2, 0.28), β₁ = β₂ = 1: the kept gradient is the family"),
    Row(
        "DROLoss",
        lambda: DROLoss(BETA),
        "E[r]",
        "its objective E_q[A·log π − (β/2)(log π − log μ)²] is no candidate; called without ref_logp",
    ),
    Row(
        "PrimeRLLoss",
        PrimeRLLoss,
        "E[r]",
        "default τ = 1e-3 (β = 2τ), δ = 0.2; penalty toward μ, no candidate; called without ref_logp",
    ),
    # Sequence ratios, selection rules and M2PO: paper defaults (their clips and kernels on). Clip-Cov and
    # KL-Cov select tokens by the statistics of the batch they are called on; here that batch is the
    # enumeration itself (each response once, unweighted), so K = max(⌊2e-4·N⌋, 1) = 1 token, and Clip-Cov
    # draws it with a generator seeded 0 at every call.
    Row("GMPOLoss", GMPOLoss, "E[r]", "default clip ε = 0.4 on log w, geometric mean per sequence"),
    Row("VESPOLoss", VESPOLoss, "E[r]", "default Gamma kernel k = (2, 3), λ = (3, 2) of W = Π_t w_t"),
    Row(
        "ClipCovLoss",
        lambda: Seeded(ClipCovLoss()),
        "E[r]",
        "defaults (ε = 0.2, band (1, 5)); 1 token of the enumerated batch dropped, generator seed 0",
    ),
    Row(
        "KLCovLoss",
        lambda: Seeded(KLCovLoss()),
        "E[r]",
        "defaults (coef 1); the enumerated batch's top-covariance token penalised",
    ),
    Row(
        "M2PO (RolloutCorrection)",
        lambda: PolicyLoss(correction=M2PO),
        "E[r]",
        "PolicyLoss() with RolloutCorrection(m2_upper=0.04), weight 1, count_rejected=False",
    ),
]


def run(rows: list[Row] | None = None) -> list[tuple[Row, Audit]]:
    """The audit of every row (default ``ROWS``)."""
    rows = ROWS if rows is None else rows
    return [(row, audit(row.make(), objective=row.objective, beta=row.beta, advantages=row.advantages)) for row in rows]


def _cell(x: float) -> str:
    return f"< {EXACT:.0e}" if x < EXACT else f"{x:#.2g}"


def _sequence_kl(a: Audit) -> str:
    if a.objective == "E[r]":
        return "— (no KL)"
    d = str(a.objective).removeprefix("seq-")
    where = "2 tokens, on-policy"
    whole, per_token = a.bias(f"seq-{d}", where), a.bias(d, where)
    if whole < EXACT:
        return "captured"
    if per_token < EXACT:
        return f"missed: per-token {d}, {_cell(whole)} from seq-{d}"
    return f"neither: {_cell(whole)} from seq-{d}"


HEAD = [
    "loss",
    "named objective",
    "on-policy, follows",
    "off-policy, 1 token",
    "off-policy, 2 tokens",
    "μ ≠ π_old, 1 token",
    "μ ≠ π_old, 2 tokens",
    "sequence-level KL term",
]


def table(results: list[tuple[Row, Audit]]) -> str:
    """One Markdown row per loss: the objective followed on-policy, the bias against the named
    objective off-policy and under μ with the loss's default correction, and the sequence KL term."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for row, a in results:
        cells = [
            row.name,
            row.objective,
            a.describe("on-policy"),
            _cell(a.bias(where="1 token, off-policy")),
            _cell(a.bias(where="2 tokens, off-policy")),
            _cell(a.bias(where="1 token, off-policy, μ ≠ π_old")),
            _cell(a.bias(where="2 tokens, μ ≠ π_old")),
            _sequence_kl(a),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gloss(keys: str) -> str:
    """A key of the candidate objectives with its meaning (as is for several or none)."""
    return f"{keys} ({OBJECTIVES[keys]})" if keys in OBJECTIVES else keys


def _yes(answer: bool) -> str:
    return "Yes." if answer else "No."


def _answers(results: list[tuple[Row, Audit]]) -> str:
    by = {row.name: a for row, a in results}
    k3, wk3 = by["GRPOLoss, k3"], by["GRPOLoss, importance-weighted k3"]
    rkl, k1, k2 = by["RPGLoss rkl, differentiable"], by["KL in reward, k1 returns"], by["KL in reward, k2 returns"]
    per_token_kl = [a for row, a in results if row.objective in DIVERGENCES and a.followed() == (row.objective,)]
    seq_gap = [a.bias(f"seq-{str(a.objective).removeprefix('u')}", "2 tokens, on-policy") for a in per_token_kl]
    off2 = [a.bias(where="2 tokens, off-policy") for _, a in results]
    mu2 = [a.bias(where="2 tokens, μ ≠ π_old") for _, a in results]
    off = "1 token, off-policy"
    off_closest = k3.closest(off)
    mu1 = [(row.name, a.bias(where="1 token, off-policy, μ ≠ π_old")) for row, a in results]
    mu1_biased = [name for name, b in mu1 if b >= EXACT]
    mu1_text = f"{len(mu1) - len(mu1_biased)} of {len(mu1)} rows" + (
        f" (not: {'; '.join(mu1_biased)})" if mu1_biased else ""
    )
    return f"""\
**Is k3 as a loss biased?** (Tang & Munos, arXiv 2506.09477; Liu et al., arXiv 2510.01555;
"A Comedy of Estimators", arXiv 2512.21852.) {_yes(k3.bias("rkl", off) >= EXACT)} GRPO's penalty β·k3(π_θ → π_ref), used as a loss,
follows on-policy {_gloss(k3.describe("on-policy"))}; its bias against the reverse KL it estimates is
{_cell(k3.bias("rkl", "1 token, on-policy"))} on one token. Off-policy it follows none of the
candidates: the closest, {off_closest}, is {_cell(k3.bias(off_closest, off))} off, the reverse KL
{_cell(k3.bias("rkl", off))}. Weighted by the differentiable ratio w
(`GRPOLoss(importance_weighted_kl=True)`) it follows {wk3.describe("off-policy")} off-policy
(bias {_cell(wk3.bias(where="off-policy"))}).

**Does a per-token KL loss miss the sequence KL?** (arXiv 2601.10201.) {_yes(min(seq_gap) >= EXACT)} On
two-token responses, on-policy, each of the {len(per_token_kl)} rows that follows its per-token KL exactly
misses the whole-response KL by {_cell(min(seq_gap))} to {_cell(max(seq_gap))}
(relative); e.g. `RPGLoss("rkl")`: {_cell(rkl.bias("rkl", "2 tokens, on-policy"))} from the per-token
reverse KL, {_cell(rkl.bias("seq-rkl", "2 tokens, on-policy"))} from the sequence one. The k1 KL folded
into the reward with returns-to-go follows {k1.describe("on-policy")} on-policy (bias
{_cell(k1.bias(where="2 tokens, on-policy"))} against the whole-response KL), k2 in the reward does
not ({_cell(k2.bias(where="2 tokens, on-policy"))}). Off-policy the shaped reward holds
log π_old − log π_ref, which does not move with θ: {_cell(k1.bias(where=off))} off on one token.

**Is a token-level correction enough?** {_yes(min(off2) < EXACT and min(mu2) < EXACT)} Off-policy over two-token responses, with per-token ratios
only, every row is biased ({_cell(min(off2))} to {_cell(max(off2))}); with a behaviour policy μ and
the default correction (token-level ρ truncated at 2), {_cell(min(mu2))} to {_cell(max(mu2))}, while on
one token the same correction is exact for {mu1_text}. For an outcome reward only the product of the ratios over the response is
exact (`RolloutCorrection(level="sequence")`, see [Training–inference mismatch](mismatch.md))."""


def page(results: list[tuple[Row, Audit]] | None = None) -> str:
    """The whole Markdown page docs/audit.md."""
    results = run() if results is None else results
    legend = "\n".join(f"| `{k}` | {v} |" for k, v in OBJECTIVES.items())
    scenarios = "\n".join(
        f"| {s.name} | {s.tokens} | {'yes' if s.off_policy else 'no'} | {'yes' if s.normalized else 'no'} | "
        f"{'yes' if s.behavior else 'no'} |"
        for s in SCENARIOS
    )
    configs = "\n".join(f"| {row.name} | `{a.loss}` | {a.beta:g} | {row.notes} |" for row, a in results)
    return f"""\
# Every loss, audited

<!-- Generated by `python -m rpg.audit --write docs/audit.md`: edit rpg/audit.py, not this file. -->

Which objective does each loss's gradient follow? Every number below is computed by exact
enumeration with [`rpg.testing.audit`](testing.md): the relative bias

$$\\frac{{\\lVert \\mathbb{{E}}[\\nabla \\ell] + \\nabla J \\rVert}}{{\\lVert \\nabla J \\rVert}}$$

of the loss's exact expected gradient against the gradient of an objective J, in float64, the
largest over three random problems per scenario. Below {EXACT:.0e} it is rounding error: the loss
follows J exactly. Every KL is taken with β = {BETA:g} and π_ref ≠ π_old; clips are off
(`clip=None`) unless the configuration says otherwise, so that the numbers measure the estimator,
not the clip (see [Testing your own loss](testing.md)).

## The table

{table(results)}

* **named objective**: the objective the loss's paper names (keys below).
* **on-policy, follows**: the candidates the gradient follows exactly on every on-policy scenario
  (one token, normalized and unnormalized policies; two tokens), or the closest.
* **off-policy**: bias against the named objective with π_old ≠ π_θ, on one token and on two-token
  responses (per-token ratios only); normalized policies, as a language model's.
* **μ ≠ π_old**: tokens sampled by a behaviour policy μ (π_old's logits plus N(0, 0.2²) noise), the
  loss called with `behavior_logp` and its default correction (token-level ρ truncated at 2).
* **sequence-level KL term**: on two-token responses, on-policy, whether the gradient includes
  the autoregressive term of the KL of whole responses (how the KL of a later token moves with the
  earlier ones).

## Candidate objectives

| key | objective J |
|---|---|
{legend}

On one token a whole-response KL is the per-token one; on two tokens every step is normalized,
so `seq-ufkl` = `seq-fkl` and `seq-urkl` = `seq-rkl` there.

## Scenarios

| scenario | tokens | off-policy | normalized | behaviour μ |
|---|---|---|---|---|
{scenarios}

## Configurations audited

| row | configuration | β of the KL candidates | notes |
|---|---|---|---|
{configs}

## What the numbers answer

{_answers(results)}

## Peers' own code

verl's registered policy losses with the KL loss its actor adds (`use_kl_loss`), and TRL's
`GRPOTrainer._compute_loss` under several `GRPOConfig` settings, each driven through a thin
wrapper with rpg's calling convention and audited the same way (`python examples/audit_peers.py
--write`, which needs verl and trl installed). The wrappers take no `behavior_logp`, so their μ
columns are uncorrected:

--8<-- "docs/_generated/audit_peers.md"

Audit your own loss in one call: see [Testing your own loss](testing.md).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rpg.audit", description="Every loss, audited (Markdown).")
    parser.add_argument("--write", metavar="PATH", help="write the page to PATH (e.g. docs/audit.md)")
    args = parser.parse_args(argv)
    text = page()
    if args.write:
        pathlib.Path(args.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
