"""Asset checks. Blocking checks stop downstream assets from consuming bad data."""

import json

import dagster as dg
import pandas as pd

from maemi_core.data.manifest import imbalance_ratio, leaked_images, load_manifest, manifest_dir, split_counts
from maemi_core.data.splits import SPLITS
from maemi_core.registry.model_promotion import gate_challenger
from maemi_core.teacher.instruction_set import failure_table, load_failed, load_instruction_set, validate_records
from maemi_core.threads import fit_threads
from maemi_dagster.assets.data import raw_images
from maemi_dagster.assets.evaluation import benchmark_tables
from maemi_dagster.assets.teacher import instruction_set
from maemi_dagster.assets.vision import vit_classifier
from maemi_dagster.executor import TORCH_POOL, TORCH_STEP
from maemi_dagster.metadata import table_md
from maemi_dagster.resources import MaemiConfigResource, MLflowResource


@dg.asset_check(asset=raw_images, blocking=True,
                description="No image content (sha256) appears in more than one split.")
def raw_images_no_split_leakage(context: dg.AssetCheckExecutionContext, maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    manifest = load_manifest(maemi_config.load(context))
    leaked = leaked_images(manifest)
    duplicated_ids = int(manifest["image_id"].duplicated().sum())
    return dg.AssetCheckResult(
        passed=leaked.empty and duplicated_ids == 0,
        metadata={"leaked_rows": len(leaked), "duplicated_image_ids": duplicated_ids},
    )


@dg.asset_check(asset=raw_images,
                description="Per-class counts per split and the imbalance ratio (largest / smallest class); "
                            "warns when a class is missing from a split or the ratio exceeds the profile's bound.")
def raw_images_class_balance(context: dg.AssetCheckExecutionContext, maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    cfg = maemi_config.load(context)
    manifest = load_manifest(cfg)
    counts = split_counts(manifest)
    per_class = counts.drop(index="total")
    wanted = [s for s, f in zip(SPLITS, (cfg.dataset.split.train, cfg.dataset.split.val, cfg.dataset.split.test)) if f > 0]
    empty_cells = [f"{label}/{split}" for label in per_class.index for split in wanted if per_class.loc[label, split] == 0]
    ratio = imbalance_ratio(manifest)
    summary = manifest_dir(cfg) / "summary.json"
    empty_folders = json.loads(summary.read_text()).get("empty_class_folders", []) if summary.is_file() else []
    return dg.AssetCheckResult(
        passed=not empty_cells and not empty_folders and ratio <= cfg.dataset.max_imbalance_ratio,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "imbalance_ratio": ratio,
            "max_imbalance_ratio": cfg.dataset.max_imbalance_ratio,
            "empty_class_split_cells": ", ".join(empty_cells) or "none",
            "empty_class_folders": ", ".join(empty_folders) or "none",
            "counts": table_md(counts),
        },
    )


@dg.asset_check(asset=raw_images,
                description="The fraction of rejected files stays under dataset.max_rejected_fraction.")
def raw_images_rejected_fraction(context: dg.AssetCheckExecutionContext, maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    cfg = maemi_config.load(context)
    manifest = load_manifest(cfg)
    rejected = pd.read_parquet(manifest_dir(cfg) / "rejected.parquet")
    total = len(manifest) + len(rejected)
    fraction = len(rejected) / total if total else 0.0
    return dg.AssetCheckResult(
        passed=fraction <= cfg.dataset.max_rejected_fraction,
        metadata={"rejected_fraction": fraction, "bound": cfg.dataset.max_rejected_fraction,
                  "n_rejected": len(rejected)},
    )


@dg.asset_check(asset=raw_images,
                description="Sample groups (dataset.group_by): warns when one sample holds more than "
                            "dataset.max_group_fraction of a class (validation would measure one sample) or when "
                            "images of an official-test sample are kept in train/val.")
def raw_images_sample_groups(context: dg.AssetCheckExecutionContext, maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    from maemi_core.data.sample_groups import dominant_groups

    cfg = maemi_config.load(context)
    manifest = load_manifest(cfg)
    if "group_id" not in manifest:
        return dg.AssetCheckResult(passed=True, description="manifest without groups (re-materialize raw_images)")
    dominant = dominant_groups(manifest, cfg.dataset.max_group_fraction)
    siblings = int(manifest.get("test_sample_in_training", pd.Series(dtype=bool)).sum())
    problems = ([f"{len(dominant)} class(es) dominated by one sample"] if len(dominant) else []) + \
        ([f"{siblings} images of official-test samples in train/val"] if siblings else [])
    return dg.AssetCheckResult(
        passed=not problems, severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(problems) or "no class dominated by one sample, no test sample in training",
        metadata={"groups": int(manifest["group_id"].nunique()), "images": len(manifest),
                  "test_samples_in_training": siblings,
                  "dominant": table_md(dominant.round(3), index=False) if len(dominant) else dg.MetadataValue.md("none")})


RAW_IMAGES_CHECKS = [raw_images_no_split_leakage, raw_images_class_balance, raw_images_rejected_fraction,
                     raw_images_sample_groups]


def _vision_summary(context, maemi_config: MaemiConfigResource) -> tuple:
    """(profile, the vision stage's summary.json) as this check's run sees them."""
    from maemi_core.vision.classifiers import vision_dir

    cfg = maemi_config.load(context)
    return cfg, json.loads((vision_dir(cfg) / "summary.json").read_text())


@dg.asset_check(asset=vit_classifier,
                description="Warns when the encoder MAEMI reads (vision.encoder) is not the one that did better on "
                            "validation (cosine k-NN, then top-1). The choice stays the profile's: switching the "
                            "encoder retrains MAEMI from scratch (adapters of one encoder do not fit another).")
def vit_classifier_encoder_is_validation_winner(context: dg.AssetCheckExecutionContext,
                                                maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    cfg, summary = _vision_summary(context, maemi_config)
    best, used = summary["best_encoder_on_val"], cfg.vision.encoder
    rows = pd.DataFrame([{k: m.get(k) for k in ("model", "val_knn_top1", "val_top1", "val_majority_top1",
                                                "val_below_majority", "top1")} for m in summary["models"]
                         if m["model"] in ("vit", "efficientnet_lite0")])
    if best is None:
        description = ("no encoder is above the majority class on validation: neither can be trusted to read "
                       "images (see vit_classifier_not_below_majority)")
    elif best == used:
        description = f"vision.encoder {used} is the validation winner"
    else:
        description = (f"vision.encoder is {used}, but {best} did better on validation: set vision.encoder: {best} "
                       "in the profile to have MAEMI read it (the next maemi_model run then trains from scratch)")
    return dg.AssetCheckResult(
        passed=best == used, severity=dg.AssetCheckSeverity.WARN, description=description,
        metadata={"encoder_in_use": used, "best_encoder_on_val": best or "none",
                  "encoders": table_md(rows.round(4), index=False)})


@dg.asset_check(asset=vit_classifier,
                description="Warns when a classifier scores below the majority class on validation (top-1 of always "
                            "answering the most frequent train category on the same images): a collapsed or "
                            "untrained model, which is never chosen as the encoder.")
def vit_classifier_not_below_majority(context: dg.AssetCheckExecutionContext,
                                      maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    _, summary = _vision_summary(context, maemi_config)
    models = summary["models"]
    if any("val_below_majority" not in m for m in models):     # a report from before the majority columns
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   description="the vision report has no majority-class columns: re-materialize "
                                               "vit_classifier")
    below = [m["model"] for m in models if m["val_below_majority"]]
    rows = pd.DataFrame([{k: m.get(k) for k in ("model", "val_top1", "val_majority_top1", "val_below_majority",
                                                "top1", "majority_top1", "below_majority")} for m in models])
    majority = summary.get("majority_class")
    return dg.AssetCheckResult(
        passed=not below, severity=dg.AssetCheckSeverity.WARN,
        description=(f"{', '.join(below)} below the majority class on validation (always answering {majority!r}): "
                     "they learned less than the class frequencies; check the training (loss curve, class "
                     "weighting, epochs) before trusting their rows" if below else
                     f"every classifier is at or above the majority class ({majority!r}) on validation"),
        metadata={"below_majority_on_val": ", ".join(below) or "none",
                  "below_majority_on_test": ", ".join(summary.get("below_majority_on_test", [])) or "none",
                  "majority_class": str(majority), "models": table_md(rows.round(4), index=False)})


VISION_CHECKS = [vit_classifier_encoder_is_validation_winner, vit_classifier_not_below_majority]


@dg.asset_check(asset=instruction_set, blocking=True,
                description="Every record parses and has its fields, one <image> per image, and a non-empty, non-refused answer.")
def instruction_set_records_valid(context: dg.AssetCheckExecutionContext, maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    records = load_instruction_set(maemi_config.load(context))
    problems = validate_records(records)
    return dg.AssetCheckResult(passed=not problems and len(records) > 0,
                               metadata={"records": len(records), "problems": len(problems),
                                         "first_problems": "\n".join(problems[:20]) or "none"})


@dg.asset_check(asset=instruction_set,
                description="Every train image of the manifest has at least one single-image conversation.")
def instruction_set_train_coverage(context: dg.AssetCheckExecutionContext, maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    cfg = maemi_config.load(context)
    train_ids = set(load_manifest(cfg).query("split == 'train'")["image_id"])
    covered = {r["image_ids"][0] for r in load_instruction_set(cfg) if len(r["image_ids"]) == 1}
    missing = sorted(train_ids - covered)
    return dg.AssetCheckResult(passed="train" not in cfg.teacher.splits or not missing,
                               metadata={"train_images": len(train_ids), "without_conversations": len(missing),
                                         "examples": ", ".join(m[:12] for m in missing[:10]) or "none"})


@dg.asset_check(asset=instruction_set, description="Records per task; warns when a configured task produced none.")
def instruction_set_task_counts(context: dg.AssetCheckExecutionContext, maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    cfg = maemi_config.load(context)
    counts = pd.Series([r["task"] for r in load_instruction_set(cfg)]).value_counts()
    empty = [t for t in cfg.teacher.tasks if counts.get(t, 0) == 0]
    return dg.AssetCheckResult(passed=not empty, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"counts": table_md(counts.rename_axis("task").to_frame("records")),
                                         "empty_tasks": ", ".join(empty) or "none"})


@dg.asset_check(asset=instruction_set, blocking=True,
                description="Fails when the teacher could not answer more than teacher.max_failed_fraction of any "
                            "split's records (after retries): a test split that silently shrank would make the "
                            "benchmark measure something else.")
def instruction_set_teacher_failures(context: dg.AssetCheckExecutionContext, maemi_config: MaemiConfigResource) -> dg.AssetCheckResult:
    cfg = maemi_config.load(context)
    failed = load_failed(cfg)
    table = failure_table(load_instruction_set(cfg), failed)
    limit = cfg.teacher.max_failed_fraction
    over = table[table["failed_fraction"] > limit]
    errors = pd.Series([f["error"][:120] for f in failed]).value_counts().head(5) if failed else pd.Series(dtype=int)
    return dg.AssetCheckResult(
        passed=over.empty,
        description=("teacher failures within budget" if over.empty else
                     f"teacher failed on {', '.join(f'{r.failed}/{r.planned} {r.split}' for r in over.itertuples())} "
                     f"records (> {limit:.0%}): fix the teacher (see failed.jsonl) and re-materialize; answered "
                     "records are cached and not asked again"),
        metadata={"failures_per_split": table_md(table.round(4), index=False), "max_failed_fraction": limit,
                  "failed": len(failed),
                  "top_errors": dg.MetadataValue.md("\n".join(f"- {n} x `{e}`" for e, n in errors.items()) or "none")})


INSTRUCTION_SET_CHECKS = [instruction_set_records_valid, instruction_set_train_coverage, instruction_set_task_counts,
                          instruction_set_teacher_failures]


@dg.asset_check(asset=benchmark_tables, blocking=True, op_tags=TORCH_STEP, pool=TORCH_POOL,
                description="The version this run benchmarked is shown non-inferior, paired on the same benchmark "
                            "records with a bootstrap interval, to the champion and to the reference (best champion so "
                            "far) on every key metric (promotion.key_metrics margins); a first version must beat "
                            "base_lm; a rolled-back version never passes. Champion and reference are re-evaluated when "
                            "new data or other evaluation settings changed the measurement. A rejection warns and "
                            "model_promotion records it without moving the alias; only an error stops the run.")
def benchmark_tables_challenger_not_worse(context: dg.AssetCheckExecutionContext, maemi_config: MaemiConfigResource,
                                          mlflow_tracking: MLflowResource) -> dg.AssetCheckResult:
    cfg = maemi_config.load(context)
    fit_threads(cfg)
    mlflow_tracking.activate(cfg)
    tracker = mlflow_tracking.tracking_context(context, cfg)
    decision = gate_challenger(cfg, load_manifest(cfg), load_instruction_set(cfg), tracker, log=context.log.info)
    # A rejection is a correct decision, not a failure: the check warns (the run goes on and
    # model_promotion records the decision without moving the alias); an error raises.
    return dg.AssetCheckResult(passed=decision.promote, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"decision": "promote" if decision.promote else "rejected",
                                         "reason": decision.reason,
                                         "metrics": table_md(decision.table().round(4), index=False)})


EVALUATION_CHECKS = [benchmark_tables_challenger_not_worse]
