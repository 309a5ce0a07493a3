"""Asset checks. Blocking checks stop downstream assets from consuming bad data."""

import dagster as dg
import pandas as pd

from maemi_core.data.manifest import imbalance_ratio, leaked_images, load_manifest, manifest_dir, split_counts
from maemi_core.data.splits import SPLITS
from maemi_dagster.assets.data import raw_images
from maemi_dagster.metadata import table_md
from maemi_dagster.resources import MaemiConfigResource


@dg.asset_check(asset=raw_images, blocking=True,
                description="No image content (sha256) appears in more than one split.")
def raw_images_no_split_leakage(maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    manifest = load_manifest(maemi_config.load())
    leaked = leaked_images(manifest)
    duplicated_ids = int(manifest["image_id"].duplicated().sum())
    return dg.AssetCheckResult(
        passed=leaked.empty and duplicated_ids == 0,
        metadata={"leaked_rows": len(leaked), "duplicated_image_ids": duplicated_ids},
    )


@dg.asset_check(asset=raw_images,
                description="Per-class counts per split and the imbalance ratio (largest / smallest class); "
                            "warns when a class is missing from a split or the ratio exceeds the profile's bound.")
def raw_images_class_balance(maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    cfg = maemi_config.load()
    manifest = load_manifest(cfg)
    counts = split_counts(manifest)
    per_class = counts.drop(index="total")
    wanted = [s for s, f in zip(SPLITS, (cfg.dataset.split.train, cfg.dataset.split.val, cfg.dataset.split.test)) if f > 0]
    empty_cells = [f"{label}/{split}" for label in per_class.index for split in wanted if per_class.loc[label, split] == 0]
    ratio = imbalance_ratio(manifest)
    return dg.AssetCheckResult(
        passed=not empty_cells and ratio <= cfg.dataset.max_imbalance_ratio,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "imbalance_ratio": ratio,
            "max_imbalance_ratio": cfg.dataset.max_imbalance_ratio,
            "empty_class_split_cells": ", ".join(empty_cells) or "none",
            "counts": table_md(counts),
        },
    )


@dg.asset_check(asset=raw_images,
                description="The fraction of rejected files stays under dataset.max_rejected_fraction.")
def raw_images_rejected_fraction(maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    cfg = maemi_config.load()
    manifest = load_manifest(cfg)
    rejected = pd.read_parquet(manifest_dir(cfg) / "rejected.parquet")
    total = len(manifest) + len(rejected)
    fraction = len(rejected) / total if total else 0.0
    return dg.AssetCheckResult(
        passed=fraction <= cfg.dataset.max_rejected_fraction,
        metadata={"rejected_fraction": fraction, "bound": cfg.dataset.max_rejected_fraction,
                  "n_rejected": len(rejected)},
    )


RAW_IMAGES_CHECKS = [raw_images_no_split_leakage, raw_images_class_balance, raw_images_rejected_fraction]
