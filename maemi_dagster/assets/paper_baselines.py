"""The paper's comparison tables 7 and 8: one partition of ``paper_baseline`` per row (each can
be materialized, retried and compared alone; under the Celery executor, partitions launched
together run on different workers), and ``paper_tables`` over all of them."""

import contextlib
import json
from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd

from maemi_core.code_version import code_version
from maemi_core.data.manifest import load_manifest, manifest_hash
from maemi_core.data.transforms import cached_image_array
from maemi_core.run_isolation import data_version, fingerprint, publish, stage_dir
from maemi_core.threads import fit_threads
from maemi_core.vision.classification_metrics import loss_curve_figure
from maemi_core.vision.paper_baselines.baseline_training import Budget, split_data, train_row
from maemi_core.vision.paper_baselines.paper_tables import (
    build_tables, result_dir, results_root, write_failure, write_result,
)
from maemi_core.vision.paper_baselines.zoo import ROWS, row
from maemi_dagster.assets.data import OWNERS, raw_images
from maemi_dagster.assets.evaluation import benchmark_tables
from maemi_dagster.executor import TORCH_POOL, TORCH_STEP
from maemi_dagster.metadata import image_md, table_md
from maemi_dagster.resources import MaemiConfigResource, MLflowResource

BASELINE_CODE = code_version("paper_baseline")
TABLES_CODE = code_version("paper_tables")
ROW_PARTITIONS = dg.StaticPartitionsDefinition([r.method for r in ROWS if not r.unavailable])


def row_fingerprint(cfg, method: str) -> str:
    """What a row's result depends on: the code, the profile's budget section, the data, the row."""
    return fingerprint(BASELINE_CODE, cfg.paper_baselines.model_dump(mode="json"), data_version(cfg, "raw_images"),
                       method)


@contextlib.contextmanager
def row_lock(cfg, folder: Path, timeout_s: float):
    """One training of a row and its inputs at a time: a second run of the same partition waits,
    then reuses the first one's result (across hosts: the shared database's advisory lock)."""
    from maemi_core.shared_database import advisory_lock, host_file_lock, shared_database_url

    url = shared_database_url(cfg)
    if url:
        with advisory_lock(url, f"paper_baseline:{folder.parent.name}:{folder.name}", timeout_s=timeout_s):
            yield
        return
    with host_file_lock(folder / ".lock", timeout_s, f"{folder} (another run training this row)", poll_s=1.0):
        yield


def budget(cfg) -> Budget:
    b = cfg.paper_baselines
    return Budget(b.epochs, b.minutes, b.batch_size, b.lr, b.seed, b.model_size, b.image_size, b.graph_grid,
                  b.graph_hidden, b.graph_layers)


@dg.asset(
    partitions_def=ROW_PARTITIONS,
    op_tags=TORCH_STEP, pool=TORCH_POOL,
    group_name="paper_baselines",
    code_version=BASELINE_CODE,
    owners=OWNERS,
    kinds={"pytorch", "mlflow"},
    deps=[raw_images],
    description=(
        "One row of the paper's Table 7 (ConvNets, vision transformers, vision self-supervised learning) or "
        "Table 8 (graph neural networks, graph contrastive learning), trained from scratch on the manifest's train "
        "split, selected on val and scored on the test split, under the budget of the profile's paper_baselines "
        "section. Result under <workdir>/paper_baselines/<row>/<input fingerprint>/; one MLflow run per row."
    ),
)
def paper_baseline(context: dg.AssetExecutionContext, maemi_config: MaemiConfigResource,
                   mlflow_tracking: MLflowResource) -> dg.MaterializeResult:
    cfg = maemi_config.load(context)
    method = context.partition_key
    fp = row_fingerprint(cfg, method)
    folder = result_dir(cfg, method, fp)
    # a run of the same row that is training holds the lock for at most its budget and scoring
    with row_lock(cfg, folder, timeout_s=60 * (2 * cfg.paper_baselines.minutes + 30)):
        return _train_or_reuse(context, cfg, method, fp, folder, mlflow_tracking)


