r"""verl's and TRL's own policy losses and KL losses, audited by exact enumeration (``rpg.testing.audit``).

    python examples/audit_peers.py            # print the tables (Markdown; needs verl and trl installed)
    python examples/audit_peers.py --write    # ...and store it in docs/_generated/audit_peers.md

Each row drives verl's installed code through a thin wrapper with rpg's calling convention: the
registered policy loss (``verl.trainer.ppo.core_algos.get_policy_loss_fn``) on the batch the oracle
builds, token-mean, plus — for the KL rows — the KL loss verl's actor adds when ``use_kl_loss`` is
on: ``kl_loss_coef · agg_loss(kl_penalty(log_prob, ref_log_prob, kl_loss_type))``; and TRL's
``GRPOTrainer._compute_loss`` on a stub trainer (see ``trl_loss``). The wrappers return the
peer's scalar loss, so the oracle calls it once per response (``reduction="mean"``). The
PPO clip is set out of reach (ε = 1e9) so that the numbers measure the estimators, as on the page's
main table.
"""

from __future__ import annotations

import functools
import pathlib
import sys

import torch

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


class _OneProcess:
    """TRL's accelerator for one process: gathers and reductions are identities."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x.reshape(-1) if x.dim() == 0 else x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


@functools.cache
def _grpo_config(length: int, **settings):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir="unused", report_to="none", use_cpu=True, max_completion_length=length, **dict(settings)
    )


def trl_loss(**settings):
    """TRL's ``GRPOTrainer._compute_loss`` under a ``GRPOConfig(**settings)``, as an rpg-style callable.

    ``self`` is a stub holding what ``GRPOTrainer.__init__`` derives from the config; the model's
    per-token log-probs are the oracle's ``logp``. Eval mode (no gradient-accumulation scaling);
    ``max_completion_length`` is the batch's length, so Dr. GRPO's constant is the response length."""
    import types
    from collections import defaultdict

    from trl import GRPOTrainer

    def loss(logp, old_logp, advantages, mask, ref_logp=None):
        args = _grpo_config(logp.shape[1], **settings)
        s = types.SimpleNamespace(args=args, loss_type=args.loss_type, beta=args.beta)
        s.epsilon_low = args.epsilon
        s.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
        s.importance_sampling_level = args.importance_sampling_level
        s.top_entropy_quantile, s.off_policy_mask_threshold = args.top_entropy_quantile, args.off_policy_mask_threshold
        s.use_vllm, s.vllm_importance_sampling_correction = args.use_vllm, args.vllm_importance_sampling_correction
        s.max_completion_length = args.max_completion_length
        s.entropy_coef, s.use_adaptive_entropy = args.entropy_coef, args.use_adaptive_entropy
        s._entropy_bonus_enabled = False
        s._last_world_entropy, s._entropy_window_stats = float("inf"), None
        s.aux_loss_enabled, s.router_aux_loss_coef = False, 0.0
        s.model = types.SimpleNamespace(training=False)
        s.current_gradient_accumulation_steps = 1
        s.accelerator = _OneProcess()
        s._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        s.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, s)
        s.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
        s.get_gamma_weights = GRPOTrainer.get_gamma_weights
        s._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
        m = mask.long()
        inputs = {
            "prompt_ids": torch.zeros(logp.shape[0], 1, dtype=torch.long),
            "prompt_mask": torch.ones(logp.shape[0], 1, dtype=torch.long),
            "completion_ids": torch.zeros_like(m),
            "completion_mask": m,
            "advantages": advantages,
            "num_items_in_batch": m.sum().to(logp.dtype),
            "old_per_token_logps": old_logp,
        }
        if args.beta != 0:
            inputs["ref_per_token_logps"] = ref_logp
        return GRPOTrainer._compute_loss(s, None, inputs)

    shown = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    loss.__qualname__ = f"TRL GRPOTrainer._compute_loss({shown})"
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

TRL_ROWS = [
    page.Row("TRL grpo", lambda: trl_loss(loss_type="grpo", epsilon=NO_CLIP), "E[r]", "clip out of reach"),
    page.Row("TRL dapo", lambda: trl_loss(loss_type="dapo", epsilon=NO_CLIP), "E[r]", "clip out of reach"),
    page.Row("TRL dr_grpo", lambda: trl_loss(loss_type="dr_grpo", epsilon=NO_CLIP), "E[r]", "clip out of reach"),
    page.Row("TRL cispo", lambda: trl_loss(loss_type="cispo"), "E[r]", "default epsilon_high (None: epsilon = 0.2)"),
    page.Row(
        "TRL cispo, epsilon_high=5.0",
        lambda: trl_loss(loss_type="cispo", epsilon_high=5.0),
        "E[r]",
        "the value TRL's docs recommend for cispo",
    ),
    page.Row("TRL sapo", lambda: trl_loss(loss_type="sapo"), "E[r]", "TRL's default temperatures"),
    page.Row(
        "TRL grpo, sequence level (GSPO)",
        lambda: trl_loss(loss_type="grpo", epsilon=NO_CLIP, importance_sampling_level="sequence"),
        "E[r]",
        "clip out of reach",
    ),
    page.Row(
        "TRL grpo, β > 0 (default use_bias_correction_kl=True)",
        lambda: trl_loss(loss_type="grpo", epsilon=NO_CLIP, beta=page.BETA),
        "rkl",
        f"beta={page.BETA:g}; k3 times the ratio",
    ),
    page.Row(
        "TRL grpo, β > 0, use_bias_correction_kl=False",
        lambda: trl_loss(loss_type="grpo", epsilon=NO_CLIP, beta=page.BETA, use_bias_correction_kl=False),
        "rkl",
        f"beta={page.BETA:g}; k3 unweighted",
    ),
]


def markdown() -> str:
    """The verl table, then the TRL one (each where its package is installed)."""
    parts = []
    for package, rows in (("verl", ROWS), ("trl", TRL_ROWS)):
        try:
            version = __import__(package).__version__
        except ImportError:
            continue
        parts.append(f"Measured on {package} {version}'s installed code.\n\n{page.table(page.run(rows))}\n")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = markdown()
    if not text:
        print("neither verl nor trl is installed: pip install 'rpg-losses[verl,trl]' to audit their losses")
        return 0
    if "--write" in argv:
        OUT.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])
