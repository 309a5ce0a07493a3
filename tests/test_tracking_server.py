"""Promotion against a real MLflow tracking server on loopback that serves the artifacts itself
(`mlflow server --serve-artifacts`): a worker needs the server URL only, not a shared disk, to
read the per-record scores promotion compares."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from maemi_core.registry.model_promotion import key_scores, promote_if_not_worse, read_log
from maemi_core.model_registry import CHAMPION, alias_version
from tests.test_model_promotion import MARGINS, METEOR, OTHERS, scores


@pytest.fixture
def tracking_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--serve-artifacts", "--artifacts-destination",
         str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "mlflow server did not come up"
                time.sleep(0.5)
        yield url, tmp_path / "server-artifacts"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_promotion_reads_scores_through_the_server(tracking_server, tmp_path, monkeypatch):
    url, served = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    try:
        client = MlflowClient(url)
        client.create_registered_model("maemi-test")
        exp = client.create_experiment("bench")          # the server chooses the artifact location
        assert client.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")

        def version(maemi: pd.DataFrame) -> str:
            d = tmp_path / f"local-{len(list(tmp_path.glob('local-*')))}"
            d.mkdir()
            pd.concat([maemi, OTHERS]).to_csv(d / "key_scores.csv", index=False)
            with mlflow.start_run(experiment_id=exp) as run:
                mlflow.log_artifact(str(d / "key_scores.csv"), artifact_path="reports/samples")
            v = client.create_model_version("maemi-test", source=f"{run.info.artifact_uri}/reports",
                                            run_id=run.info.run_id).version
            client.set_model_version_tag("maemi-test", v, "benchmark.mlflow_run_id", run.info.run_id)
            client.set_model_version_tag("maemi-test", v, "benchmark.evaluation_hash", "h1")
            return str(v)

        v1 = version(scores())
        v2 = version(scores(meteor=METEOR + 0.05))
        # the files live only where the server put them; the client reads them over HTTP
        assert len(list(served.rglob("key_scores.csv"))) == 2
        assert len(key_scores(client, "maemi-test", v2)) == len(scores()) + len(OTHERS)
        lock, log = tmp_path / "registry.lock", tmp_path / "promotion_log.csv"
        assert promote_if_not_worse("maemi-test", v1, MARGINS, lock, log).promote
        d2 = promote_if_not_worse("maemi-test", v2, MARGINS, lock, log)
        assert d2.promote and alias_version("maemi-test", CHAMPION) == v2
        assert list(read_log(log)["decision"]) == ["promoted", "promoted"]
    finally:
        mlflow.set_tracking_uri(None)
