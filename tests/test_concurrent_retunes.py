"""Two `retune` runs started together against one Dagster instance, as two real processes
(`dagster job execute`), with no run-queue limit and no pool limit (the worst case the shipped
queue prevents): both finish, each registers, benchmarks and judges its own version, and no file
of one run appears in the other's outputs. The queue itself (one retune per dataset at a time)
is tested in test_operations.py with Dagster's own queue daemon."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from maemi_core.config import load_config
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def test_two_retunes_at_once_each_register_benchmark_and_judge_their_own_version(tmp_path):
    (tmp_path / "configs").mkdir()
    profile = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    # No pool limit below, so two torch steps may run at once: each takes half the cores.
    profile["operations"] = {**profile.get("operations", {}), "torch_steps_at_once": 2}
    # Kept small: the encoder that needs no training (so `retune` needs nothing materialized before
    # it), the tasks that the key metrics read, one epoch, no external baseline, no rank sweep.
    profile["dataset"]["max_per_class"] = 8
    profile["vision"]["encoder"] = "efficientnet_lite0"
    profile["teacher"]["tasks"] = ["vqa", "classify_zero_shot"]
    profile["teacher"]["concise_tasks"] = ["vqa"]
    profile["model"] |= {"train_budget": {"epochs": 1, "eval_points": 1}, "train_tasks": ["vqa", "classify_zero_shot"]}
    profile["evaluation"] |= {"baselines": [], "rank_sweep": [8], "qualitative_samples": 0}
    (tmp_path / "configs" / "tiny.yaml").write_text(yaml.safe_dump(profile))
    cfg = load_config(tmp_path / "configs" / "tiny.yaml")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "MAEMI_CONFIG": str(tmp_path / "configs" / "tiny.yaml"), "DAGSTER_HOME": str(home),
        "MAEMI_ROOT": str(tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true"}

    def dagster(*args: str) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "dagster"), *args, "-m", "maemi_dagster.definitions"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # The instance and the tracking store exist before the runs (as under `dagster dev`: two
    # processes creating one fresh sqlite schema at once race in its migrations).
    instance = dg.DagsterInstance.from_config(str(home))
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    client = MlflowClient(uri)
    client.search_experiments()

    runs = [dagster("job", "execute", "-j", "retune") for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in runs]
    for out in outs:   # step timings, for the record (pytest -s)
        print("\n".join(line[-160:] for line in out.splitlines() if "STEP_SUCCESS" in line or "STEP_FAILURE" in line))

    retunes = instance.get_runs(filters=dg.RunsFilter(job_name="retune"))
    assert len(retunes) == 2, outs
    name = "maemi-elpv-tiny"
    own: dict[str, str] = {}
    for run in retunes:
        folder = cfg.workdir_path / "runs" / run.run_id
        failed = [out[-6000:] for out in outs if "STEP_FAILURE" in out]
        assert (folder / "model" / "registered.json").is_file(), "a retune step failed:\n" + "\n=====\n".join(failed)
        registered = json.loads((folder / "model" / "registered.json").read_text())
        bench = json.loads((folder / "reports" / "benchmark.json").read_text())
        assert registered["dagster_run_id"] == run.run_id
        assert bench["version"] == registered["version"]                      # benchmarked its own version
        tags = client.get_model_version(name, registered["version"]).tags
        assert tags["dagster_run_id"] == run.run_id
        bench_run = client.get_run(tags["benchmark.mlflow_run_id"])
        assert bench_run.data.tags["dagster.run_id"] == run.run_id
        assert bench_run.data.params["model_version"] == registered["version"]
        own[run.run_id] = registered["version"]
    assert sorted(own.values()) == ["1", "2"]
    # Files of one run never mention the other run.
    for run_id in own:
        other = next(r for r in own if r != run_id)
        for f in (cfg.workdir_path / "runs" / run_id).rglob("*"):
            if f.is_file() and f.suffix in (".json", ".jsonl", ".csv", ".md"):
                assert other not in f.read_text(errors="ignore"), f
    # Each promotion decision is about the version its run registered; the first becomes champion.
    log = pd.read_csv(cfg.workdir_path / "registry" / "promotion_log.csv", dtype=str).fillna("")
    for _, row in log.iterrows():
        assert own[row["dagster_run_id"]] == row["version"], log
    promoted = log[log["decision"] == "promoted"]
    assert len(promoted) >= 1
    mlflow.set_tracking_uri(uri)
    try:
        champion = client.get_model_version_by_alias(name, "champion").version
    finally:
        mlflow.set_tracking_uri(None)
    assert str(champion) == promoted["version"].iloc[-1]
    # One decision per run, recorded by model_promotion's comparison under the registry lock;
    # promoted or rejected, the run succeeded (a rejection is a decision, not a failure).
    for run in retunes:
        decided = log[log["dagster_run_id"] == run.run_id]
        assert len(decided) == 1, (log, outs)
        assert run.status == dg.DagsterRunStatus.SUCCESS
