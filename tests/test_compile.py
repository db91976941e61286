"""The fused losses under torch.compile (CPU here; CUDA where a GPU is present)."""

import pytest
import torch

import rpg

from .conftest import make_batch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "fn",
    [
        rpg.RPGLoss("urkl", style="reinforce", beta=0.1, agg="seq-mean-token-mean"),
        rpg.RPGLoss("fkl", style="differentiable", beta=0.1, clip=rpg.Clip(0.2, 0.28, 3.0)),
        rpg.GRPOLoss(beta=0.1),
        rpg.GSPOLoss(clip=rpg.Clip(0.05, 0.05, None)),
        rpg.CISPOLoss(clip=rpg.Truncate(0.2, 0.5)),
        rpg.RPGLoss("rkl", beta=0.1, fold_kl=True),
    ],
    ids=["urkl-reinforce", "fkl-differentiable", "grpo-k3", "gspo", "cispo", "rkl-fold"],
)
def test_compiled_equals_eager(fn, device):
    torch._dynamo.reset()
    logp, old, adv, mask, ref = (x.to(device) for x in make_batch(4, 16, seed=7, dtype=torch.float32))
    logp = logp.detach().requires_grad_(True)

    def step(logp, old, adv, mask, ref):
        return fn(logp, old, adv, mask, ref_logp=ref).loss

    eager = step(logp, old, adv, mask, ref)
    (g_eager,) = torch.autograd.grad(eager, logp)
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(logp, old, adv, mask, ref)
    (g_got,) = torch.autograd.grad(got, logp)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_eager, rtol=1e-6, atol=1e-6)
