"""rpg's ``rollout_corr/*`` metrics against verl's own, computed by verl 0.9 on the same log-probs.

Every ``rollout_corr/<name>`` rpg reports that verl also reports for the matching setting (the table in
rpg.integrations.verl) must be verl's value: with and without an empty row, ``count_rejected`` both ways,
token and sequence level, truncate and mask modes, through ``correction_metrics`` and through a loss call
(with and without ``batch_num_tokens``), in float64.

verl divides its masked means by (count + 1e-8) and its ESS by (mean + 1e-8); to compare at 1e-10 the test
runs verl with ``masked_mean`` without that guard and undoes the ESS guard in closed form, and checks the
unpatched verl values at the size of the guard separately.
"""

import math

import pytest
import torch

pytest.importorskip("verl", reason="the verl extra is not installed")

import verl.utils.torch_functional as verl_F
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

import rpg
from rpg.correction import correction_metrics

F64 = torch.float64
B, T = 12, 7
RS_KEYS = {"rollout_corr/rollout_rs_masked_fraction", "rollout_corr/rollout_rs_seq_masked_fraction"}

# fractions verl counts in float32 over rows (`(...).float().mean()`): compared as float32(rpg's float64 value)
FLOAT32_COUNTS = {"rollout_corr/rollout_rs_seq_masked_fraction"}
SEQ_FLOAT32_COUNTS = {"rollout_corr/rollout_is_ratio_fraction_high", "rollout_corr/rollout_is_ratio_fraction_low"}

SETTINGS = {  # verl (rollout_is, is threshold, rollout_rs, rs threshold) -> rpg correction (without count_rejected)
    "token_tis": (("token", 2.0, None, None), dict(level="token", upper=2.0)),
    "seq_tis": (("sequence", 2.0, None, None), dict(level="sequence", upper=2.0)),
    "token_tis_1.2": (("token", 1.2, None, None), dict(level="token", upper=1.2)),
    "token_icepop": (("token", "0.5_1.8", None, None), dict(mode="mask", lower=0.5, upper=1.8)),
    "seq_icepop": (("sequence", "0.3_3.0", None, None), dict(level="sequence", mode="mask", lower=0.3, upper=3.0)),
    "token_tis_geo_rs": (
        ("token", 2.0, "seq_mean_k1", "0.8_1.1"),
        dict(upper=2.0, geo_lower=1 / 1.1, geo_upper=1 / 0.8),
    ),
    "seq_tis_worst_token_rs": (
        ("sequence", 3.0, "seq_max_k2", 0.18),
        # seq_max_k2 with U = 0.18 keeps |log ρ| <= sqrt(2U) = 0.6 at every token (rpg.integrations.verl's table)
        dict(level="sequence", upper=3.0, token_lower=math.exp(-0.6), token_upper=math.exp(0.6)),
    ),
}


def _logps(seed, empty_row):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2 - 2.5  # log-probs stay < 0 after the noise
    beh = old - 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    mask[1, 0] = False  # an interior masked token
    if empty_row:
        mask[2] = False
    return old, beh, mask


def _exact_masked_mean(values, mask, axis=None):
    """verl's masked_mean without its + 1e-8 (0 on an empty row, as verl's gives there)."""
    count = mask.sum(axis=axis)
    return verl_F.masked_sum(values, mask, axis) / torch.where(count > 0, count, torch.ones_like(count))


def _verl(old, beh, mask, setting, exact):
    is_level, is_thr, rs, rs_thr = setting
    with pytest.MonkeyPatch.context() as mp:
        if exact:
            mp.setattr(verl_F, "masked_mean", _exact_masked_mean)
        _, _, m = compute_rollout_correction_and_rejection_mask(
            old,
            beh,
            mask.to(F64),
            rollout_is=is_level,
            rollout_is_threshold=is_thr,
            rollout_rs=rs,
            rollout_rs_threshold=rs_thr,
        )
    return m


def _ess_guard(old, beh, mask, correction):
    """((m + 1e-8)/m)², m = verl's mean of its ESS weights: verl's ESS is rpg's times this."""
    c = correction
    log_rho = torch.where(mask, old - beh, 0.0)
    if c.level == "sequence":
        log_rho = log_rho.sum(-1, keepdim=True).expand_as(log_rho)
    raw = log_rho.clamp(-20, 20).exp()
    if c.mode == "truncate":
        w = raw.clamp(max=c.upper)
    else:
        w = torch.where((raw >= c.lower) & (raw <= c.upper), raw, 0.0).clamp(max=c.upper)
    m = w[mask].mean().item()
    return ((m + 1e-8) / m) ** 2


def _cases():
    for name in SETTINGS:
        for empty_row in (False, True):
            for count_rejected in (True, False):
                yield pytest.param(
                    name, empty_row, count_rejected, id=f"{name}-empty{int(empty_row)}-cr{int(count_rejected)}"
                )


@pytest.mark.parametrize("name,empty_row,count_rejected", list(_cases()))
def test_rollout_corr_metrics_are_verls(name, empty_row, count_rejected):
    setting, kwargs = SETTINGS[name]
    c = rpg.RolloutCorrection(**kwargs, count_rejected=count_rejected)
    old, beh, mask = _logps(sum(map(ord, name)), empty_row)
    want = _verl(old, beh, mask, setting, exact=True)
    got = {k: v.item() for k, v in correction_metrics(old, beh, mask, c).items()}
    shared = sorted(set(got) & set(want))
    only_rpg = set(got) - set(want)
    assert only_rpg <= (RS_KEYS if setting[2] is None else set()), only_rpg
    assert len(shared) >= 12, shared
    assert ("rollout_corr/rollout_is_oob_ratio" in got) == ("rollout_corr/rollout_is_oob_ratio" in want)
    guard = _ess_guard(old, beh, mask, c)
    for k in shared:
        if (k in FLOAT32_COUNTS or (c.level == "sequence" and k in SEQ_FLOAT32_COUNTS)) and want[
            k
        ] != 0:  # verl's `.float().mean()` of 0/1 flags: float32(count / rows)
            assert torch.tensor(got[k], dtype=torch.float32).item() == want[k], (k, got[k], want[k])
            continue
        expect = want[k] / guard if k == "rollout_corr/rollout_is_eff_sample_size" else want[k]
        assert got[k] == pytest.approx(expect, rel=1e-10, abs=1e-10), (k, got[k], expect)
    # the bounds bind on some tokens and not on all, so the fractions are checked as values, not as 0
    assert (
        0 < got["rollout_corr/rollout_is_ratio_fraction_high"] + got["rollout_corr/rollout_is_ratio_fraction_low"] < 1
    )
    if setting[2] is not None:
        assert 0 < got["rollout_corr/rollout_rs_masked_fraction"] < 1
    # verl as shipped (with its 1e-8 guards) agrees to the size of the guard
    plain = _verl(old, beh, mask, setting, exact=False)
    for k in shared:
        assert got[k] == pytest.approx(plain[k], rel=1e-7, abs=1e-9), k

    # through a loss call: the same values, with or without batch_num_tokens, whatever the loss's mask
    logp = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    adv = torch.randn(B, generator=torch.Generator().manual_seed(2), dtype=F64)
    fn = rpg.GRPOLoss(beta=0.0, correction=c)
    n_keep = int(c.keep(old, beh, mask).sum())
    for bnt in (None, n_keep, 10 * n_keep):
        m = fn(logp, old, adv, mask, behavior_logp=beh, batch_num_tokens=bnt).metrics
        for k in got:
            assert m[k] == pytest.approx(got[k], rel=1e-12, abs=1e-12), (bnt, k)
