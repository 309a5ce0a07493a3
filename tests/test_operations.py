"""The drop-folder sensor with build_sensor_context: a new complete batch, a half-copied one,
a batch already seen; and batch ingestion."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest

from maemi_core.config import ConfigError, load_config
from maemi_core.data.incoming import ingest_batch, ingested_batches, scan_batches
from maemi_dagster.automation import incoming_batches, retune_job, weekly_retune
from maemi_dagster.resources import MaemiConfigResource
from tests.conftest import REPO


@pytest.fixture
def project(tmp_path, elpv_paths):
    (tmp_path / "configs").mkdir()
    profile = tmp_path / "configs" / "tiny.yaml"
    shutil.copy(REPO / "configs" / "tiny.yaml", profile)
    cfg = load_config(profile)

    def drop(batch: str, n: int = 3, complete: bool = True, age_s: float = 0.0):
        for i, src in enumerate(elpv_paths[:n]):
            dst = cfg.incoming_path / batch / ("functional" if i % 2 else "defective") / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            if age_s:
                t = time.time() - age_s
                os.utime(dst, (t, t))
        if complete:
            (cfg.incoming_path / batch / "_COMPLETE").touch()

    return profile, cfg, drop


def _evaluate(profile, cursor=None):
    ctx = dg.build_sensor_context(cursor=cursor, resources={"maemi_config": MaemiConfigResource(path=str(profile))})
    return incoming_batches(ctx)


def test_new_complete_batch_is_registered_and_requested_once(project):
    profile, cfg, drop = project
    assert isinstance(_evaluate(profile), dg.SkipReason)          # no drop folder yet
    drop("lot-a")
    result = _evaluate(profile)
    assert [r.partition_key for r in result.run_requests] == ["lot-a"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["lot-a"]
    assert json.loads(result.cursor) == ["lot-a"]
    again = _evaluate(profile, cursor=result.cursor)               # already seen: nothing new
    assert isinstance(again, dg.SkipReason)
    drop("lot-b")
    more = _evaluate(profile, cursor=result.cursor)
    assert [r.partition_key for r in more.run_requests] == ["lot-b"] and json.loads(more.cursor) == ["lot-a", "lot-b"]


def test_half_copied_batch_waits_for_the_marker_or_the_quiet_period(project):
    profile, cfg, drop = project
    drop("lot-copying", complete=False)                            # files just written, no marker
    skipped = _evaluate(profile)
    assert isinstance(skipped, dg.SkipReason) and "lot-copying (still changing)" in skipped.skip_message
    with pytest.raises(ConfigError, match="not complete"):
        ingest_batch(cfg, "lot-copying")
    drop("lot-quiet", complete=False, age_s=cfg.operations.quiet_period_s + 5)   # untouched long enough
    result = _evaluate(profile)
    assert [r.partition_key for r in result.run_requests] == ["lot-quiet"]
    status = {b.name: b for b in scan_batches(cfg)}
    assert status["lot-quiet"].complete and "unchanged" in status["lot-quiet"].reason
    assert not status["lot-copying"].complete


def test_ingestion_validates_and_records_the_batch(project):
    profile, cfg, drop = project
    drop("lot-a", n=4)
    (cfg.incoming_path / "lot-a" / "functional" / "broken.png").write_bytes(b"not an image")
    rec = ingest_batch(cfg, "lot-a")
    assert rec["images_per_class"] == {"defective": 2, "functional": 2}
    assert [r["reason"] for r in rec["rejected"]] and ingested_batches(cfg) == ["lot-a"]


def test_schedule_and_jobs_are_defined():
    assert weekly_retune.cron_schedule == "0 3 * * 1"
    assert weekly_retune.default_status == dg.DefaultScheduleStatus.RUNNING
    assert incoming_batches.default_status == dg.DefaultSensorStatus.RUNNING
    assert retune_job.name == "retune"


def test_weekly_retune_is_skipped_when_data_code_and_profile_are_unchanged(project):
    from types import SimpleNamespace

    from maemi_dagster.automation import retune_decision, retune_fingerprint

    profile, cfg, drop = project
    first = retune_decision(retune_fingerprint(cfg), None)
    assert isinstance(first, dg.RunRequest) and first.tags["maemi/changed"] == "no previous re-tune"
    last = SimpleNamespace(run_id="0123456789abcdef", tags=first.tags)       # that run succeeded
    second = retune_decision(retune_fingerprint(cfg), last)
    assert isinstance(second, dg.SkipReason) and "unchanged" in second.skip_message
    drop("lot-new", n=2)
    ingest_batch(cfg, "lot-new")                           # new fab data: the next run goes ahead
    third = retune_decision(retune_fingerprint(cfg), last)
    assert isinstance(third, dg.RunRequest) and third.tags["maemi/changed"] == "data"


def _queue_decision(dagster_yaml: str, tmp_path, runs: list[dict]) -> tuple[list[str], object]:
    """Which of ``runs`` (QUEUED, with tags) Dagster's own run-queue daemon would start now under
    the instance config ``dagster_yaml``; ``runs`` may include in-progress ones."""
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteRepositoryOrigin
    from dagster._core.test_utils import create_run_for_test
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

    origin = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("maemi"), "__repository__").get_job_origin("retune")

    home = tmp_path / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(dagster_yaml)
    instance = dg.DagsterInstance.from_config(str(home))
    ids = []
    for r in runs:
        run = create_run_for_test(instance, job_name="retune", status=r["status"], tags=r["tags"],
                                  remote_job_origin=origin)
        ids.append(run.run_id)
    picked = QueuedRunCoordinatorDaemon(interval_seconds=1)._get_runs_to_dequeue(
        instance, instance.get_concurrency_config(), fixed_iteration_time=None)
    return [ids.index(r.run_id) for r in picked], instance


def test_the_shipped_run_queue_runs_one_retune_per_dataset_at_a_time(tmp_path):
    """deploy/dagster.yaml + the retune job's own tags, judged by Dagster's queue daemon."""
    shipped = (REPO / "deploy" / "dagster.yaml").read_text()
    tags = dict(retune_job.tags)
    other = tags | {"maemi/retune": "another-dataset"}
    Q, S = dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTED
    # Two re-tunings of one dataset queued together: one starts, the other waits; another dataset's goes ahead.
    picked, _ = _queue_decision(shipped, tmp_path / "a", [{"status": Q, "tags": tags}, {"status": Q, "tags": tags},
                                                          {"status": Q, "tags": other}])
    assert len([i for i in picked if i in (0, 1)]) == 1 and 2 in picked
    # While one runs, the next waits; once it finished, the next starts.
    picked, _ = _queue_decision(shipped, tmp_path / "b", [{"status": S, "tags": tags}, {"status": Q, "tags": tags}])
    assert picked == []
    picked, _ = _queue_decision(shipped, tmp_path / "c", [{"status": dg.DagsterRunStatus.SUCCESS, "tags": tags},
                                                          {"status": Q, "tags": tags}])
    assert picked == [1]
    # The limit off (no tag limit): both start at once, which run isolation keeps correct.
    unlimited = "telemetry:\n  enabled: false\nconcurrency:\n  runs:\n    max_concurrent_runs: 4\n"
    picked, _ = _queue_decision(unlimited, tmp_path / "d", [{"status": Q, "tags": tags}, {"status": Q, "tags": tags}])
    assert sorted(picked) == [0, 1]


def test_the_shipped_instance_limits_torch_steps_across_runs_and_threads_fit(tmp_path):
    from maemi_core.threads import step_threads
    from maemi_dagster.definitions import defs
    from maemi_dagster.executor import TORCH_POOL

    _, instance = _queue_decision((REPO / "deploy" / "dagster.yaml").read_text(), tmp_path, [])
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    graph = defs.resolve_asset_graph()
    pools = {k.to_user_string(): graph.get(k).pools for k in graph.get_all_asset_keys()}
    for torch_step in ("vit_classifier", "image_embeddings", "maemi_model", "benchmark_tables"):
        assert pools[torch_step] == {TORCH_POOL}
    assert pools["model_promotion"] == {"maemi_registry"}
    assert step_threads(1, cores=2) == 2 and step_threads(2, cores=2) == 1 and step_threads(3, cores=2) == 1
    assert step_threads(2, cores=16) == 8


_SUBNORMAL_PROBE = """
import sys, threading, numpy as np, torch
from maemi_core.config import load_config
from maemi_core.threads import fit_threads, subnormals_flushed
if sys.argv[1] == "fit":
    fit_threads(load_config("configs/tiny.yaml"))
