"""Data-parallel instruction tuning on several processes (``model.processes``; torchrun).

Every process holds the whole model. An optimizer step's micro-batches are dealt round-robin to
the processes; each back-propagates its share of the step's token-weighted loss, the gradients
are summed across processes (all-reduce: gloo on CPU, nccl on GPU), and every process applies
the same Adam update, so all replicas stay identical. The DyQLoRA-FA rank of a step is sampled
on process 0 and broadcast: every replica trains the same rows of B, and LoRA dropout masks are
seeded per micro-batch. With the same effective batch and threads per process the result is
bit-identical to one process (``tests/test_data_parallel.py``); other thread counts change float
reductions inside the matmuls, and so the bits.

The ``maemi_model`` step runs it as

    python -m torch.distributed.run --standalone --nproc-per-node N -m maemi_core.training.data_parallel JOB

where ``JOB`` is a folder the step wrote: the untrained model as a package (so every process
rebuilds exactly the same model, warm start included) and the examples and settings. Process 0
writes the checkpoint (resume after a kill works as in one process) and the result. On a node
with N GPUs the same command runs one process per GPU (nccl). Across nodes, replace
``--standalone`` by ``--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT`` on every node,
with the job folder and the checkpoint on the shared volume.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from maemi_core.threads import use_threads
from maemi_core.training.process_group import init_world


def launch_command(job: Path, processes: int) -> list[str]:
    """The torchrun command for ``job`` on this node (``--standalone``: torchrun picks a free
    loopback port for the rendezvous itself)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "maemi_core.training.data_parallel", str(job)]


def _die_with_parent() -> None:
    """In the torchrun child: receive SIGTERM when the step's process dies (Linux), so a killed
    step never leaves a training running on its checkpoint (torchrun stops its workers on SIGTERM)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def train_in_processes(model, cfg, train, val, images, tcfg, checkpoint_path, fingerprint: str, processes: int,
                       on_point: Callable = lambda p: None, stop_after_steps: Optional[int] = None,
                       log: Callable[[str], None] = lambda m: None, threads: Optional[int] = None):
    """:func:`~maemi_core.training.maemi_training.train_maemi` on ``processes`` processes; on
    return ``model`` holds the trained tensors, as after a single-process run."""
    from maemi_core.model.maemi_model import save_package
    from maemi_core.threads import available_cores

    job = Path(checkpoint_path).parent / "data_parallel_job"
    save_package(model, cfg, job / "model")
    # The package carries the trainable tensors as they are now (warm start included), the frozen A.
    torch.save({"train": train, "val": val, "image_paths": images.paths, "image_size": images.size,
                "training": asdict(tcfg), "checkpoint": str(checkpoint_path), "fingerprint": fingerprint,
                "stop_after_steps": stop_after_steps,
                "lm_cache": str(cfg.resolve(cfg.model.lm_cache)) if cfg.model.lm_cache else None}, job / "data.pt")
    (job / "result.pt").unlink(missing_ok=True)
    n_threads = threads or max(1, available_cores() // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(n_threads), "MAEMI_DP_THREADS": str(n_threads)}
    cmd = launch_command(job, processes)
    log(f"data-parallel tuning: {processes} processes x {n_threads} threads ({' '.join(cmd[1:5])} ...)")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_die_with_parent)
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-40:]
        if line.startswith("maemi step") or "Error" in line:
            log(line)
    if proc.wait() != 0:
        raise RuntimeError(f"data-parallel tuning failed (exit {proc.returncode}); its last lines:\n" + "\n".join(tail))
    result = torch.load(job / "result.pt", weights_only=False)
    model.load_state_dict(result["weights"], strict=False)
    for point in result["progress"].history[result["points_before"]:]:
        on_point(point)
    return result["progress"]


def main(job_dir: str) -> None:
    from maemi_core.model.dyqlora_fa import set_fast_kernel
    from maemi_core.model.maemi_model import load_package
    from maemi_core.training.maemi_training import ImageStore, MaemiTrainingConfig, train_maemi

    job = Path(job_dir)
    use_threads(int(os.environ.get("MAEMI_DP_THREADS", "1")))
    world = init_world()
    data = torch.load(job / "data.pt", weights_only=False)
    model = load_package(job / "model", data["lm_cache"])
    set_fast_kernel(model, False)               # training numerics
    if world.device != "cpu":
        model.to(world.device)
    images = ImageStore(data["image_paths"], data["image_size"])

    points = []

    def on_point(p) -> None:
        points.append(p)
        if world.main:
            print(f"maemi step {p.step} (epoch {p.epoch}, {p.tokens} tokens): train_loss={p.train_loss:.4f} "
                  f"val_loss={p.val_loss:.4f} lr={p.lr:g} ({p.tokens_per_s:.0f} tok/s)", flush=True)

    progress = train_maemi(model, data["train"], data["val"], images, MaemiTrainingConfig(**data["training"]),
                           data["checkpoint"], data["fingerprint"], on_point=on_point,
                           stop_after_steps=data["stop_after_steps"], world=world)
    if world.main:
        tmp = job / "result.pt.tmp"
        torch.save({"weights": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
                    "progress": progress, "points_before": len(progress.history) - len(points)}, tmp)
        os.replace(tmp, job / "result.pt")
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
