"""Run isolation: every pipeline run writes its own copy of each stage's files, and publishes it
when the stage succeeds.

Layout under the profile's workdir::

    runs/<run scope>/<stage>/...   what one run wrote (never touched by another run)
    runs/<run scope>/<stage>/.complete   written last, when the stage succeeded
    <stage> -> runs/<scope>/<stage>      the latest successful copy (a symlink, swapped atomically)

The run scope is the Dagster *root* run id, so "re-execute from failure" continues in the same
folder (a killed training run resumes its own checkpoint) while two independent runs never
share a file. Copy on write: a step never writes into a folder it did not create, nor into a
copy that is complete (published or not). When its run's folder for the stage is complete or is
a link to an adopted copy (a re-executed run, ``force``), the step writes a new attempt,
``runs/<scope>/<stage>@<n>``, and publishes that; readers of the run take its newest complete
attempt. Pruning never removes a copy that is published or that a run adopted recently (a link
younger than a week), so an old copy still being read survives newer publications: neither can resume the other's checkpoint, overwrite its manifest or package, or
benchmark its model. A stage reads an upstream stage from its own run when that run produced it,
otherwise the latest published copy, resolved once (``Path.resolve``) so that a publication by a
concurrent run cannot switch files under a reader.

Outside a run (the CLI, notebooks, tests of core functions) the config has no scope and every
stage is ``<workdir>/<stage>``, as a single user expects.

Reuse: a stage records in ``.complete`` the fingerprint of its inputs (upstream data versions,
code version, the profile fields it reads) and the data version of what it wrote. A step whose
input fingerprint equals the published copy's adopts that copy (``reusable`` / ``adopt``: a
link in its run folder) instead of recomputing: materializing everything twice trains nothing
and asks the teacher nothing.

``stage`` names: raw_images, vision, embeddings, demonstrations, instructions, model, reports,
paper_tables.
Shared on purpose (content-addressed or append-only, safe for concurrent runs): ``cache/``
(keyed by manifest hash), the teacher cache ``cache/teacher_cache.sqlite``, ``incoming_ingested/`` (one file per batch),
``paper_baselines/<row>/<input fingerprint>/`` (one folder per row and inputs) and
``registry/`` (promotion lock and log).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

STAGES = ("raw_images", "vision", "embeddings", "demonstrations", "instructions", "model", "reports", "paper_tables")
COMPLETE = ".complete"
RUNS = "runs"


def _check(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")


def scoped(cfg, scope: str, writes: str | None = None):
    """A copy of ``cfg`` whose stage folders belong to run ``scope``; ``writes`` is the stage
    this step produces (the only one it writes)."""
    if writes is not None:
        _check(writes)
    out = cfg.model_copy()
    out._run_scope, out._writing_stage, out._write_dir = str(scope), writes, None
    return out


LINK_GRACE_S = 7 * 24 * 3600     # an adopted copy is kept while a run's link to it is younger than this


def _attempt_index(path: Path) -> int:
    _, _, n = path.name.partition("@")
    return int(n) if n.isdigit() else 0


def _attempts(base: Path, scope: str, stage: str) -> list[Path]:
    """The run's folders of ``stage``, oldest attempt first: ``<stage>``, ``<stage>@1``, ..."""
    own = base / RUNS / scope / stage
    more = [p for p in own.parent.glob(f"{stage}@*") if _attempt_index(p) > 0] if own.parent.is_dir() else []
    return [own] + sorted(more, key=_attempt_index)


def _done(path: Path) -> bool:
    """A complete copy, or a link to one (an adopted copy): never written again."""
    return path.is_symlink() or (path / COMPLETE).is_file()


def _write_target(cfg, stage: str) -> Path:
    """The folder this step writes (chosen once per step): the run's folder of the stage, or an
    unfinished attempt of it (a killed step resumes its own files), or else a new attempt, never
    a complete copy or a link to another run's copy."""
    if cfg._write_dir:
        return Path(cfg._write_dir)
    attempts = _attempts(cfg.workdir_path, cfg._run_scope, stage)
    existing = [p for p in attempts if p.exists() or p.is_symlink()]
    if not existing:
        target = attempts[0]
    elif not _done(existing[-1]):
        target = existing[-1]
    else:
        target = attempts[0].parent / f"{stage}@{max(_attempt_index(p) for p in existing) + 1}"
    cfg._write_dir = str(target)
    return target


def stage_dir(cfg, stage: str) -> Path:
    """The folder of ``stage`` as ``cfg`` sees it (see the module docstring)."""
    _check(stage)
    base = cfg.workdir_path
    scope = getattr(cfg, "_run_scope", None)
    if not scope:
        return base / stage
    if cfg._writing_stage == stage:
        own = _write_target(cfg, stage)
        if not own.is_symlink():
            own.mkdir(parents=True, exist_ok=True)
        return own
    for attempt in reversed(_attempts(base, scope, stage)):
        if (attempt / COMPLETE).is_file():
            return attempt
    published = base / stage
    return published.resolve() if published.exists() else published


