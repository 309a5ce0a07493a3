"""Promotion rules on fixed metric sets, concurrent challengers, and rollback, against a real
MLflow registry (sqlite)."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from maemi_core.registry.model_promotion import compare, promote_if_not_worse, read_log, rollback
from maemi_core.registry.model_registry import CHAMPION, alias_version

TOL = {"classification.zero_shot_top1": 0.02, "vqa.meteor": 0.01, "vqa.rougeL": 0.01}
BASE = {"classification.zero_shot_top1": 0.60, "vqa.meteor": 0.30, "vqa.rougeL": 0.40}


def test_rules_better_worse_within_tolerance_first_and_missing():
    better = compare({**BASE, "vqa.meteor": 0.35}, BASE, TOL)
    assert better.promote and all(r["ok"] for r in better.rows)
    within = compare({**BASE, "vqa.rougeL": 0.395}, BASE, TOL)   # 0.005 worse, tolerance 0.01
    assert within.promote
    worse = compare({**BASE, "classification.zero_shot_top1": 0.55, "vqa.meteor": 0.5}, BASE, TOL)
    assert not worse.promote and "classification.zero_shot_top1" in worse.reason and "vqa.meteor" not in worse.reason
    first = compare(BASE, None, TOL)
    assert first.promote and "first" in first.reason
    missing = compare({"vqa.meteor": 0.9}, BASE, TOL)
    assert not missing.promote and "missing" in missing.reason
    assert list(worse.table().columns) == ["metric", "challenger", "champion", "tolerance", "delta", "ok"]


@pytest.fixture
def registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    client.create_registered_model("maemi-test")

    def version(metrics: dict, records_hash: str = "h1") -> str:
        v = client.create_model_version("maemi-test", source=str(tmp_path / "pkg")).version
        for k, val in metrics.items():
            client.set_model_version_tag("maemi-test", v, f"benchmark.{k}", str(val))
        client.set_model_version_tag("maemi-test", v, "benchmark.records_hash", records_hash)
        return str(v)

    yield client, version, tmp_path / "registry.lock", tmp_path / "promotion_log.csv"
    mlflow.set_tracking_uri(None)


def test_first_better_worse_and_rollback_are_recorded(registry):
    client, version, lock, log = registry
    v1 = version(BASE)
    assert promote_if_not_worse("maemi-test", v1, TOL, lock, log, run_id="r1").promote
    assert alias_version("maemi-test", CHAMPION) == v1
    v2 = version({**BASE, "vqa.meteor": 0.40})
    assert promote_if_not_worse("maemi-test", v2, TOL, lock, log, run_id="r2").promote
    v3 = version({**BASE, "vqa.meteor": 0.20})
    d3 = promote_if_not_worse("maemi-test", v3, TOL, lock, log, run_id="r3")
    assert not d3.promote and alias_version("maemi-test", CHAMPION) == v2
    tags = client.get_model_version("maemi-test", v3).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.previous_champion"] == v2
    assert tags["promotion.dagster_run_id"] == "r3" and "vqa.meteor" in tags["promotion.reason"]
    v4 = version(BASE, records_hash="other")           # measured on different records: never compared
    assert not promote_if_not_worse("maemi-test", v4, TOL, lock, log).promote

    assert rollback("maemi-test", lock, log) == (v2, v1)
    assert alias_version("maemi-test", CHAMPION) == v1
    assert client.get_model_version("maemi-test", v1).tags["rollback.previous_champion"] == v2
    with pytest.raises(LookupError, match="nothing to roll back"):
        rollback("maemi-test", lock, log)               # v1 was the first champion
    entries = read_log(log)
    assert list(entries["action"]) == ["promote"] * 4 + ["rollback"]
    assert list(entries["decision"]) == ["promoted", "promoted", "rejected", "rejected", "rolled back"]
    assert list(entries["champion_after"]) == [v1, v2, v2, v2, v1]


def test_concurrent_challengers_never_leave_a_worse_champion(registry):
    client, version, lock, log = registry
    v0 = version(BASE)
    promote_if_not_worse("maemi-test", v0, TOL, lock, log)
    strong = version({**BASE, "vqa.meteor": 0.50})
    weak = version({**BASE, "vqa.meteor": 0.40})        # better than v0, worse than `strong`
    barrier = threading.Barrier(2)
    errors = []

    def run(v: str, delay: float) -> None:
        try:
            barrier.wait()
            time.sleep(delay)
            # the pause between reading the champion and moving the alias is where an unlocked
            # version lets the weaker challenger overwrite the stronger one
            promote_if_not_worse("maemi-test", v, TOL, lock, log, _between=lambda: time.sleep(0.3))
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(strong, 0.0)), threading.Thread(target=run, args=(weak, 0.05))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert alias_version("maemi-test", CHAMPION) == strong
    decisions = read_log(log).set_index("version")["decision"]
    assert decisions[strong] == "promoted" and decisions[weak] == "rejected"


def test_a_registry_that_answers_500_fails_promotion_loudly_and_moves_nothing(registry, tmp_path, monkeypatch):
    """A tracking server answering 500 (a loopback HTTP server) must never read as "no champion
    yet": the promotion raises, naming the server, instead of promoting without comparison."""
    import http.server

    from maemi_core.registry.model_registry import RegistryError

    client, version, lock, log = registry
    v1 = version(BASE)
    promote_if_not_worse("maemi-test", v1, TOL, lock, log)
    seen = []

    class Broken(http.server.BaseHTTPRequestHandler):
        def _fail(self):
            seen.append(self.path)
            body = b'{"error_code": "INTERNAL_ERROR", "message": "database is down"}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = _fail

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    sqlite_uri = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(url)              # (MLflow also exports it as MLFLOW_TRACKING_URI)
        with pytest.raises(RegistryError, match=r"127\.0\.0\.1.*Nothing was promoted"):
            promote_if_not_worse("maemi-test", "2", TOL, lock, log)
        with pytest.raises(RegistryError):
            alias_version("maemi-test", CHAMPION)
    finally:
        server.shutdown()
        server.server_close()
        mlflow.set_tracking_uri(sqlite_uri)                            # the fixture's sqlite registry
    assert seen                                                     # the server was really asked
    assert alias_version("maemi-test", CHAMPION) == v1
    assert list(read_log(log)["version"]) == [v1]                   # no decision was recorded for the failure


def test_a_missing_alias_or_model_is_none_not_an_error(registry):
    assert alias_version("maemi-test", CHAMPION) is None            # model exists, alias does not
    assert alias_version("maemi-nothing", CHAMPION) is None         # model does not exist
