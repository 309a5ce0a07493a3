"""New fab data: the drop folder ``<incoming>/<batch>/<class>/<image files>``.

A batch is *complete* when it holds the marker file (``operations.complete_marker``) or, when a
quiet period is configured, once no file in it has changed for that long, so a folder that is
still being copied is never picked up. A complete batch is *ingested* (validated, counted and
recorded under ``<workdir>/incoming_ingested/<batch>.json``); from then on ``raw_images``
includes its images with the same validation, quarantine and hash-based splits as the base
dataset, so images already in the test split stay there.

Ingestion lists and validates a batch's files once, and its record names them (with size and
modification time): ``raw_images`` takes exactly those. A file added to the folder afterwards is
listed as rejected (``added_after_ingestion``: drop it in a new batch), one changed afterwards as
``changed_after_ingestion``. Nothing follows a link out of its batch folder (``link_outside_root``),
and a batch folder that is itself a link out of the drop folder is never complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from maemi_core.config import ConfigError, MaemiConfig
from maemi_core.data.sources import Candidate, link_outside, list_imagefolder


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
    real_root = root.resolve()
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (target := link_outside(d, real_root)) is not None:
            out.append(BatchStatus(d.name, d, False, f"link_outside_root: the batch folder is a link to {target}, "
                                                     "outside the drop folder", 0, d.lstat().st_mtime))
            continue
        real_d = d.resolve()
        files = [p for p in d.rglob("*") if p.is_file() and link_outside(p, real_d) is None]
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


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def ingest_batch(cfg: MaemiConfig, name: str) -> dict:
    """Validate a complete batch and record it as ingested; returns the record (counts per class,
    the accepted files with size and modification time, the rejected ones with the reason).
    Raises if the batch is missing or not complete."""
    from maemi_core.data.image_io import ImageRejected, inspect_image

    status = {b.name: b for b in scan_batches(cfg)}.get(name)
    if status is None:
        raise ConfigError(f"no batch folder {name!r} in {cfg.incoming_path}")
    if not status.complete:
        raise ConfigError(f"batch {name!r} is not complete ({status.reason}): add the marker file "
                          f"{cfg.operations.complete_marker} when the copy has finished")
    per_class: dict[str, int] = {}
    rejected, files = [], {}
    for cand in list_imagefolder(status.path, source=f"incoming:{name}", confine_links=True):
        if cand.path.name == cfg.operations.complete_marker:
            continue
        rel = _rel(cand.path, status.path)
        if cand.rejected is not None:
            rejected.append({"path": str(cand.path), "file": rel, "reason": cand.rejected[0],
                             "detail": cand.rejected[1]})
            continue
        if cand.label is None:
            rejected.append({"path": str(cand.path), "file": rel, "reason": "no_class_folder"})
            continue
        try:
            st = cand.path.stat()
            inspect_image(cand.path)
        except ImageRejected as exc:
            rejected.append({"path": str(cand.path), "file": rel, "reason": exc.reason, "detail": exc.detail})
            continue
        except OSError as exc:
            rejected.append({"path": str(cand.path), "file": rel, "reason": "unreadable", "detail": str(exc)})
            continue
        files[rel] = {"label": cand.label, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        per_class[cand.label] = per_class.get(cand.label, 0) + 1
    record = {"batch": name, "path": str(status.path), "ingested_at": datetime.now(timezone.utc).isoformat(),
              "complete_because": status.reason, "images_per_class": per_class, "rejected": rejected,
              "files": files}
    out = ingested_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / f"{name}.json")
    return record


def incoming_candidates(cfg: MaemiConfig) -> list[Candidate]:
    """The files that ingestion accepted in every ingested batch, labelled by their class folder;
    every other file of a batch folder is listed as rejected with its reason (the one ingestion
    gave, ``added_after_ingestion``, ``changed_after_ingestion`` or ``link_outside_root``).
    Records written before ingestion kept its file list name no files: their batches are listed
    as they are now (links out of the folder rejected); ingest them again to pin the list."""
    out: list[Candidate] = []
    real_root = cfg.incoming_path.resolve()
    for name in ingested_batches(cfg):
        d = cfg.incoming_path / name
        if not d.is_dir() or link_outside(d, real_root) is not None:
            continue
        record = json.loads((ingested_dir(cfg) / f"{name}.json").read_text())
        accepted = record.get("files")
        refused = {r["file"]: r for r in record.get("rejected", []) if "file" in r}
        for c in list_imagefolder(d, source=f"incoming:{name}", confine_links=True):
            if c.path.name == cfg.operations.complete_marker:
                continue
            if c.rejected is not None or accepted is None:
                out.append(c)
                continue
            rel = _rel(c.path, d)
            if rel in refused:
                c.rejected = (refused[rel]["reason"], refused[rel].get("detail") or f"rejected when batch {name} "
                                                                                   "was ingested")
            elif rel not in accepted:
                c.rejected = ("added_after_ingestion", f"not in batch {name} when it was ingested: put new files "
                                                       "in a new batch folder")
            else:
                st = c.path.stat()
                if (st.st_size, st.st_mtime_ns) != (accepted[rel]["size"], accepted[rel]["mtime_ns"]):
                    c.rejected = ("changed_after_ingestion", f"changed since batch {name} was ingested: put the "
                                                             "new version in a new batch folder")
            out.append(c)
    return out