else:
    torch.set_num_threads(2)
tiny = torch.finfo(torch.float32).tiny

def train_step():   # 1e-30 * 1e-10 is subnormal in float32: split over both threads, and backward
    x = torch.full((1 << 20,), 1e-30)
    w = torch.nn.Parameter(torch.full((256, 256), 1e-20))
    (torch.randn(4096, 256) @ w).sum().mul(1e-22).backward()
    return sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in (x * 1e-10, w.grad * 1e-25))

def numpy_keeps_subnormals():
    return bool(np.float32(1e-30) * np.float32(1e-10) != 0)

if sys.argv[1] == "fit":
    with subnormals_flushed():          # as the trainers run, one calling another
        with subnormals_flushed():
            pass
        torch_subnormals = train_step()
else:
    torch_subnormals = train_step()
seen = []
t = threading.Thread(target=lambda: seen.append(numpy_keeps_subnormals()))
t.start(); t.join()
print(torch_subnormals, int(numpy_keeps_subnormals()), int(seen[0]))
"""


def test_a_torch_step_trains_without_subnormals_and_other_code_keeps_them():
    """Subnormal arithmetic made collapsed networks step 24x slower: after fit_threads, a trainer
    computes none on any torch thread; numpy code in the step's thread and in threads it starts
    afterwards keeps IEEE arithmetic (scipy's cKDTree crashed under the flag)."""
    import subprocess
    import sys

    def probe(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _SUBNORMAL_PROBE, mode], cwd=REPO, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert out.returncode == 0, out.stderr[-2000:]
        return [int(v) for v in out.stdout.split()[-3:]]

    torch_subnormals, _, _ = probe("plain")
    assert torch_subnormals > 0          # the probe does produce them without the flag
    assert probe("fit") == [0, 1, 1]


def test_ingestion_never_follows_a_link_out_of_the_batch_and_lists_exactly_what_it_validated(project, elpv_paths):
    """A link to a file outside the batch folder is rejected (``link_outside_root``), never read;
    a file added or changed after ingestion is not taken into the dataset as if validated."""
    from maemi_core.data.incoming import incoming_candidates
    from maemi_core.data.manifest import build_manifest

    profile, cfg, drop = project
    drop("lot-a", n=4)
    batch = cfg.incoming_path / "lot-a"
    outside = cfg.incoming_path.parent / "private" / "secret.png"
    outside.parent.mkdir(parents=True)
    shutil.copy(elpv_paths[10], outside)
    os.symlink(outside, batch / "defective" / "leak.png")                 # a valid image, out of the root
    os.symlink(outside.parent, batch / "functional" / "private_dir")      # a folder out of the root
    os.symlink(batch / "defective" / elpv_paths[0].name, batch / "defective" / "alias.png")   # within: fine

    rec = ingest_batch(cfg, "lot-a")
    reasons = {r["file"]: r["reason"] for r in rec["rejected"]}
    assert reasons == {"defective/leak.png": "link_outside_root", "functional/private_dir": "link_outside_root"}
    assert rec["images_per_class"] == {"defective": 3, "functional": 2}
    assert "defective/alias.png" in rec["files"] and "defective/leak.png" not in rec["files"]

    # After ingestion: one file added, one rewritten in place.
    added = batch / "functional" / "late.png"
    shutil.copy(elpv_paths[11], added)
    changed = batch / "defective" / elpv_paths[2].name
    shutil.copy(elpv_paths[12], changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))

    cands = {c.path.relative_to(batch).as_posix(): c for c in incoming_candidates(cfg)}
    refused = {k: c.rejected[0] for k, c in cands.items() if c.rejected is not None}
    assert refused == {"defective/leak.png": "link_outside_root", "functional/private_dir": "link_outside_root",
                       "functional/late.png": "added_after_ingestion",
                       f"defective/{elpv_paths[2].name}": "changed_after_ingestion"}
    accepted = sorted(k for k, c in cands.items() if c.rejected is None)
    assert accepted == sorted(set(rec["files"]) - {f"defective/{elpv_paths[2].name}"})

    # The manifest takes exactly those; the refused files are in the rejected table, and nothing
    # was read or copied through the outside links.
    result = build_manifest(cfg, candidates=incoming_candidates(cfg))
    assert not any("secret" in p or "leak" in p for p in result.manifest["path"])
    got = dict(zip(result.rejected["path"].map(lambda p: Path(p).relative_to(batch).as_posix()),
                   result.rejected["reason"]))
    assert got == refused
