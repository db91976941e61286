r"""Which rollout correction is exact for which objective, and how biased the others are.

    python examples/rollout_correction_bias.py            # print the tables (Markdown)
    python examples/rollout_correction_bias.py --write    # ...and store them in docs/_generated/

The tokens are sampled by a rollout engine μ that differs from the trainer's π_old. Each number is
an exact expectation over every response (``rpg.testing``, float64, no sampling): the relative bias

    ‖E_μ[∇ℓ′] + ∇J‖ / ‖∇J‖

of the corrected loss ℓ′, 0 when the correction is exact for the objective J. Values below 1e-10
are rounding error (exact); a bound that never binds on a problem leaves its correction exact there.

* Exactness table: the one-token oracle (every RPG loss, β = 0.5, θ ≠ θ_old, π_ref ≠ π_old ≠ μ,
  normalized and unnormalized policies) against the two-token oracle with an outcome reward
  (θ = θ_old, β = 0), μ = π_old with logit noise of σ = 0.5.
* Bias table: the two-token oracle with an outcome reward under mismatches an inference engine
  produces: bf16-rounded logits, Gaussian logit noise of three sizes (a different kernel or
  precision), and top-p sampling, which gives μ zero mass on tokens π_old can emit (support
  mismatch: no weight can correct for responses μ never samples).

Every cell is the mean over 12 random problems (K = 3, 4, 5 tokens per step, four seeds each).
"""

from __future__ import annotations

import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

import rpg
from rpg import testing as T

RC = rpg.RolloutCorrection
OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "_generated"
PROBLEMS = [(k, seed) for k in (3, 4, 5) for seed in range(4)]
BETA = 0.5
EXACT = 1e-10  # below this a relative bias is rounding error


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# --- the engines ------------------------------------------------------------------------------


def _noise(logits: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    return logits + sigma * torch.randn(logits.shape, generator=gen, dtype=logits.dtype)


def _top_p_rows(logits: torch.Tensor, p: float) -> torch.Tensor:
    """log-probs of top-p sampling from softmax(logits) over the last dim: the smallest set of most
    likely tokens with mass ≥ p, renormalised; -inf elsewhere."""
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < p  # the mass before a token is still short of p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.log_softmax(logits.masked_fill(~keep, -math.inf), -1)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Two-token logits ``[K + K²]`` → the engine's top-p logits (first step and every prefix)."""
    k = math.isqrt(4 * logits.numel() + 1) // 2  # K + K² entries
    return torch.cat([_top_p_rows(logits[:k], p), _top_p_rows(logits[k:].view(k, k), p).reshape(-1)])


ENGINES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "bf16 logits": lambda logits, seed: logits.to(torch.bfloat16).to(logits.dtype),
    "noise σ = 0.05": lambda logits, seed: _noise(logits, 0.05, seed),
    "noise σ = 0.2": lambda logits, seed: _noise(logits, 0.2, seed),
    "noise σ = 0.5": lambda logits, seed: _noise(logits, 0.5, seed),
    "top-p 0.95": lambda logits, seed: top_p(logits, 0.95),
    "top-p 0.8": lambda logits, seed: top_p(logits, 0.8),
}


def mismatch(problem: T.Problem, behavior_logits: torch.Tensor) -> tuple[float, float]:
    """(KL(μ ‖ π_old) per token, averaged over the two steps under μ;
    π_old's mass on the responses μ never samples)."""
    old = T.sequence_token_logp(problem.logits)
    mu = T.sequence_token_logp(behavior_logits)
    mu_seq = mu.sum(-1).exp()
    seen = mu_seq > 0
    kl = (mu_seq[seen, None] * (mu[seen] - old[seen])).sum() / 2
    return float(kl), float(old.sum(-1).exp()[~seen].sum())


# --- the corrections --------------------------------------------------------------------------


def prefix_product(old_logp: torch.Tensor, behavior_logp: torch.Tensor) -> torch.Tensor:
    """Per-decision weight Π_{s≤t} ρ_s (``[B, T]``), passed as the loss's ``weights=``."""
    return (old_logp - behavior_logp).cumsum(-1).exp()


class Correction(NamedTuple):
    label: str
    correction: RC | None  # the loss's ``correction=`` (used when the call passes behavior_logp)
    weights: Callable | None = None  # a weight the correction does not offer, via ``weights=``

    @property
    def behavior(self) -> bool:
        return self.correction is not None


