"""Data stage: the validated image manifest."""

import dagster as dg
import mlflow

from maemi_core.code_version import code_version
from maemi_core.data.manifest import (
    build_manifest, imbalance_ratio, manifest_dir, save_manifest, split_counts,
)
from maemi_core.data.preview import preview_grid
from maemi_core.data.sample_groups import group_table
from maemi_core.run_isolation import publish
from maemi_core.tracking import log_input
from maemi_dagster.metadata import image_md, table_md
from maemi_dagster.resources import MaemiConfigResource, MLflowResource

OWNERS = ["team:maemi-ml"]


@dg.asset(
    group_name="data",
    code_version=code_version("raw_images"),
    owners=OWNERS,
    kinds={"pandas", "parquet", "mlflow"},
    description=(
        "Validated manifest of the configured dataset: one row per distinct image "
        "(image_id = sha256 of the bytes) with label, hash-stable split, size, mode, bit depth, "
        "source and pixel size. Undecodable, empty, truncated or unsupported files are listed in "
        "`rejected` (and copied to quarantine/), not fatal."
    ),
)
def raw_images(
    context: dg.AssetExecutionContext,
    maemi_config: MaemiConfigResource,
    mlflow_tracking: MLflowResource,
) -> dg.MaterializeResult:
    cfg = maemi_config.load(context, writes="raw_images")
    result = build_manifest(cfg, log=context.log.info)
    out_dir = manifest_dir(cfg)
    paths = save_manifest(result, out_dir)
    grid = preview_grid(result.manifest, out_dir / "preview.png")
    counts = split_counts(result.manifest)

    with mlflow_tracking.start_run(context, cfg) as run:
        mlflow.log_params({
            "dataset": cfg.dataset.name, "kind": cfg.dataset.kind, "private": cfg.dataset.private,
            "split_train": cfg.dataset.split.train, "split_val": cfg.dataset.split.val,
            "split_test": cfg.dataset.split.test, "max_per_class": cfg.dataset.max_per_class,
            "crop_databar": cfg.dataset.crop_databar, "data_version": result.data_version,
        })
        mlflow.log_metrics({
            "n_images": len(result.manifest), "n_rejected": len(result.rejected),
            "n_duplicates": len(result.duplicates), "rejected_fraction": result.rejected_fraction,
            "imbalance_ratio": imbalance_ratio(result.manifest),
        })
        log_input(
            mlflow.data.from_pandas(result.manifest.drop(columns=["path"]), name=cfg.dataset.name,
                                    digest=result.data_version),
            context="raw_images",
        )
        for key in ("manifest", "rejected", "duplicates", "summary"):
            mlflow.log_artifact(str(paths[key]), artifact_path="raw_images")
        mlflow.log_artifact(str(grid), artifact_path="raw_images")
        mlflow_run_id = run.info.run_id

    rejected_by_reason = result.rejected["reason"].value_counts().rename_axis("reason").to_frame("files")
    m = result.manifest
    groups: dict = {"sample_groups": int(m["group_id"].nunique()),
                    "test_samples_in_training": int(m["test_sample_in_training"].sum())}
    if cfg.dataset.group_by and m["sample"].notna().any():
        groups["largest_groups"] = table_md(group_table(m), index=False)
        top = group_table(m, top=4)["group_id"]
        shown = m[m["group_id"].isin(top)].assign(label=lambda d: d["sample"].fillna(d["group_id"].str[:12]))
        groups["group_preview"] = image_md(preview_grid(shown, out_dir / "groups.png", per_class=6),
                                           "images of the largest sample groups")
    publish(cfg, data_version=result.data_version)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.data_version),
        metadata={
            "dagster/row_count": len(result.manifest),
            "n_rejected": len(result.rejected),
            "n_duplicates": len(result.duplicates),
            "rejected_fraction": result.rejected_fraction,
            "imbalance_ratio": imbalance_ratio(result.manifest),
            "empty_class_folders": ", ".join(result.empty_classes) or "none",
            "counts_per_split_and_class": table_md(counts),
            "rejected_by_reason": table_md(rejected_by_reason) if len(result.rejected) else dg.MetadataValue.md("none"),
            "rejected_files": table_md(result.rejected, index=False) if len(result.rejected) else dg.MetadataValue.md("none"),
            "preview": image_md(grid, "samples per class"),
            "manifest_path": dg.MetadataValue.path(str(paths["manifest"])),
            "data_version": result.data_version,
            "mlflow_run_id": mlflow_run_id,
            **groups,
        },
    )
