"""Atomic checkpoints: a training run killed at any moment resumes from its last epoch."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write to a temp file in the same folder, then rename: never a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path, fingerprint: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The checkpoint at ``path`` if it exists and was written for the same run settings
    (``fingerprint``: data version + hyperparameters); otherwise None, so a changed
    dataset or config starts fresh instead of resuming something else."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        return None
    return state


@dataclass
class TrainingProgress:
    """Bookkeeping shared by the training loops: per-epoch history, the best validation
    epoch, early stopping, and what a checkpoint must carry to resume exactly."""

    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    bad_epochs: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int = 0

    def record(self, rec, val_loss: float) -> bool:
        """Append an epoch record; True when it is the best validation loss so far."""
        self.history.append(rec)
        if val_loss < self.best_val_loss - 1e-6:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, rec.epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def state(self, opt, sched, gen: torch.Generator) -> dict[str, Any]:
        return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "bad_epochs": self.bad_epochs, "best_epoch": self.best_epoch,
                "best_val_loss": self.best_val_loss, "history": [asdict(r) for r in self.history]}

    def end_epoch(self, rec, val_loss: float, patience: int, max_epochs: int, checkpoint_path, fingerprint: str,
                  opt, sched, gen: torch.Generator, best_tensors, current_tensors) -> tuple[dict, bool]:
        """Record the epoch, write the resumable checkpoint and decide on early stopping.

        ``best_tensors`` are the weights kept so far; ``current_tensors()`` gives this epoch's
        (called only as needed). Returns ``(best weights, stop)``."""
        current = current_tensors()
        if self.record(rec, val_loss):
            best_tensors = current
        stop = self.bad_epochs >= patience
        if checkpoint_path is not None:    # None: another process writes it
            save_checkpoint({"fingerprint": fingerprint, "epoch": rec.epoch,
                             "finished": stop or rec.epoch == max_epochs, "weights": current, "best": best_tensors,
                             **self.state(opt, sched, gen)}, checkpoint_path)
        self.stopped_early = stop
        return best_tensors, stop

    def restore(self, state: dict[str, Any], opt, sched, gen: torch.Generator, record_cls) -> int:
        """Load optimizer, scheduler and RNG states; returns the epoch to continue after."""
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = [record_cls(**r) for r in state["history"]]
        self.bad_epochs, self.best_epoch, self.best_val_loss = state["bad_epochs"], state["best_epoch"], state["best_val_loss"]
        self.resumed_from_epoch = state["epoch"]
        return state["epoch"]