def _train_or_reuse(context, cfg, method: str, fp: str, folder: Path, mlflow_tracking) -> dg.MaterializeResult:
    if (folder / "result.json").is_file():
        result = json.loads((folder / "result.json").read_text())
        context.log.info(f"{method}: reusing the result for the same data, code and budget ({folder})")
        return dg.MaterializeResult(metadata={"reused": True, "top1": float(result["top1"]),
                                              "result": dg.MetadataValue.path(str(folder))},
                                    data_version=dg.DataVersion(fp))
    fit_threads(cfg)
    manifest = load_manifest(cfg)
    b = budget(cfg)
    images = cached_image_array(manifest, b.image_size, cfg.workdir_path / "cache", manifest_hash(manifest))
    data = split_data(manifest, images)
    tracker = mlflow_tracking.tracking_context(context, cfg)
    try:
        with tracker.run(f"paper_baseline-{method}"):
            mlflow.log_params({"row": method, **{f"budget.{k}": v for k, v in b.__dict__.items()}})
            result = train_row(row(method), data, b, folder, log=context.log.info,
                               checkpoints=folder / "runs" / (getattr(cfg, "_run_scope", None) or "local"))
            history = pd.read_csv(folder / "history.csv")
            if "val_loss" not in history:
                history["val_loss"] = float("nan")      # pretraining: no validation loss
            figure = loss_curve_figure(history, f"{method} ({result['family']})", folder / "loss_curve.png")
            mlflow.log_metrics({k: float(result[k]) for k in ("top1", "top5", "macro_f1", "balanced_accuracy",
                                                               "train_minutes")})
            mlflow.log_artifact(str(figure))
            mlflow.log_artifact(str(folder / "history.csv"))
    except Exception as error:          # the table marks the row failed; the other partitions are untouched
        write_failure(folder, method, error)
        raise
    write_result(folder, result, data.image_ids["test"])
    return dg.MaterializeResult(
        metadata={"top1": float(result["top1"]), "top1_interval": f"[{result['top1_ci_low']:.3f}, "
                  f"{result['top1_ci_high']:.3f}]", "top5": float(result["top5"]), "family": result["family"],
                  "source": result["source"], "train_minutes": float(result["train_minutes"]),
                  "params": int(result["params"]), "loss_curve": image_md(figure, f"{method} loss"),
                  "result": dg.MetadataValue.path(str(folder))},
        data_version=dg.DataVersion(fp))


@dg.asset(
    group_name="paper_baselines",
    code_version=TABLES_CODE,
    owners=OWNERS,
    kinds={"pandas"},
    deps=[dg.AssetDep(paper_baseline, partition_mapping=dg.AllPartitionMapping()), raw_images, benchmark_tables],
    description=(
        "reports/table7_vision_baselines.csv and table8_graph_baselines.csv: every row of the paper's Tables 7 "
        "and 8 (trained, failed with its error, not run, or unable to run here with the reason) beside MAEMI's "
        "zero-/few-shot rows and the project's probes, all on the same test images, with a bar chart of top-1."
    ),
)
def paper_tables(context: dg.AssetExecutionContext, maemi_config: MaemiConfigResource,
                 mlflow_tracking: MLflowResource) -> dg.MaterializeResult:
    cfg = maemi_config.load(context, writes="paper_tables")
    manifest = load_manifest(cfg)
    class_names = sorted(manifest["label"].unique())
    test = manifest[manifest["split"] == "test"]
    labels = dict(zip(test["image_id"].astype(str), test["label"].map({c: i for i, c in enumerate(class_names)})))
    fps = {r.method: row_fingerprint(cfg, r.method) for r in ROWS if not r.unavailable}
    out = stage_dir(cfg, "paper_tables")
    reports = stage_dir(cfg, "reports")
    paths = build_tables(cfg, fps, class_names, labels, out, reports if reports.is_dir() else None)
    tracker = mlflow_tracking.tracking_context(context, cfg)
    with tracker.run("paper_tables"):
        for p in paths.values():
            mlflow.log_artifact(str(p), artifact_path="paper_tables")
    t7 = pd.read_csv(paths["table7_csv"])
    t8 = pd.read_csv(paths["table8_csv"])
    shown = ["method", "family", "status", "top1", "top1_ci_low", "top1_ci_high", "top5", "train_minutes"]
    inputs = fingerprint(TABLES_CODE, fps, str(results_root(cfg)))
    publish(cfg, inputs=inputs, data_version=inputs)
    return dg.MaterializeResult(metadata={
        "table7": table_md(t7[shown], index=False, max_rows=60), "table8": table_md(t8[shown], index=False, max_rows=60),
        "rows_ok": int((t7["status"] == "ok").sum() + (t8["status"] == "ok").sum()),
        "rows_failed": int(t7["status"].str.startswith("failed").sum() + t8["status"].str.startswith("failed").sum()),
        "table7_chart": image_md(paths["table7_figure"], "Table 7 top-1"),
        "table8_chart": image_md(paths["table8_figure"], "Table 8 top-1"),
        "reports": dg.MetadataValue.path(str(out))})
