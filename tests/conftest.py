import pytest
import torch

import rpg

F64 = torch.float64


def shift_to_logprobs(*tensors):
    """The tensors shifted by one common constant so that every value is <= 0: valid log-probabilities
    (rpg refuses values > 0, i.e. logits or probabilities) with every ratio between them unchanged."""
    top = max([0.0] + [float(x.detach().max()) for x in tensors if x is not None and x.numel()])
    return tuple(None if x is None else x - top for x in tensors)


def make_batch(b=4, t=6, *, seed=0, dtype=F64, spread=0.5, ref=True, adv_shape="seq", mask_p=0.25):
    """A random off-policy batch: logp requires grad; ref differs from old when ``ref``."""
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(b, t, generator=g, dtype=F64) * 3
    old = base
    logp = base + spread * torch.randn(b, t, generator=g, dtype=F64)
    ref_logp = base + spread * torch.randn(b, t, generator=g, dtype=F64) if ref else None
    old, logp, ref_logp = shift_to_logprobs(old, logp, ref_logp)
    adv = torch.randn(b if adv_shape == "seq" else (b, t), generator=g, dtype=F64)
    mask = torch.rand(b, t, generator=g) > mask_p
    mask[:, 0] = True
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(logp).requires_grad_(True), cast(old), cast(adv), mask, cast(ref_logp)


@pytest.fixture
def batch():
    return make_batch()


ALL_LOSSES = [(d, s) for d in rpg.DIVERGENCES for s in rpg.STYLES]
