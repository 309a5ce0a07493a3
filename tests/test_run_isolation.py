"""Run isolation: each run writes its own stage folders, reads its own or the latest published
ones, and publication is an atomic switch; MLflow runs left RUNNING by a dead Dagster run are
closed as FAILED."""

from __future__ import annotations

import threading

import mlflow
from mlflow.tracking import MlflowClient

from maemi_core.tracking import TAG_ASSET, TAG_DAGSTER_RUN, TrackingContext
from maemi_core.run_isolation import COMPLETE, prune, publish, scoped, stage_dir


def test_two_runs_write_apart_and_read_their_own_or_the_published_copy(profile_factory):
    cfg = profile_factory()
    base = cfg.workdir_path
    # Before run isolation the workdir held plain folders: they keep working and are adopted.
    (base / "instructions").mkdir(parents=True)
    (base / "instructions" / "old.txt").write_text("legacy")

    a_writes = scoped(cfg, "run-a", "instructions")
    b_writes = scoped(cfg, "run-b", "instructions")
    (stage_dir(a_writes, "instructions") / "records.txt").write_text("a")
    (stage_dir(b_writes, "instructions") / "records.txt").write_text("b")
    assert stage_dir(a_writes, "instructions") != stage_dir(b_writes, "instructions")

    # Not published yet: a reader in a third run sees the legacy copy.
    reader = scoped(cfg, "run-c")
    assert (stage_dir(reader, "instructions") / "old.txt").read_text() == "legacy"
    publish(a_writes)
    assert (base / "instructions").is_symlink()
    assert (stage_dir(reader, "instructions") / "records.txt").read_text() == "a"
    assert any(p.name == "instructions" and (p / "old.txt").is_file() for p in (base / "runs").glob("legacy-*/*"))
    # Run b reads its own copy even after a published another; once b publishes, it is the latest.
    b_reads = scoped(cfg, "run-b")
    assert not (stage_dir(b_writes, "instructions") / COMPLETE).exists()
    assert (stage_dir(b_reads, "instructions") / "records.txt").read_text() == "a"   # b's is incomplete
    publish(b_writes)
    assert (stage_dir(b_reads, "instructions") / "records.txt").read_text() == "b"
    assert (stage_dir(scoped(cfg, "run-a"), "instructions") / "records.txt").read_text() == "a"
    assert (stage_dir(cfg, "instructions") / "records.txt").read_text() == "b"          # unscoped: latest
    # A reader resolves the published copy once: a later publication does not switch its files.
    pinned = stage_dir(reader, "instructions")
    publish(scoped(cfg, "run-d", "instructions"))
    assert (pinned / "records.txt").read_text() == "b"


