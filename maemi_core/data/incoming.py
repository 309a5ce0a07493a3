"""New fab data: the drop folder ``<incoming>/<batch>/<class>/<image files>``.

A batch is *complete* when it holds the marker file (``operations.complete_marker``) or, when a
quiet period is configured, once no file in it has changed for that long, so a folder that is
still being copied is never picked up. A complete batch is *ingested* (validated, counted and
recorded under ``<workdir>/incoming_ingested/<batch>.json``); from then on ``raw_images``
includes its images with the same validation, quarantine and hash-based splits as the base
dataset, so images already in the test split stay there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from maemi_core.config import ConfigError, MaemiConfig
from maemi_core.data.sources import Candidate, list_imagefolder


@dataclass(frozen=True)
class BatchStatus:
    name: str
    path: Path
    complete: bool
    reason: str
    n_files: int
    newest_mtime: float


def ingested_dir(cfg: MaemiConfig) -> Path:
    return cfg.workdir_path / "incoming_ingested"


def scan_batches(cfg: MaemiConfig, now: Optional[float] = None) -> list[BatchStatus]:
    """Every batch folder in the drop folder with whether it is complete, and why (not)."""
    root = cfg.incoming_path
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    o = cfg.operations
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [p for p in d.rglob("*") if p.is_file()]
        images = [p for p in files if p.name != o.complete_marker]
        newest = max((p.stat().st_mtime for p in files), default=d.stat().st_mtime)
        if not images:
            complete, reason = False, "no image files yet"
        elif (d / o.complete_marker).is_file():
            complete, reason = True, f"marker {o.complete_marker}"
        elif o.quiet_period_s is not None and now - newest >= o.quiet_period_s:
            complete, reason = True, f"unchanged for {now - newest:.0f} s"
        else:
            complete, reason = False, ("still changing" if o.quiet_period_s is not None
                                       else f"waiting for {o.complete_marker}")
        out.append(BatchStatus(d.name, d, complete, reason, len(images), newest))
    return out


def ingested_batches(cfg: MaemiConfig) -> list[str]:
    d = ingested_dir(cfg)
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def ingest_batch(cfg: MaemiConfig, name: str) -> dict:
    """Validate a complete batch and record it as ingested; returns the record (counts per class,
    files outside a class folder). Raises if the batch is missing or not complete."""
    from maemi_core.data.image_io import ImageRejected, inspect_image

    status = {b.name: b for b in scan_batches(cfg)}.get(name)
    if status is None:
        raise ConfigError(f"no batch folder {name!r} in {cfg.incoming_path}")
    if not status.complete:
        raise ConfigError(f"batch {name!r} is not complete ({status.reason}): add the marker file "
                          f"{cfg.operations.complete_marker} when the copy has finished")
    per_class: dict[str, int] = {}
    rejected = []
    for cand in list_imagefolder(status.path, source=f"incoming:{name}"):
        if cand.label is None:
            rejected.append({"path": str(cand.path), "reason": "no_class_folder"})
            continue
        try:
            inspect_image(cand.path)
        except ImageRejected as exc:
            rejected.append({"path": str(cand.path), "reason": exc.reason})
            continue
        per_class[cand.label] = per_class.get(cand.label, 0) + 1
    record = {"batch": name, "path": str(status.path), "ingested_at": datetime.now(timezone.utc).isoformat(),
              "complete_because": status.reason, "images_per_class": per_class, "rejected": rejected}
    out = ingested_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / f"{name}.json")
    return record


def incoming_candidates(cfg: MaemiConfig) -> list[Candidate]:
    """The files of every ingested batch, labelled by their class folder."""
    out: list[Candidate] = []
    for name in ingested_batches(cfg):
        d = cfg.incoming_path / name
        if d.is_dir():
            out += [c for c in list_imagefolder(d, source=f"incoming:{name}")
                    if c.path.name != cfg.operations.complete_marker]
    return out
