"""Threads that fit the machine: a torch step uses the cores it may use, no more.

Two torch processes that each spin one OpenMP thread per core on the same cores thrash: with one
or two other torch processes on 2 cores, ViT training fell from 131 to 4.5 images/s (about 30x,
where fair sharing would cost 3x). The shipped Dagster instance (deploy/dagster.yaml) lets one
torch step run at a time across all runs (pool ``maemi_torch``, limit 1) and the run's executor
one per run; ``operations.torch_steps_at_once`` states that number, and each step takes
``cores // torch_steps_at_once`` threads. Raise both together on a bigger machine.
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


def fit_threads(cfg) -> int:
    """Set torch's intra-op threads (and OMP_NUM_THREADS for child processes) for one step."""
    import torch

    n = step_threads(cfg.operations.torch_steps_at_once)
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n
