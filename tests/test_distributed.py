"""Data parallelism: 2 gloo processes on CPU, each with a shard, SUM all-reduce = the full-batch gradient.

Convention (rpg.aggregation): pass the full batch's ``batch_num_tokens`` / ``global_batch_size`` to every
rank and all-reduce gradients with SUM. (With DDP/FSDP's MEAN all-reduce, multiply each rank's loss by
the world size first — verl's ``* dp_size``.) Gradient accumulation over micro-batches is the same sum.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rpg

from .conftest import make_batch

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_batch():
    logp, old, adv, mask, ref = make_batch(6, 5, seed=11)
    mask[1] = False  # an empty sequence on rank 0
    return logp.detach(), old, adv, mask, ref


CONFIGS = [(agg, style, mean) for agg in rpg.AGG_MODES for style in rpg.STYLES for mean in (False, True)]


def _worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    try:
        logp, old, adv, mask, ref = _full_batch()
        n_tok, n_seq = torch.count_nonzero(mask), torch.count_nonzero(mask.sum(-1))
        rows = slice(rank * 3, rank * 3 + 3)
        for agg, style, mean_allreduce in CONFIGS:
            theta = logp.clone().requires_grad_(True)  # the shared "parameters", replicated as in DDP
            fn = rpg.RPGLoss("urkl", style=style, beta=0.3, agg=agg, max_len=7)
            mine = theta[rows]
            # two micro-batches per rank: gradient accumulation is a plain sum too
            loss = sum(
                fn(
                    mine[i : i + 2],
                    old[rows][i : i + 2],
                    adv[rows][i : i + 2],
                    mask[rows][i : i + 2],
                    ref_logp=ref[rows][i : i + 2],
                    batch_num_tokens=n_tok,
                    global_batch_size=n_seq,
                ).loss
                for i in (0, 2)
            )
            if mean_allreduce:  # DDP/FSDP average gradients: scale the loss by the world size first
                loss = loss * WORLD
            loss.backward()
            op = dist.ReduceOp.AVG if mean_allreduce else dist.ReduceOp.SUM
            grad, total = theta.grad, loss.detach().clone()
            dist.all_reduce(grad, op=op)
            dist.all_reduce(total, op=op)
            results[(agg, style, mean_allreduce)] = (grad, total)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("dist") / "rank0.pt")
    mp.start_processes(_worker, args=(_free_port(), out_path), nprocs=WORLD, start_method="spawn", join=True)
    return torch.load(out_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "agg,style,mean_allreduce", CONFIGS, ids=[f"{a}-{s}-{'mean' if m else 'sum'}-allreduce" for a, s, m in CONFIGS]
)
def test_two_ranks_equal_the_full_batch(two_rank_results, agg, style, mean_allreduce):
    grad, loss = two_rank_results[(agg, style, mean_allreduce)]
    logp, old, adv, mask, ref = _full_batch()
    theta = logp.clone().requires_grad_(True)
    full = rpg.RPGLoss("urkl", style=style, beta=0.3, agg=agg, max_len=7)(theta, old, adv, mask, ref_logp=ref).loss
    full.backward()
    torch.testing.assert_close(loss, full.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, theta.grad, rtol=0, atol=1e-12)