def publish(cfg, keep: int | None = None, inputs: str = "", data_version: str = "") -> Path:
    """Mark the stage this run wrote complete (with its input fingerprint and data version) and
    make it the latest copy; prune older copies of that stage beyond the ``keep`` most recent
    (default ``operations.keep_runs``; the published one is always kept)."""
    stage = cfg._writing_stage
    if not stage:
        raise ValueError("publish() needs a config from scoped(..., writes=<stage>)")
    base = cfg.workdir_path
    own = stage_dir(cfg, stage)
    if own.is_symlink():
        raise ValueError(f"{own} is an adopted copy of another run: publish() marks only a copy this step wrote")
    (own / COMPLETE).write_text(json.dumps({"run_scope": cfg._run_scope, "time": time.time(), "inputs": inputs,
                                            "data_version": data_version}))
    link = base / stage
    if link.exists() and not link.is_symlink():
        # A workdir from before run isolation: keep its files as a run of their own.
        legacy = base / RUNS / f"legacy-{int(time.time())}" / stage
        legacy.parent.mkdir(parents=True, exist_ok=True)
        os.replace(link, legacy)
    tmp = base / f".{stage}.{uuid.uuid4().hex}"
    os.symlink(os.path.relpath(own, base), tmp)
    os.replace(tmp, link)
    prune(cfg, stage, keep or cfg.operations.keep_runs)
    return own


def fingerprint(*parts) -> str:
    """A short hash of JSON-able parts (the inputs of a step)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_info(cfg, stage: str) -> dict:
    """What ``publish`` recorded for ``stage`` as ``cfg`` sees it ({} when nothing completed)."""
    marker = stage_dir(cfg, stage) / COMPLETE
    return json.loads(marker.read_text()) if marker.is_file() else {}


def data_version(cfg, stage: str) -> str:
    """The data version of ``stage`` as ``cfg`` sees it ("" when unknown)."""
    return stage_info(cfg, stage).get("data_version", "")


def reusable(cfg, inputs: str) -> Optional[dict]:
    """The published copy of the stage ``cfg`` writes, when it was computed from the same inputs."""
    published = cfg.workdir_path / cfg._writing_stage
    marker = published / COMPLETE
    if not inputs or not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    return info | {"path": str(published.resolve())} if info.get("inputs") == inputs else None


def adopt(cfg, info: dict) -> Path:
    """Make ``info``'s copy (from :func:`reusable`) this run's copy of the stage: a link in the
    run folder, so that later steps of the run read it as their own. A complete copy of this run
    is never removed for it (the link becomes a new attempt)."""
    own = _write_target(cfg, cfg._writing_stage)
    if own.is_symlink():
        own.unlink()
    elif own.exists():
        shutil.rmtree(own)        # an unfinished attempt of this step, abandoned for the published copy
    own.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(info["path"], own)
    return own


def mtime_or_zero(path: Path) -> float:
    """Modification time, 0 for a file another run deleted meanwhile (two runs prune at once)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def prune(cfg, stage: str, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest completed copies of ``stage``: never the published one,
    never an incomplete one (that may be a run still writing), never one that a run adopted less
    than ``LINK_GRACE_S`` ago (that run may still be reading it)."""
    base = cfg.workdir_path
    published = (base / stage).resolve() if (base / stage).exists() else None
    folders = [p for pattern in (f"*/{stage}", f"*/{stage}@*") for p in (base / RUNS).glob(pattern)]
    now = time.time()
    linked = set()
    for p in folders:
        if p.is_symlink():
            try:
                if now - p.lstat().st_mtime < LINK_GRACE_S:
                    linked.add(p.resolve())
            except OSError:
                pass
    done = sorted((p for p in folders if not p.is_symlink() and (p / COMPLETE).is_file()),
                  key=lambda p: mtime_or_zero(p / COMPLETE), reverse=True)
    removed = []
    for p in done[keep:]:
        if p.resolve() != published and p.resolve() not in linked:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# --- the workdir as a volume shared by several hosts ---------------------------------------------

SHARED_MARKER = ".maemi-shared-volume"


class WorkdirNotShared(RuntimeError):
    """A worker of a multi-host deployment does not see the deployment's shared workdir."""


def declare_shared(cfg) -> Path:
    """Mark the profile's workdir as the deployment's shared volume (``maemi workdir declare-shared``,
    run by ``deploy/stack.sh up``). Every step of a distributed run checks the mark is visible."""
    import socket

    base = cfg.workdir_path
    base.mkdir(parents=True, exist_ok=True)
    marker = base / SHARED_MARKER
    if not marker.is_file():
        tmp = base / f".{SHARED_MARKER}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"id": uuid.uuid4().hex, "declared_on": socket.gethostname(), "time": time.time()}))
        os.replace(tmp, marker)
    return marker


def check_shared(cfg) -> dict:
    """The shared-volume mark of the workdir, or :class:`WorkdirNotShared` saying what to do. Assets
    pass files by path (stage folders), so a worker that sees another folder at the workdir's path
    (an empty local directory instead of the mounted volume) would fail later with a missing file."""
    import socket

    marker = cfg.workdir_path / SHARED_MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        raise WorkdirNotShared(
            f"this worker ({socket.gethostname()}) does not see the shared workdir: {marker} is missing. Steps "
            f"pass files through {cfg.workdir_path}; mount the deployment's shared volume at this same path on "
            "every worker (README: From one machine to many), or declare it once with "
            "`maemi workdir declare-shared` if this is the volume") from None