CORRECTIONS = [
    Correction("none (μ taken for π_old)", None),
    Correction("token ρ_t, exact", RC(upper=None)),
    Correction("token, truncate ≤ 2 (default)", RC()),
    Correction("token, mask outside [0.5, 2]", RC(mode="mask", lower=0.5, upper=2.0)),
    Correction("prefix product Π_{s≤t} ρ_s", None, prefix_product),
    Correction("sequence Π_t ρ_t, exact", RC(level="sequence", upper=None)),
    Correction("sequence, truncate ≤ 2", RC(level="sequence")),
    Correction("sequence, mask outside [0.5, 2]", RC(level="sequence", mode="mask", lower=0.5, upper=2.0)),
    Correction("geometric-mean filter [0.5, 2] + token truncate ≤ 2", RC(geo_lower=0.5, geo_upper=2.0)),
    Correction(
        "geometric-mean filter [0.5, 2] + sequence exact",
        RC(level="sequence", upper=None, geo_lower=0.5, geo_upper=2.0),
    ),
    Correction("worst-token filter [0.5, 2] + token truncate ≤ 2", RC(token_lower=0.5, token_upper=2.0)),
    Correction(
        "worst-token filter [0.5, 2] + sequence exact",
        RC(level="sequence", upper=None, token_lower=0.5, token_upper=2.0),
    ),
]


def policy_gradient(correction: RC | None = None):
    """−w·A per token (β = 0; the REINFORCE-style RPG loss, no clip): the outcome-reward policy gradient."""
    return rpg.RPGLoss("rkl", style="reinforce", beta=0.0, clip=None, correction=correction)


# --- the oracle on μ's support ----------------------------------------------------------------


def support_bias(
    loss_fn, problem: T.Problem, behavior_logits: torch.Tensor, *, weights=None, behavior: bool = True
) -> float:
    """:func:`rpg.testing.correction_bias` summed over the responses μ can sample only.

    A response with μ(y) = 0 is never in a batch; including it in the oracle's sum would form
    0·∞ with an untruncated weight. Equal to ``correction_bias`` where μ has full support."""
    want = -T.sequence_objective_gradient(problem.logits, problem.ref_logits, problem.rewards, 0.0)
    theta = problem.logits.detach().clone().requires_grad_(True)
    old = T.sequence_token_logp(problem.logits).detach()
    mu = T.sequence_token_logp(behavior_logits).detach()
    seen = mu.sum(-1) > -math.inf
    logp, old, mu = T.sequence_token_logp(theta)[seen], old[seen], mu[seen]
    kwargs = {} if weights is None else {"weights": weights(old, mu)}
    if behavior:
        kwargs["behavior_logp"] = mu
    out = loss_fn(logp, old, problem.rewards[seen], torch.ones_like(old, dtype=torch.bool), **kwargs)
    (got,) = torch.autograd.grad((mu.sum(-1).exp()[:, None] * out.per_token).sum(), theta)
    return float((got - want).norm() / want.norm())


def bias(c: Correction, problem: T.Problem, behavior_logits: torch.Tensor) -> float:
    loss_fn = policy_gradient(c.correction)
    if torch.isfinite(behavior_logits).all():
        return T.correction_bias(loss_fn, problem, behavior_logits, weights=c.weights, behavior=c.behavior)
    return support_bias(loss_fn, problem, behavior_logits, weights=c.weights, behavior=c.behavior)


# --- the tables -------------------------------------------------------------------------------


def _mean(xs):
    return sum(xs) / len(xs)


def bias_table() -> dict:
    """{"mismatch": {engine: (kl, missing mass)}, "bias": {label: {engine: mean bias}}, "max": ...}."""
    problems = [T.random_sequence_problem(k=k, seed=seed) for k, seed in PROBLEMS]
    cells = {c.label: {e: [] for e in ENGINES} for c in CORRECTIONS}
    stats = {e: [] for e in ENGINES}
    for e, engine in ENGINES.items():
        for i, problem in enumerate(problems):
            mu = engine(problem.logits, i)
            stats[e].append(mismatch(problem, mu))
            for c in CORRECTIONS:
                cells[c.label][e].append(bias(c, problem, mu))
    return {
        "mismatch": {e: (_mean([s[0] for s in v]), _mean([s[1] for s in v])) for e, v in stats.items()},
        "bias": {label: {e: _mean(v) for e, v in row.items()} for label, row in cells.items()},
        "max": {label: {e: max(v) for e, v in row.items()} for label, row in cells.items()},
        "min": {label: {e: min(v) for e, v in row.items()} for label, row in cells.items()},
    }


class _Weighted:
    """A loss called with ``weights=w(old_logp, behavior_logp)`` instead of ``behavior_logp``."""

    def __init__(self, loss_fn, weights):
        self.loss_fn, self.weights = loss_fn, weights

    def __call__(self, logp, old_logp, advantages, mask, ref_logp=None, behavior_logp=None):
        kwargs = {} if self.weights is None else {"weights": self.weights(old_logp, behavior_logp)}
        return self.loss_fn(logp, old_logp, advantages, mask, ref_logp=ref_logp, **kwargs)


