r"""Run many independent training jobs, in parallel processes where there are cores for them.

Each job is a picklable call ``(function, kwargs)`` of a function in this
package. With ``workers > 1`` the jobs run in a pool of spawned processes, each
limited to ``threads`` intra-op threads (1 by default: a tiny model gains
nothing from more, and the processes would fight over the cores). With one
worker they run in this process, at ``threads`` if given and otherwise at
whatever torch is set to here — the demo does not change the caller's threads.

Wall times exclude the warm-up: before its first timed job of each kind, a
process runs two untimed steps of the same configuration.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

import torch

_WARM: set = set()


def default_workers(jobs: int) -> int:
    """min(jobs, cores available to this process)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(jobs, cores))


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _call(job: tuple) -> dict:
    fn, kwargs, warm_key = job
    if warm_key is not None and warm_key not in _WARM:
        fn(**{**kwargs, "warmup": True})
        _WARM.add(warm_key)
    return fn(**kwargs)


def run_jobs(
    jobs: Sequence[tuple[Callable[..., Any], Mapping[str, Any], object]],
    workers: int | None = None,
    threads: int | None = None,
    describe: Callable[[dict], str] | None = None,
    quiet: bool = False,
) -> list[dict]:
    """Run ``jobs`` — ``(function, kwargs, warm-up key or None)`` — and return their results in order.

    The function is called as ``function(**kwargs)``; when the warm-up key is
    new to the process it is first called with ``warmup=True`` (it should then do
    a couple of untimed steps). ``describe(result)`` gives the progress line.
    """
    workers = default_workers(len(jobs)) if workers is None else max(1, min(workers, len(jobs)))
    bar = _Progress(len(jobs), quiet)
    results: list = [None] * len(jobs)
    if workers == 1:
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            for i, job in enumerate(jobs):
                results[i] = _call(job)
                bar.tick(describe(results[i]) if describe else "")
        finally:
            torch.set_num_threads(previous)
    else:
        ctx = get_context("spawn")  # fork after torch has started threads can hang; spawn is safe everywhere
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads or 1,)) as pool:
            futures = {pool.submit(_call, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                bar.tick(describe(results[i]) if describe else "")
    bar.close()
    return results


class _Progress:
    """A tqdm bar over jobs when tqdm is installed, plain lines on stderr otherwise."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet, self.bar = total, 0, quiet, None
        if quiet:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)

    def tick(self, text: str) -> None:
        self.done += 1
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        else:
            print(f"  {self.done}/{self.total}  {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
