"""Atomic checkpoints: a training run killed at any moment resumes from its last epoch."""

from __future__ import annotations

import os
import tempfile
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