WEIGHTS = [  # (label, correction, weights) of the exactness table
    ("none (μ taken for π_old)", None, None),
    ("token ρ_t", RC(upper=None), None),
    ("prefix product Π_{s≤t} ρ_s", None, prefix_product),
    ("sequence product Π_t ρ_t", RC(level="sequence", upper=None), None),
]
TOKEN_COL = "one token: every RPG loss, β = 0.5"
SEQ_COL = "two tokens: outcome reward"


def exactness_table() -> dict:
    """{label: {column: [relative errors]}}: the one-token oracle (8 RPG losses × normalized and
    unnormalized policies × the problems) and the two-token oracle with an outcome reward."""
    out = {label: {TOKEN_COL: [], SEQ_COL: []} for label, _, _ in WEIGHTS}
    for i, (k, seed) in enumerate(PROBLEMS):
        p = T.random_problem(k=k + 3, seed=seed)
        mu = _noise(p.old_logits, 0.5, i)
        for div in rpg.DIVERGENCES:
            for normalized in (True, False):
                want = -T.objective_gradient(div, p.logits, p.ref_logits, p.rewards, BETA, normalized=normalized)
                for style in rpg.STYLES:
                    for label, corr, weights in WEIGHTS:
                        fn = rpg.RPGLoss(div, style=style, beta=BETA, clip=None, correction=corr)
                        fn = fn if corr is not None else _Weighted(fn, weights)
                        got = T.expected_gradient(
                            fn,
                            p.logits,
                            p.old_logits,
                            p.rewards,
                            ref_logits=p.ref_logits,
                            behavior_logits=mu,
                            normalized=normalized,
                        )
                        out[label][TOKEN_COL].append(float((got - want).norm() / want.norm()))
        sp = T.random_sequence_problem(k=k, seed=seed)
        smu = _noise(sp.logits, 0.5, i)
        for label, corr, weights in WEIGHTS:
            out[label][SEQ_COL].append(
                T.correction_bias(policy_gradient(corr), sp, smu, weights=weights, behavior=corr is not None)
            )
    return out


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def exactness_markdown(table: dict) -> str:
    n = len(next(iter(table.values()))[TOKEN_COL])
    lines = [
        _row(["weight", f"{TOKEN_COL} ({n} cases)", f"{SEQ_COL} ({len(PROBLEMS)} problems)"]),
        _row(["---"] * 3),
    ]
    for label, cols in table.items():
        lines.append(_row([label] + [f"{_fmt(min(cols[c]))} – {_fmt(max(cols[c]))}" for c in (TOKEN_COL, SEQ_COL)]))
    return "\n".join(lines) + "\n"


COMPACT_ENGINES = ["noise σ = 0.2", "noise σ = 0.5", "top-p 0.8"]
COMPACT_ROWS = [
    "none (μ taken for π_old)",
    "token ρ_t, exact",
    "token, truncate ≤ 2 (default)",
    "prefix product Π_{s≤t} ρ_s",
    "sequence Π_t ρ_t, exact",
    "sequence, truncate ≤ 2",
]


def bias_markdown(table: dict, engines=None, rows=None) -> str:
    engines = list(ENGINES) if engines is None else engines
    rows = list(table["bias"]) if rows is None else rows
    lines = [_row(["correction", *engines]), _row(["---"] * (1 + len(engines)))]
    lines.append(_row(["*mismatch KL(μ ‖ π_old) per token*"] + [_fmt(table["mismatch"][e][0]) for e in engines]))
    missing = [_fmt(table["mismatch"][e][1]) for e in engines]
    lines.append(_row(["*π_old's mass on responses μ never samples*", *missing]))
    for label in rows:
        lines.append(_row([label] + [_fmt(table["bias"][label][e]) for e in engines]))
    return "\n".join(lines) + "\n"


def tables() -> dict[str, str]:
    """The Markdown files of docs/_generated/, by name."""
    b = bias_table()
    return {
        "mismatch_exactness.md": exactness_markdown(exactness_table()),
        "mismatch_bias.md": bias_markdown(b),
        "mismatch_bias_compact.md": bias_markdown(b, COMPACT_ENGINES, COMPACT_ROWS),
    }


def main(write: bool = False) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    out = tables()
    for name, text in out.items():
        print(f"## {name}\n\n{text}")
        if write:
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / name).write_text(text)
    print(f"({time.perf_counter() - start:.1f} s{', written to docs/_generated/' if write else ''})")


if __name__ == "__main__":
    main(write="--write" in sys.argv[1:])