def test_concurrent_publications_leave_one_valid_link_and_pruning_keeps_the_published(profile_factory):
    cfg = profile_factory()
    runs = [scoped(cfg, f"run-{i}", "reports") for i in range(12)]
    for r in runs:
        (stage_dir(r, "reports") / "who.txt").write_text(r._run_scope)
    barrier = threading.Barrier(len(runs))

    def go(r):
        barrier.wait()
        publish(r, keep=100)

    threads = [threading.Thread(target=go, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    link = cfg.workdir_path / "reports"
    assert link.is_symlink() and (link / "who.txt").read_text() in {r._run_scope for r in runs}
    assert not list(cfg.workdir_path.glob(".reports.*"))           # no temporary links left behind
    published = link.resolve()
    unfinished = scoped(cfg, "still-writing", "reports")
    stage_dir(unfinished, "reports")
    prune(cfg, "reports", keep=2)
    left = {p.resolve() for p in (cfg.workdir_path / "runs").glob("*/reports")}
    assert published in left and stage_dir(unfinished, "reports").resolve() in left
    assert len(left) <= 4                                          # 2 newest + published + the unfinished one


def test_an_mlflow_run_left_running_by_a_dead_dagster_run_is_closed_as_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ops", artifact_location=(tmp_path / "a").as_uri())
    killed = client.create_run(exp, tags={TAG_DAGSTER_RUN: "dead-run", TAG_ASSET: "maemi_model"})
    child = client.create_run(exp, tags={TAG_DAGSTER_RUN: "dead-run", TAG_ASSET: "maemi_model",
                                         "mlflow.parentRunId": killed.info.run_id})
    alive = client.create_run(exp, tags={TAG_DAGSTER_RUN: "live-run", TAG_ASSET: "maemi_model"})
    other_asset = client.create_run(exp, tags={TAG_DAGSTER_RUN: "dead-run", TAG_ASSET: "raw_images"})
    ctx = TrackingContext(uri, "ops", "new-run", "tiny", run_is_dead=lambda rid: rid == "dead-run")
    try:
        with ctx.run("maemi_model") as run:
            assert run.data.tags[TAG_DAGSTER_RUN] == "new-run"
    finally:
        mlflow.set_tracking_uri(None)
    status = [client.get_run(r.info.run_id).info.status for r in (killed, child, alive, other_asset)]
    assert status == ["FAILED", "FAILED", "RUNNING", "RUNNING"]
    assert "new-run" in client.get_run(killed.info.run_id).data.tags["maemi.closed_by"]


def test_a_worker_that_does_not_see_the_shared_workdir_fails_clearly(profile_factory, monkeypatch):
    import socket

    import pytest

    from maemi_core.cli import main
    from maemi_core.run_isolation import WorkdirNotShared, check_shared, declare_shared
    from maemi_dagster.resources import MaemiConfigResource

    cfg = profile_factory()
    with pytest.raises(WorkdirNotShared, match=str(cfg.workdir_path)) as err:
        check_shared(cfg)
    assert socket.gethostname() in str(err.value) and "same path on every worker" in str(err.value)

    class Run:
        run_id, tags = "r1", {}

    class Ctx:
        run = Run()

    resource = MaemiConfigResource(path=str(cfg.config_path))
    monkeypatch.setenv("MAEMI_EXECUTOR", "celery")
    with pytest.raises(WorkdirNotShared):
        resource.load(Ctx(), writes="raw_images")      # a step of a distributed run refuses to start
    assert main(["--config", str(cfg.config_path), "workdir", "check"]) == 1
    first = declare_shared(cfg)
    assert main(["--config", str(cfg.config_path), "workdir", "declare-shared"]) == 0   # idempotent: same id
    assert check_shared(cfg)["id"] == __import__("json").loads(first.read_text())["id"]
    assert resource.load(Ctx(), writes="raw_images")._run_scope == "r1"
    assert main(["--config", str(cfg.config_path), "workdir", "check"]) == 0


def test_a_reexecuted_or_forced_step_writes_a_new_folder_and_never_through_a_published_or_adopted_copy(
        profile_factory):
    from maemi_core.run_isolation import adopt, reusable

    cfg = profile_factory()
    base = cfg.workdir_path
    first = scoped(cfg, "run-a", "model")
    (stage_dir(first, "model") / "weights.txt").write_text("v1")
    publish(first, inputs="same")
    published = (base / "model").resolve()

    # The same root run re-executed (or forced): its folder is complete and published, so the
    # step writes a new attempt; the published files stay as they were until it publishes.
    again = scoped(cfg, "run-a", "model")
    target = stage_dir(again, "model")
    assert target != published and target.name == "model@1" and stage_dir(again, "model") == target
    (target / "weights.txt").write_text("v2")
    assert (published / "weights.txt").read_text() == "v1"
    assert (stage_dir(scoped(cfg, "run-a"), "model") / "weights.txt").read_text() == "v1"   # not complete yet
    publish(again, inputs="same")
    assert (base / "model").resolve() == target.resolve()
    assert (stage_dir(scoped(cfg, "run-a"), "model") / "weights.txt").read_text() == "v2"   # newest attempt
    assert (published / "weights.txt").read_text() == "v1"

    # Another run adopts the published copy (inputs unchanged), then is forced to recompute:
    # it writes its own folder, never through the link into the adopted copy.
    reuser = scoped(cfg, "run-b", "model")
    link = adopt(reuser, reusable(reuser, "same"))
    assert link.is_symlink()
    forced = scoped(cfg, "run-b", "model")
    fresh = stage_dir(forced, "model")
    assert not fresh.is_symlink() and fresh.resolve() != target.resolve()
    (fresh / "weights.txt").write_text("v3")
    assert (target / "weights.txt").read_text() == "v2"


def test_pruning_keeps_an_old_copy_that_a_run_still_links_to(profile_factory):
    from maemi_core.run_isolation import adopt, reusable

    cfg = profile_factory()
    old = scoped(cfg, "run-old", "reports")
    (stage_dir(old, "reports") / "table.csv").write_text("old")
    publish(old, inputs="fp-old")
    reader = scoped(cfg, "run-reader", "reports")
    adopt(reader, reusable(reader, "fp-old"))                # a run reading the old copy
    for i in range(5):                                       # newer publications push it out of the newest 2
        newer = scoped(cfg, f"run-{i}", "reports")
        (stage_dir(newer, "reports") / "table.csv").write_text(str(i))
        publish(newer, keep=2, inputs=f"fp-{i}")
    assert (stage_dir(old, "reports") / "table.csv").read_text() == "old"
    assert (stage_dir(scoped(cfg, "run-reader"), "reports") / "table.csv").read_text() == "old"
    unlinked = [p for p in (cfg.workdir_path / "runs").glob("run-[0-9]/reports")]
    assert len(unlinked) == 2                                  # the others were pruned as before
