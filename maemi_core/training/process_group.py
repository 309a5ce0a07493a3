"""A process's place among the data-parallel processes of one tuning run, and the three
collective operations the trainer needs (sum the gradients, sum a few numbers, broadcast the
step's rank). ``SINGLE`` is a process alone; :func:`init_world` joins the group torchrun
describes (gloo on CPU, nccl on GPU). The launcher and the worker are in data_parallel.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class World:
    """This process's place among the data-parallel processes (``size == 1``: alone)."""
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the processes, in one flat buffer."""
        if self.size == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in params:
            if p.grad is None:          # a parameter this share of the step did not reach
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def sum(self, *values: float) -> list[float]:
        if self.size == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_int(self, value: int) -> int:
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())


SINGLE = World()


def init_world() -> World:
    """Join the process group torchrun describes in the environment."""
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    gpu = torch.cuda.is_available()
    device = f"cuda:{local}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if gpu else "gloo")
    return World(rank, size, device)
