r"""verl's own policy losses and KL losses, audited by exact enumeration (``rpg.testing.audit``).

    python examples/audit_peers.py            # print the table (Markdown; needs verl installed)
    python examples/audit_peers.py --write    # ...and store it in docs/_generated/audit_peers.md

Each row drives verl's installed code through a thin wrapper with rpg's calling convention: the
registered policy loss (``verl.trainer.ppo.core_algos.get_policy_loss_fn``) on the batch the oracle
builds, token-mean, plus — for the KL rows — the KL loss verl's actor adds when ``use_kl_loss`` is
on: ``kl_loss_coef · agg_loss(kl_penalty(log_prob, ref_log_prob, kl_loss_type))``. The wrapper
returns verl's scalar loss, so the oracle calls it once per response (``reduction="mean"``). The
PPO clip is set out of reach (ε = 1e9) so that the numbers measure the estimators, as on the page's
main table.
"""

from __future__ import annotations

import pathlib
import sys

from rpg import audit as page

OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "_generated" / "audit_peers.md"
NO_CLIP = 1e9


class _Config:
    """The fields of verl's ``ActorConfig`` that its policy losses read (clip off, one data-parallel rank)."""

    clip_ratio = clip_ratio_low = clip_ratio_high = clip_ratio_c = NO_CLIP
    global_batch_info: dict = {}  # noqa: RUF012 (read only)

    def get(self, key, default=None):
        return getattr(self, key, default)


def verl_loss(policy_loss: str, kl_loss_type: str | None = None, beta: float = page.BETA):
    """verl's registered ``policy_loss`` (+ ``beta`` × its KL loss of ``kl_loss_type``) as an rpg-style callable."""
    from verl.trainer.ppo import core_algos

    fn = core_algos.get_policy_loss_fn(policy_loss)
    config = _Config()

    def loss(logp, old_logp, advantages, mask, ref_logp=None):
        adv = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
        m = mask.to(logp.dtype)
        pg = fn(
            old_log_prob=old_logp,
            log_prob=logp,
            advantages=adv,
            response_mask=m,
            loss_agg_mode="token-mean",
            config=config,
        )[0]
        if kl_loss_type is None:
            return pg
        kld = core_algos.kl_penalty(logprob=logp, ref_logprob=ref_logp, kl_penalty=kl_loss_type)
        return pg + beta * core_algos.agg_loss(loss_mat=kld, loss_mask=m, loss_agg_mode="token-mean")

    loss.__qualname__ = f"verl {policy_loss}" + (f" + kl_loss {kl_loss_type}" if kl_loss_type else "")
    return loss


ROWS = [
    page.Row("verl vanilla (PPO)", lambda: verl_loss("vanilla"), "E[r]", "clip out of reach"),
    page.Row("verl gpg", lambda: verl_loss("gpg"), "E[r]", "−A·log π, no ratio"),
    *(
        page.Row(
            f"verl vanilla + kl_loss {kl}",
            lambda kl=kl: verl_loss("vanilla", kl),
            "rkl",
            f"kl_loss_type={kl!r}, kl_loss_coef={page.BETA:g}",
            page.BETA,
        )
        for kl in ("k1", "k2", "low_var_kl", "k3+")
    ),
]


def markdown() -> str:
    import verl

    results = page.run(ROWS)
    return (
        f"Measured on verl {verl.__version__}'s installed code. The wrappers take no `behavior_logp`: "
        f"the μ columns are uncorrected.\n\n{page.table(results)}\n"
    )


def main(argv: list[str]) -> int:
    try:
        import verl  # noqa: F401
    except ImportError:
        print("verl is not installed: pip install 'rpg-losses[verl]' to audit its losses")
        return 0
    text = markdown()
    if "--write" in argv:
        OUT.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])
