"""Threads that fit the machine: a torch step uses the cores it may use, no more.

Two torch processes that each spin one OpenMP thread per core on the same cores thrash: with one
or two other torch processes on 2 cores, ViT training fell from 131 to 4.5 images/s (about 30x,
where fair sharing would cost 3x). The shipped Dagster instance (deploy/dagster.yaml) lets one
torch step run at a time across all runs (pool ``maemi_torch``, limit 1) and the run's executor
one per run; ``operations.torch_steps_at_once`` states that number, and each step takes
``cores // torch_steps_at_once`` threads. Raise both together on a bigger machine.

Subnormal floats are read and written as zero (x86 DAZ/FTZ) in every torch step. Without it, a
network whose gradients shrink towards zero (one that collapsed to the label prior, or one without
normalisation layers) spends most of its time in subnormal arithmetic: a training step of the
collapsed AlexNet baseline took 0.84 s instead of 0.035 s (24x), and the paper baselines' epochs
slowed by up to 20x within a run. The flag is per CPU thread and a thread inherits it from the one
that starts it, so it must be set before torch starts its worker threads: ``use_threads`` (and
``fit_threads``, which Dagster steps call first) set it at the start of a step or script.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def step_threads(steps_at_once: int, cores: int | None = None) -> int:
    return max(1, (cores or available_cores()) // max(1, steps_at_once))


def flush_denormals() -> bool:
    """Treat subnormal floats as zero in this thread and the threads it starts from now on (False
    where the CPU has no such mode)."""
    import torch

    return torch.set_flush_denormal(True)


def use_threads(n: int) -> int:
    """Subnormals flushed, then ``n`` intra-op threads for torch (and OMP_NUM_THREADS for child
    processes). Call it before the first torch operation of a step or script."""
    import torch

    flush_denormals()
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def fit_threads(cfg) -> int:
    """``use_threads`` with the threads one step may use on this machine."""
    return use_threads(step_threads(cfg.operations.torch_steps_at_once))
