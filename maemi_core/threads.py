"""Threads that fit the machine: a torch step uses the cores it may use, no more.

Two torch processes that each spin one OpenMP thread per core on the same cores thrash: with one
or two other torch processes on 2 cores, ViT training fell from 131 to 4.5 images/s (about 30x,
where fair sharing would cost 3x). The shipped Dagster instance (deploy/dagster.yaml) lets one
torch step run at a time across all runs (pool ``maemi_torch``, limit 1) and the run's executor
one per run; ``operations.torch_steps_at_once`` states that number, and each step takes
``cores // torch_steps_at_once`` threads. Raise both together on a bigger machine.

Subnormal floats are read and written as zero (x86 DAZ/FTZ) in torch's training arithmetic.
Without it, a network whose gradients shrink towards zero (one that collapsed to the label prior,
or one without normalisation layers) spends most of its time in subnormal arithmetic: a training
step of the collapsed AlexNet baseline took 0.825 s instead of 0.033 s (25x,
bench/subnormal_floats.py), and the paper baselines' epochs slowed by up to 20x within a run.
The flag is per CPU thread, and a thread inherits it from the one that starts it. It must not
reach other code: under it scipy's cKDTree, called in the measurement teacher's worker threads,
recursed until the process crashed. So ``use_threads`` (and ``fit_threads``, which every torch
step calls first) starts torch's worker threads with the flag set and then clears it again in
the calling thread, and the trainers set it in the calling thread only while they train
(``subnormals_flushed``, which nests: a trainer called by another leaves the flag to the outer
one); numpy and scipy code, and threads started outside a trainer, compute as usual.
"""

from __future__ import annotations

import contextlib
import os
import threading


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def step_threads(steps_at_once: int, cores: int | None = None) -> int:
    return max(1, (cores or available_cores()) // max(1, steps_at_once))


_FLUSH = threading.local()       # per thread, as the CPU flag: how many blocks want it set


@contextlib.contextmanager
def subnormals_flushed():
    """Subnormals flushed in the calling thread for the block (or the decorated function); the
    outermost block clears the flag again."""
    import torch

    depth = getattr(_FLUSH, "depth", 0)
    if depth == 0:
        torch.set_flush_denormal(True)
    _FLUSH.depth = depth + 1
    try:
        yield
    finally:
        _FLUSH.depth = depth
        if depth == 0:
            torch.set_flush_denormal(False)


def use_threads(n: int) -> int:
    """``n`` intra-op threads for torch (and OMP_NUM_THREADS for child processes), started with
    subnormals flushed while the calling thread keeps its usual arithmetic, and the allocator that
    keeps freed tensor memory for the next tensor (maemi_core/allocator.py). Call it before the
    first torch operation of a step or script: threads torch started earlier keep their setting."""
    import torch

    from maemi_core.allocator import use_keeping_allocator

    use_keeping_allocator()
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    start_workers_flushed()
    return n


def start_workers_flushed() -> None:
    """Start torch's intra-op worker threads with subnormals flushed (they keep the flag); the
    calling thread's arithmetic is left as it was."""
    import torch

    with subnormals_flushed():
        torch.ones(1 << 18).mul_(2.0)     # a parallel op: torch starts its worker threads here


def fit_threads(cfg) -> int:
    """``use_threads`` with the threads one step may use on this machine."""
    return use_threads(step_threads(cfg.operations.torch_steps_at_once))
