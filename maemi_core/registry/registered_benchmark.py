"""Benchmarking a registered MAEMI version: the ``benchmark_tables`` step's entry point. It
downloads ``models:/maemi-<dataset>/<version>``, runs the benchmark
(:mod:`maemi_core.evaluation.benchmark_run`) and records the result in the registry: one MLflow
run with the key metrics and every report, ``benchmark.*`` tags on the version and the
per-record key scores promotion compares. The evaluation layer itself knows nothing of the
registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from maemi_core.config import MaemiConfig
from maemi_core.evaluation.benchmark_run import ASSET, reports_dir, run_benchmark
from maemi_core.run_isolation import stage_dir


def registered_version(cfg: MaemiConfig) -> str:
    """The model version ``maemi_model`` registered (``model/registered.json`` of this run, else
    of the latest published model stage)."""
    path = stage_dir(cfg, "model") / "registered.json"
    if not path.is_file():
        raise LookupError(f"no registered model at {path}: materialize maemi_model first")
    return str(json.loads(path.read_text())["version"])


def benchmark_registered_model(cfg: MaemiConfig, manifest: pd.DataFrame, records: list[dict], tracker=None,
                               log: Callable[[str], None] = lambda m: None, version: Optional[str] = None,
                               out_dir: Optional[Path] = None) -> dict:
    """Evaluate ``models:/maemi-<dataset>/<version>`` (the exact registered artifact) and record
    the result: one MLflow run with the key metrics and every report, the key metrics as
    ``benchmark.*`` tags on the model version, and per-record key scores (what promotion
    compares). ``version`` None: the version that ``maemi_model`` registered in this run (or, when
    this run did not train, the latest published one), never the moving ``challenger`` alias.
    Without tracking, the package that ``maemi_model`` last wrote is evaluated."""
    if tracker is None:
        result = run_benchmark(cfg, manifest, records, stage_dir(cfg, "model") / "package", log, "local package")
        return {"result": result, "version": None, "registered_model": None, "mlflow_run_id": None}
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    from maemi_core.model_registry import download_package, registered_model_name

    name = registered_model_name(cfg.dataset.name)
    pinned = version is None
    if pinned:
        version = registered_version(cfg)
    out_dir = out_dir or reports_dir(cfg)
    with tracker.run(ASSET if pinned else f"{ASSET}-v{version}") as active, tempfile.TemporaryDirectory() as tmp:
        package, version = download_package(name, version, tmp)
        log(f"evaluating {name} version {version}")
        result = run_benchmark(cfg, manifest, records, package, log, f"{name} version {version}", out_dir)
        bench = json.loads((out_dir / "benchmark.json").read_text())
        (out_dir / "benchmark.json").write_text(json.dumps(
            bench | {"registered_model": name, "version": str(version), "mlflow_run_id": active.info.run_id},
            indent=2, default=float))
        ev = cfg.evaluation
        mlflow.log_params({"registered_model": name, "model_version": version,
                           "records_per_task": ev.max_records_per_task,
                           "classification_max_images": ev.classification_max_images,
                           "repetition_penalty": ev.repetition_penalty, "no_repeat_ngram_size": ev.no_repeat_ngram_size,
                           "baselines": ",".join(b.name for b in ev.baselines) or "none"})
        mlflow.log_metrics({k.replace(".", "/"): v for k, v in result.key_metrics.items() if np.isfinite(v)}
                           | {"evaluation_tokens_per_s": result.evaluation_tokens_per_s})
        mlflow.log_artifacts(str(out_dir), artifact_path="reports")
        client = MlflowClient()
        for k, v in result.key_metrics.items():
            client.set_model_version_tag(name, version, f"benchmark.{k}", f"{v:.6f}")
        client.set_model_version_tag(name, version, "benchmark.mlflow_run_id", active.info.run_id)
        client.set_model_version_tag(name, version, "benchmark.records_hash", result.records_hash)
        client.set_model_version_tag(name, version, "benchmark.evaluation_hash", result.evaluation_hash)
        client.set_model_version_tag(name, version, "benchmark.records_per_task", str(ev.max_records_per_task))
        client.set_model_version_tag(name, version, "benchmark.classification_images",
                                     str(int(bench.get("classification_images", 0))))
        client.set_model_version_tag(name, version, "benchmark.category_scoring", str(bench.get("category_scoring")))
        return {"result": result, "version": version, "registered_model": name, "mlflow_run_id": active.info.run_id}
