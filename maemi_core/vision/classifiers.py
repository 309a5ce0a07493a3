"""The ``vit_classifier`` step: the paper's ViT from scratch and the baselines it is compared
with, trained on the same splits, evaluated on the test split, and compared on validation.

Models (names used in reports and MLflow):
- ``vit``: :mod:`maemi_core.vision.vit`, trained by :mod:`maemi_core.vision.classifier_training`;
- ``efficientnet_lite0``: the pretrained ImageNet EfficientNet-Lite0 from PyPI, frozen, with a
  logistic-regression probe (C chosen on validation);
- ``efficientnet_lite0_finetune``: its last blocks fine-tuned (:mod:`maemi_core.vision.efficientnet_finetune`);
- ``classical``: LBP/GLCM/HOG texture features + RBF SVM (C chosen on validation).

Besides top-1 on validation, each encoder is scored by cosine k-NN on its embeddings
(``val_knn_top1``), which is what similarity sampling of demonstrations relies on.

Every row carries the majority-class score beside its own: top-1 of always answering the most
frequent *train* category on the same split (``majority_top1`` on test, ``val_majority_top1`` on
the images ``val_top1`` was estimated on), and the flags ``below_majority`` / ``val_below_majority``.
On an imbalanced set a collapsed classifier can score far below that constant answer; such a row
is flagged, logged as a warning, and never chosen as the encoder (``best_encoder_on_val``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import joblib
import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from maemi_core.config import MaemiConfig
from maemi_core.data.manifest import manifest_hash
from maemi_core.data.transforms import cached_image_array
from maemi_core.vision.classification_metrics import (
    classification_summary, confusion_matrix_figure, loss_curve_figure, per_class_table,
)
from maemi_core.tracking import TrackingContext
from maemi_core.vision.classifier_training import EpochRecord, predict_logits, train_classifier
from maemi_core.vision.efficientnet_lite0 import EfficientNetLite0Encoder, cached_pooled_features
from maemi_core.vision.multiscale_views import dihedral_features, tile_features
from maemi_core.vision.texture_baseline import (
    DEFAULT_FEATURE_SETS, feature_set_columns, svm_model, svm_scores, texture_feature_matrix,
)
from maemi_core.vision.vit import PaperViT, PaperViTConfig
from maemi_core.run_isolation import stage_dir
from maemi_core.vision.model_selection import (
    CvCandidate, GroupedSelection, choose_c, choose_columns_and_c, majority_top1, select_by_grouped_cv,
)

ASSET = "vit_classifier"
ENCODERS = ("vit", "efficientnet_lite0")     # the models vision.encoder can name
PROBE_CS = (0.01, 0.1, 1.0)                  # the probes' C candidates
SVM_CS = (1.0, 10.0, 100.0)                  # the texture SVM's C candidates
# The options grouped cross-validation chooses among (the ViT, trained from scratch, is not
# cross-validated: one training per fold is too slow on a CPU).
CV_OPTIONS = ("efficientnet_lite0", "efficientnet_lite0_tiles", "efficientnet_lite0_tta",
              "efficientnet_lite0_finetune", "classical")
CV_FOLDS = 5


@dataclass
class ModelReport:
    name: str
    summary: dict
    per_class: pd.DataFrame
    figures: dict[str, Path] = field(default_factory=dict)
    test_scores: Optional[np.ndarray] = None   # (n_test, n_classes), manifest order of the test split
    params: dict = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    mlflow_run_id: Optional[str] = None


@dataclass
class VisionData:
    manifest: pd.DataFrame
    class_names: list[str]
    images: np.ndarray  # (N, 3, S, S) uint8, manifest order
    labels: np.ndarray  # (N,) int

    def labels_of(self, name: str) -> np.ndarray:
        return self.labels[self.manifest["split"].to_numpy() == name]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(self.manifest["split"].to_numpy() == name)
        return np.asarray(self.images[idx]), self.labels[idx]

    def groups(self) -> dict[str, np.ndarray]:
        """Sample group per image of each split (the image itself when the manifest has none)."""
        col = "group_id" if "group_id" in self.manifest else "image_id"
        split = self.manifest["split"].to_numpy()
        return {s: self.manifest[col].to_numpy()[split == s] for s in ("train", "val", "test")}


def vision_dir(cfg: MaemiConfig) -> Path:
    return stage_dir(cfg, "vision")


def vit_dir(cfg: MaemiConfig) -> Path:
    """Where vit_classifier keeps the trained ViT (the encoder of the ``vit`` profiles)."""
    return vision_dir(cfg) / "vit"



def load_vision_data(cfg: MaemiConfig, manifest: pd.DataFrame) -> VisionData:
    class_names = sorted(manifest["label"].unique())
    index = {c: i for i, c in enumerate(class_names)}
    images = cached_image_array(manifest, cfg.vision.image_size, cfg.workdir_path / "cache", manifest_hash(manifest))
    return VisionData(manifest, class_names, images, manifest["label"].map(index).to_numpy())


def knn_top1(train_emb: np.ndarray, train_y: np.ndarray, query_emb: np.ndarray, query_y: np.ndarray, k: int = 5) -> float:
    """Cosine k-NN (majority vote, ties to the nearest) accuracy of L2-normalised embeddings."""
    if len(query_y) == 0 or len(train_y) == 0:
        return float("nan")
    sims = torch.from_numpy(query_emb) @ torch.from_numpy(train_emb).T
    nn_idx = sims.topk(min(k, len(train_y)), dim=1).indices.numpy()
    votes = train_y[nn_idx]
    preds = [np.bincount(v, minlength=train_y.max() + 1).argmax() if np.bincount(v).max() > 1 else v[0] for v in votes]
    return float((np.asarray(preds) == query_y).mean())


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def majority_columns(data: VisionData, top1: float, val_top1: float, val_majority: Optional[float] = None) -> dict:
    """The majority-class scores beside a model's top-1 on test and validation, and whether the
    model is below them. ``val_majority``: the majority score on the images ``val_top1`` was
    estimated on when that is not the validation split (grouped CV over train+val)."""
    y_train = data.labels_of("train")
    test_majority = majority_top1(y_train, data.labels_of("test"))
    if val_majority is None:
        val_majority = majority_top1(y_train, data.labels_of("val"))
    return {
        "majority_top1": test_majority,
        "val_majority_top1": float(val_majority),
        "below_majority": bool(top1 < test_majority),        # NaN scores compare False: not flagged
        "val_below_majority": bool(val_top1 < val_majority),
    }


def _finish(name: str, data: VisionData, test_scores: np.ndarray, out_dir: Path, extra: dict,
            val_majority: Optional[float] = None) -> ModelReport:
    y_test = data.labels_of("test")
    summary = classification_summary(name, y_test, test_scores, data.class_names) | extra
    summary |= majority_columns(data, summary["top1"], summary["val_top1"], val_majority)
    per_class = per_class_table(name, y_test, test_scores.argmax(1), data.class_names)
    cm = confusion_matrix_figure(y_test, test_scores.argmax(1), data.class_names,
                                 f"{name} on test (top-1 {summary['top1']:.3f})", out_dir / f"confusion_{name}.png")
    return ModelReport(name, summary, per_class, figures={"confusion_matrix": cm}, test_scores=test_scores)


def train_vit(cfg: MaemiConfig, data: VisionData, on_epoch: Callable[[EpochRecord], None],
              stop_after_epoch: Optional[int] = None) -> ModelReport:
    v, t = cfg.vision.vit, cfg.vision.train
    torch.manual_seed(t.seed)     # the initial weights too: same data, code, profile -> the same ViT
    model = PaperViT(PaperViTConfig(num_classes=len(data.class_names), image_size=cfg.vision.image_size,
                                    patch_size=v.patch_size, dim=v.dim, depth=v.depth, heads=v.heads,
                                    head_dim=v.head_dim, mlp_dim=v.mlp_dim, dropout=v.dropout))
    fingerprint = json.dumps({"data": manifest_hash(data.manifest), "vit": v.model_dump(), "train": t.model_dump(),
                              "size": cfg.vision.image_size}, sort_keys=True)
    out = vision_dir(cfg) / "vit"
    x_tr, y_tr = data.split("train")
    x_va, y_va = data.split("val")
    result = train_classifier(model, x_tr, y_tr, x_va, y_va, t, out / "checkpoint.pt", fingerprint,
                              on_epoch=on_epoch, stop_after_epoch=stop_after_epoch)
    model.save(out, data.class_names)
    x_te, _ = data.split("test")
    test_scores = torch.softmax(predict_logits(model, x_te), dim=1).numpy()
    val_scores = predict_logits(model, x_va).numpy()
    emb = {s: l2_normalize(_encode_vit(model, data.split(s)[0])) for s in ("train", "val")}
    history = pd.DataFrame([r.__dict__ for r in result.history])
    history.to_csv(out / "history.csv", index=False)
    extra = {
        "val_top1": float((val_scores.argmax(1) == y_va).mean()) if len(y_va) else float("nan"),
        "val_knn_top1": knn_top1(emb["train"], y_tr, emb["val"], y_va),
        "epochs": len(result.history), "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early, "resumed_from_epoch": result.resumed_from_epoch,
        "train_images_per_s": float(history["images_per_s"].median()) if len(history) else float("nan"),
    }
    report = _finish("vit", data, test_scores, vision_dir(cfg) / "figures", extra)
    report.figures["loss_curve"] = loss_curve_figure(history, "ViT training", vision_dir(cfg) / "figures" / "loss_vit.png")
    report.params = {"vit." + k: val for k, val in v.model_dump().items()} | {"train." + k: val for k, val in t.model_dump().items()} | {
        "image_size": cfg.vision.image_size, "n_params": sum(p.numel() for p in model.parameters())}
    report.artifacts = [out / "model.safetensors", out / "config.json", out / "history.csv"]
    return report


@torch.no_grad()
def _encode_vit(model: PaperViT, images_u8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    from maemi_core.data.transforms import standardize

    model.eval()
    out = [model.encode(standardize(torch.from_numpy(np.array(images_u8[i: i + batch_size]))))[1].numpy()
           for i in range(0, len(images_u8), batch_size)]
    return np.concatenate(out) if out else np.empty((0, model.cfg.dim), np.float32)


def probe_model(c: float):
    """The probes' classifier: standardised features, logistic regression, balanced class weights."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced"))


def train_efficientnet_probe(cfg: MaemiConfig, data: VisionData, variant: str = "efficientnet_lite0") -> ModelReport:
    """The frozen EfficientNet-Lite0 + logistic-regression probe. ``variant``:
    ``efficientnet_lite0`` (the whole image at 224 px), ``efficientnet_lite0_tiles`` (plus the
    mean feature of the tiles at each of ``vision.tile_scales``) or ``efficientnet_lite0_tta``
    (the first probe, its validation/test scores averaged over the 8 dihedral transforms)."""
    all_feats = cached_pooled_features(data.images, cfg.workdir_path / "cache", manifest_hash(data.manifest),
                                       cfg.vision.embed_batch_size)
    if variant == "efficientnet_lite0_tiles":
        all_feats = _cached_tile_features(cfg, data, all_feats)
    split = data.manifest["split"].to_numpy()
    feats = {s: all_feats[split == s] for s in ("train", "val", "test")}
    y = {s: data.split(s)[1] for s in ("train", "val", "test")}
    g = data.groups()

    make = probe_model
    sel = choose_c(make, PROBE_CS, feats["train"], y["train"], g["train"], feats["val"], y["val"], g["val"],
                   cfg.vision.grouped_cv_below)
    c, val_acc, val_majority = sel.c, sel.val_top1, sel.majority_top1
    probe = make(c).fit(feats["train"], y["train"])
    n_cls = len(data.class_names)
    params = {"mode": "linear_probe", "C": c, "C_chosen_by": sel.method,
              "features": "global-average 1280-d, frozen ImageNet weights"}
    if variant == "efficientnet_lite0_tta":
        encoder = EfficientNetLite0Encoder()
        views = {s: dihedral_features(encoder, data.split(s)[0], cfg.vision.embed_batch_size, f"dihedral views ({s})")
                 for s in ("val", "test")}
        scores = {s: np.mean([_full_proba(probe, v, n_cls) for v in views[s]], axis=0) for s in views}
        val_acc = float((scores["val"].argmax(1) == y["val"]).mean())    # the probe's C, scored with the views
        val_majority = None                                              # ... on the validation split
        test_scores = scores["test"]
        params["test_time_augmentation"] = "probabilities averaged over the 8 dihedral transforms"
    else:
        test_scores = _full_proba(probe, feats["test"], n_cls)
    if variant == "efficientnet_lite0_tiles":
        params["features"] += f" + mean of 224-px tiles at short side {list(cfg.vision.tile_scales)} x 224"
        params["tile_scales"] = ",".join(map(str, cfg.vision.tile_scales))
    emb = {s: l2_normalize(feats[s]) for s in ("train", "val")}
    out = vision_dir(cfg) / variant
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump({"probe": probe, "class_names": data.class_names, "variant": variant}, out / "probe.joblib")
    report = _finish(variant, data, test_scores, vision_dir(cfg) / "figures", {
        "val_top1": val_acc, "val_knn_top1": knn_top1(emb["train"], y["train"], emb["val"], y["val"])},
        val_majority=val_majority)
    report.params = params
    report.artifacts = [out / "probe.joblib"]
    return report


def train_efficientnet_finetune(cfg: MaemiConfig, data: VisionData,
                                on_epoch: Callable[[EpochRecord], None] = lambda rec: None,
                                stop_after_epoch: Optional[int] = None) -> ModelReport:
    """The last ``vision.finetune_blocks`` blocks of EfficientNet-Lite0 + head + linear classifier,
    trained on the cached trunk maps with early stopping on the validation split."""
    from maemi_core.vision.efficientnet_finetune import (
        TunedTop, cached_trunk_features, dihedral_maps, first_tuned_block, map_inputs, pooled,
    )

    name, t = "efficientnet_lite0_finetune", cfg.vision.finetune_train
    encoder = EfficientNetLite0Encoder()
    first = first_tuned_block(encoder, cfg.vision.finetune_blocks)
    maps = cached_trunk_features(data.images, cfg.workdir_path / "cache", manifest_hash(data.manifest), first)
    split = data.manifest["split"].to_numpy()
    x = {s: maps[np.flatnonzero(split == s)] for s in ("train", "val", "test")}
    y = {s: data.split(s)[1] for s in ("train", "val", "test")}
    torch.manual_seed(t.seed)
    model = TunedTop(encoder, first, len(data.class_names))
    del encoder
    fingerprint = json.dumps({"data": manifest_hash(data.manifest), "blocks": cfg.vision.finetune_blocks,
                              "train": t.model_dump(), "size": cfg.vision.image_size}, sort_keys=True)
    out = vision_dir(cfg) / name
    result = train_classifier(model, x["train"], y["train"], x["val"], y["val"], t, out / "checkpoint.pt", fingerprint,
                              on_epoch=on_epoch, stop_after_epoch=stop_after_epoch, inputs=map_inputs,
                              augment_batch=dihedral_maps)
    torch.save({"state_dict": model.state_dict(), "first_block": first, "class_names": data.class_names},
               out / "model.pt")
    test_scores = torch.softmax(predict_logits(model, x["test"], inputs=map_inputs), dim=1).numpy()
    val_scores = predict_logits(model, x["val"], inputs=map_inputs).numpy()
    emb = {s: l2_normalize(pooled(model, x[s])) for s in ("train", "val")}
    history = pd.DataFrame([r.__dict__ for r in result.history])
    history.to_csv(out / "history.csv", index=False)
    report = _finish(name, data, test_scores, vision_dir(cfg) / "figures", {
        "val_top1": float((val_scores.argmax(1) == y["val"]).mean()) if len(y["val"]) else float("nan"),
        "val_knn_top1": knn_top1(emb["train"], y["train"], emb["val"], y["val"]),
        "epochs": len(result.history), "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch})
    report.figures["loss_curve"] = loss_curve_figure(history, "EfficientNet-Lite0 fine-tuning",
                                                     vision_dir(cfg) / "figures" / f"loss_{name}.png")
    report.params = {"mode": "fine-tune last blocks", "finetune_blocks": cfg.vision.finetune_blocks,
                     "first_tuned_block": first, "augmentation": "dihedral transforms of the cached trunk maps",
                     "n_trained_params": sum(p.numel() for p in model.parameters())} | {
        "finetune." + k: v for k, v in t.model_dump().items()}
    report.artifacts = [out / "model.pt", out / "history.csv"]
    return report


def _cached_tile_features(cfg: MaemiConfig, data: VisionData, whole: np.ndarray) -> np.ndarray:
    """:func:`tile_features` of every image, memoised under the data version and the scales."""
    from maemi_core.data.transforms import save_cache_npy

    scales = [int(s) for s in cfg.vision.tile_scales]
    path = cfg.workdir_path / "cache" / f"tiles_{'-'.join(map(str, scales))}_{manifest_hash(data.manifest)}.npy"
    if path.is_file():
        feats = np.load(path)
        if feats.shape == (len(whole), whole.shape[1] * (1 + len(scales))):
            return feats
    m = data.manifest
    crops = m["crop_bottom"].fillna(0).astype(int).tolist() if "crop_bottom" in m else [0] * len(m)
    feats = tile_features(EfficientNetLite0Encoder(), m["path"].tolist(), crops, scales, whole,
                          cfg.vision.image_size, cfg.vision.embed_batch_size)
    save_cache_npy(path, feats, "tiles_*.npy")
    return feats


def _full_proba(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    proba = model.predict_proba(x)
    out = np.zeros((len(x), num_classes))
    out[:, model.classes_] = proba
    return out


def train_classical(cfg: MaemiConfig, data: VisionData) -> ModelReport:
    feats = {s: texture_feature_matrix(data.split(s)[0]) for s in ("train", "val", "test")}
    y = {s: data.split(s)[1] for s in ("train", "val", "test")}
    g = data.groups()
    sets = [tuple(s) for s in (cfg.vision.classical_feature_sets or DEFAULT_FEATURE_SETS)]
    columns = {"+".join(s): feature_set_columns(s) for s in sets}
    chosen = choose_columns_and_c(svm_model, SVM_CS, columns, feats["train"], y["train"], g["train"],
                                  feats["val"], y["val"], g["val"], cfg.vision.grouped_cv_below)
    sel, cols = chosen.selection, columns[chosen.name]
    c, val_acc = sel.c, sel.val_top1
    model = svm_model(c).fit(feats["train"][:, cols], y["train"])
    test_scores = svm_scores(model, feats["test"][:, cols], len(data.class_names))
    out = vision_dir(cfg) / "classical"
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump({"model": model, "class_names": data.class_names, "feature_set": chosen.name, "columns": cols},
                out / "svm.joblib")
    report = _finish("classical", data, test_scores, vision_dir(cfg) / "figures", {
        "val_top1": val_acc, "val_knn_top1": float("nan"), "feature_set": chosen.name},
        val_majority=sel.majority_top1)
    report.params = {"features": "LBP(8,1)(16,2)(24,3) + GLCM(d=1,2,4) + HOG(112px) + intensity stats",
                     "feature_set": chosen.name, "feature_set_chosen_by": sel.method,
                     "feature_set_scores": json.dumps(chosen.scores),
                     "classifier": "RBF SVM, class_weight=balanced", "C": c, "C_chosen_by": sel.method,
                     "n_features": int(len(cols))}
    report.artifacts = [out / "svm.joblib"]
    return report


# --- choosing among models and options by grouped cross-validation ----------------------------

def grouped_selection_applies(cfg: MaemiConfig, data: VisionData) -> bool:
    """Whether the choice among models and options is made by grouped CV over train+val: the
    manifest names sample groups (``dataset.group_by``), the validation split has fewer images than
    ``vision.grouped_cv_below`` (the rule for C) and train+val hold at least ``CV_FOLDS`` groups."""
    m = data.manifest
    if "sample" not in m or not m["sample"].notna().any():
        return False
    g = data.groups()
    return len(g["val"]) < cfg.vision.grouped_cv_below and len(np.unique(np.concatenate([g["train"], g["val"]]))) >= CV_FOLDS


def _group_column(data: VisionData) -> np.ndarray:
    return data.manifest["group_id" if "group_id" in data.manifest else "image_id"].astype(str).to_numpy()


def _cached_dihedral_features(cfg: MaemiConfig, data: VisionData) -> np.ndarray:
    """(8, N, 1280) pooled features of the 8 rotations/flips of every image, memoised per data version."""
    from maemi_core.data.transforms import save_cache_npy

    path = cfg.workdir_path / "cache" / f"dihedral_{manifest_hash(data.manifest)}.npy"
    if path.is_file():
        feats = np.load(path)
        if feats.shape[1] == len(data.images):
            return feats
    feats = dihedral_features(EfficientNetLite0Encoder(), data.images, cfg.vision.embed_batch_size).astype(np.float32)
    save_cache_npy(path, feats, "dihedral_*.npy")
    return feats


def _cached_texture_features(cfg: MaemiConfig, data: VisionData) -> np.ndarray:
    """:func:`texture_feature_matrix` of every image, memoised per data version."""
    from maemi_core.data.transforms import save_cache_npy

    path = cfg.workdir_path / "cache" / f"texture_{manifest_hash(data.manifest)}.npy"
    if path.is_file():
        feats = np.load(path)
        if len(feats) == len(data.images):
            return feats
    feats = texture_feature_matrix(data.images)
    save_cache_npy(path, feats, "texture_*.npy")
    return feats


def model_candidates(cfg: MaemiConfig, data: VisionData, options, log: Callable[[str], None] = lambda m: None,
                     seed: int = 0) -> list[CvCandidate]:
    """Every configuration of ``options`` (names of ``CV_OPTIONS``) that grouped CV scores: the
    probes at each of ``PROBE_CS`` (tiles: each scale of ``vision.tile_scales`` and all of them;
    test-time views: the probe fitted on upright images or on all 8 views), the texture SVM at each
    feature set and each of ``SVM_CS``, and the fine-tuned top (early stopping on one grouped split
    of each fold's training images). ``fit_predict`` takes indices into the manifest and returns
    (n, classes) scores. Features are computed once per image (cached per data version)."""
    unknown = [o for o in options if o not in CV_OPTIONS]
    if unknown:
        raise ValueError(f"options {unknown} cannot be cross-validated; choose from {list(CV_OPTIONS)}")
    y, n_cls = data.labels, len(data.class_names)
    key, cache = manifest_hash(data.manifest), cfg.workdir_path / "cache"
    out: list[CvCandidate] = []

    def probe(x: np.ndarray, c: float):
        def fit_predict(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
            return _full_proba(probe_model(c).fit(x[tr], y[tr]), x[te], n_cls)
        return fit_predict

    pooled_feats = None
    if {"efficientnet_lite0", "efficientnet_lite0_tiles"} & set(options):
        log("grouped CV: EfficientNet-Lite0 features")
        pooled_feats = cached_pooled_features(data.images, cache, key, cfg.vision.embed_batch_size)
    for option in (o for o in CV_OPTIONS if o in options):
        if option == "efficientnet_lite0":
            out += [CvCandidate(f"{option} C={c:g}", option, {"C": c}, probe(pooled_feats, c)) for c in PROBE_CS]
        elif option == "efficientnet_lite0_tiles":
            log(f"grouped CV: tile features at scales {list(cfg.vision.tile_scales)}")
            feats, d = _cached_tile_features(cfg, data, pooled_feats), pooled_feats.shape[1]
            scales = [int(s) for s in cfg.vision.tile_scales]
            column_sets = {str(s): np.r_[0:d, d * (j + 1): d * (j + 2)] for j, s in enumerate(scales)}
            if len(scales) > 1:
                column_sets["+".join(map(str, scales))] = np.arange(feats.shape[1])
            for name, cols in column_sets.items():
                x = np.ascontiguousarray(feats[:, cols])
                out += [CvCandidate(f"{option} scales={name} C={c:g}", option, {"tile_scales": name, "C": c},
                                    probe(x, c)) for c in PROBE_CS]
        elif option == "efficientnet_lite0_tta":
            log("grouped CV: features of the 8 rotations/flips")
            views = _cached_dihedral_features(cfg, data)

            def tta(c: float, fit_views: int):
                def fit_predict(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
                    xs = views[:fit_views, tr].reshape(-1, views.shape[2])
                    m = probe_model(c).fit(xs, np.tile(y[tr], fit_views))
                    return np.mean([_full_proba(m, v[te], n_cls) for v in views], axis=0)
                return fit_predict
            for fit_views in (1, len(views)):
                out += [CvCandidate(f"{option} fit on {'upright' if fit_views == 1 else f'{fit_views} views'} C={c:g}",
                                    option, {"fit_views": fit_views, "C": c}, tta(c, fit_views)) for c in PROBE_CS]
        elif option == "efficientnet_lite0_finetune":
            out.append(_finetune_candidate(cfg, data, log, seed))
        elif option == "classical":
            log("grouped CV: texture features")
            feats = _cached_texture_features(cfg, data)
            sets = [tuple(s) for s in (cfg.vision.classical_feature_sets or DEFAULT_FEATURE_SETS)]
            for fs in sets:
                cols = feature_set_columns(fs)
                x = np.ascontiguousarray(feats[:, cols])

                def svm(c: float, x=x):
                    def fit_predict(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
                        return svm_scores(svm_model(c).fit(x[tr], y[tr]), x[te], n_cls)
                    return fit_predict
                out += [CvCandidate(f"{option} {'+'.join(fs)} C={c:g}", option,
                                    {"feature_set": "+".join(fs), "C": c}, svm(c)) for c in SVM_CS]
    return out


def _finetune_candidate(cfg: MaemiConfig, data: VisionData, log: Callable[[str], None], seed: int) -> CvCandidate:
    import tempfile

    from maemi_core.vision.efficientnet_finetune import (
        TunedTop, cached_trunk_features, dihedral_maps, first_tuned_block, map_inputs,
    )
    from maemi_core.vision.model_selection import grouped_folds

    log(f"grouped CV: trunk maps for fine-tuning the last {cfg.vision.finetune_blocks} blocks")
    t, encoder = cfg.vision.finetune_train, EfficientNetLite0Encoder()
    first = first_tuned_block(encoder, cfg.vision.finetune_blocks)
    maps = cached_trunk_features(data.images, cfg.workdir_path / "cache", manifest_hash(data.manifest), first)
    y, groups, n_cls = data.labels, _group_column(data), len(data.class_names)

    def fit_predict(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        # Early stopping on held-out samples of the training part: one grouped split of it.
        n_groups = len(np.unique(groups[tr]))
        fit, stop = grouped_folds(y[tr], groups[tr], min(CV_FOLDS, n_groups), seed=seed)[0]
        torch.manual_seed(t.seed)
        model = TunedTop(encoder, first, n_cls)
        with tempfile.TemporaryDirectory() as tmp:
            train_classifier(model, np.asarray(maps[tr[fit]]), y[tr[fit]], np.asarray(maps[tr[stop]]), y[tr[stop]], t,
                             Path(tmp) / "checkpoint.pt", "grouped-cv", inputs=map_inputs, augment_batch=dihedral_maps)
        return torch.softmax(predict_logits(model, np.asarray(maps[te]), inputs=map_inputs), dim=1).numpy()

    return CvCandidate(f"efficientnet_lite0_finetune blocks={cfg.vision.finetune_blocks}", "efficientnet_lite0_finetune",
                       {"finetune_blocks": cfg.vision.finetune_blocks, "lr": t.lr, "max_epochs": t.max_epochs},
                       fit_predict)


@dataclass
class GroupedModelChoice:
    selection: GroupedSelection         # the CV table (mean +- std over folds per candidate) and the winner
    chosen: dict                        # the winner's row of the table
    test: dict                          # the winner refitted on train+val, scored once on the test split


def choose_model_by_grouped_cv(cfg: MaemiConfig, data: VisionData, options, folds: int = CV_FOLDS,
                               repeats: int = 1, seed: int = 0, log: Callable[[str], None] = lambda m: None,
                               score_test: bool = True) -> GroupedModelChoice:
    """Score every candidate of ``options`` (:func:`model_candidates`) by grouped CV over
    train+val, choose the best mean, refit it on all of train+val and score it once on the test
    split: top-1 on every test image, on those of samples (groups) that train+val also holds and
    on those of samples it never saw. The test split plays no part in the choice; with
    ``score_test`` off it is not touched at all (``test`` is empty)."""
    split = data.manifest["split"].to_numpy()
    tv, te = np.flatnonzero(split != "test"), np.flatnonzero(split == "test")
    groups = _group_column(data)
    raw = model_candidates(cfg, data, options, log, seed)
    wrapped = [CvCandidate(c.name, c.option, c.params, lambda a, b, f=c.fit_predict: f(tv[a], tv[b])) for c in raw]
    sel = select_by_grouped_cv(wrapped, data.labels[tv], groups[tv], folds, repeats, seed, log)
    chosen = sel.row(sel.best)
    if not score_test:
        return GroupedModelChoice(sel, chosen, {})
    scores = next(c for c in raw if c.name == sel.best).fit_predict(tv, te)
    y_te = data.labels[te]
    seen = np.isin(groups[te], groups[tv])
    hits = scores.argmax(1) == y_te
    summary = classification_summary(sel.best, y_te, scores, data.class_names)
    test = {"top1": summary["top1"], "macro_f1": summary["macro_f1"], "n_test": int(len(te)),
            "top1_unseen_samples": float(hits[~seen].mean()) if (~seen).any() else float("nan"),
            "n_unseen_samples": int((~seen).sum()),
            "top1_seen_samples": float(hits[seen].mean()) if seen.any() else float("nan"),
            "n_seen_samples": int(seen.sum()),
            "majority_top1": majority_top1(data.labels[tv], y_te)}
    return GroupedModelChoice(sel, chosen, test)


def cv_table_markdown(choice: GroupedModelChoice) -> str:
    """The CV table (best first) with the winner and its test scores."""
    t = choice.selection.table.sort_values("cv_top1", ascending=False, kind="stable")
    lines = ["| candidate | grouped CV top-1 (mean +- std over folds) | majority class |", "|---|---|---|"]
    for _, r in t.iterrows():
        mark = " **(chosen)**" if r["candidate"] == choice.selection.best else ""
        lines.append(f"| `{r['candidate']}`{mark} | {r['cv_top1']:.3f} +- {r['cv_top1_std']:.3f} | "
                     f"{r['majority_top1']:.3f} |")
    s = choice.test
    lines += ["", f"Chosen by {choice.selection.method}: `{choice.selection.best}`, CV top-1 "
              f"{choice.chosen['cv_top1']:.3f} +- {choice.chosen['cv_top1_std']:.3f}."]
    if not s:
        return "\n".join(lines) + " Not scored on the test split.\n"
    lines[-1] += (f" Refitted on train+val, on the test split: top-1 {s['top1']:.3f} ({s['n_test']} images; "
                  f"macro-F1 {s['macro_f1']:.3f}), {s['top1_unseen_samples']:.3f} on the {s['n_unseen_samples']} "
                  f"images of samples train+val does not hold"
                  + (f", {s['top1_seen_samples']:.3f} on the {s['n_seen_samples']} of samples it holds"
                     if s["n_seen_samples"] else "") + f" (majority class {s['majority_top1']:.3f}).")
    return "\n".join(lines) + "\n"


@dataclass
class ClassifierSuiteResult:
    reports: list[ModelReport]
    classification: pd.DataFrame
    per_class: pd.DataFrame
    best_encoder_on_val: Optional[str]    # None: every encoder is below the majority class on validation
    paths: dict[str, Path]
    grouped_cv: Optional[GroupedModelChoice] = None   # the choice by grouped CV, when groups are few

    def report(self, name: str) -> ModelReport:
        return next(r for r in self.reports if r.name == name)


def train_classifiers(cfg: MaemiConfig, manifest: pd.DataFrame, tracker: Optional[TrackingContext] = None,
                      log: Callable[[str], None] = lambda m: None,
                      warn: Optional[Callable[[str], None]] = None) -> ClassifierSuiteResult:
    """Train and evaluate the ViT and the configured baselines; write the reports. ``warn``
    (default ``log``) receives a line for every model below the majority class."""
    warn = warn or log
    import mlflow

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_vision_data(cfg, manifest)
    for split in ("train", "val", "test"):
        if (data.manifest["split"] == split).sum() == 0:
            raise ValueError(f"the {split} split is empty: add images or change dataset.split")
    log(f"{len(data.manifest)} images, classes {data.class_names}")
    majority = data.class_names[int(np.bincount(data.labels_of("train")).argmax())]

    steps: list[tuple[str, Callable[[], ModelReport]]] = []

    def vit_step() -> ModelReport:
        def on_epoch(rec: EpochRecord) -> None:
            log(f"vit epoch {rec.epoch}: train_loss={rec.train_loss:.4f} val_loss={rec.val_loss:.4f} "
                f"val_acc={rec.val_acc:.4f} lr={rec.lr:g} ({rec.images_per_s:.0f} img/s)")
            if tracker is not None:
                mlflow.log_metrics({k: getattr(rec, k) for k in ("train_loss", "val_loss", "val_acc", "lr", "images_per_s")},
                                   step=rec.epoch)
        return train_vit(cfg, data, on_epoch)

    steps.append(("vit", vit_step))
    for variant in ("efficientnet_lite0", "efficientnet_lite0_tiles", "efficientnet_lite0_tta"):
        if variant in cfg.vision.baselines:
            steps.append((variant, lambda variant=variant: train_efficientnet_probe(cfg, data, variant)))
    if "efficientnet_lite0_finetune" in cfg.vision.baselines:
        def finetune_step() -> ModelReport:
            def on_epoch(rec: EpochRecord) -> None:
                log(f"efficientnet fine-tuning epoch {rec.epoch}: train_loss={rec.train_loss:.4f} "
                    f"val_loss={rec.val_loss:.4f} val_acc={rec.val_acc:.4f} lr={rec.lr:g}")
                if tracker is not None:
                    mlflow.log_metrics({k: getattr(rec, k) for k in ("train_loss", "val_loss", "val_acc", "lr")},
                                       step=rec.epoch)
            return train_efficientnet_finetune(cfg, data, on_epoch)
        steps.append(("efficientnet_lite0_finetune", finetune_step))
    if "classical" in cfg.vision.baselines:
        steps.append(("classical", lambda: train_classical(cfg, data)))

    reports = []
    for name, step in steps:
        log(f"training {name}")
        if tracker is None:
            reports.append(step())
            continue
        with tracker.run(ASSET, model=name) as run:
            report = step()
            mlflow.log_params(report.params)
            mlflow.log_metrics({k: float(v) for k, v in report.summary.items()
                                if isinstance(v, (int, float, bool)) and not (isinstance(v, float) and np.isnan(v))})
            mlflow.set_tags({"maemi.below_majority": str(report.summary["below_majority"]).lower(),
                             "maemi.val_below_majority": str(report.summary["val_below_majority"]).lower()})
            for fig in report.figures.values():
                mlflow.log_artifact(str(fig), artifact_path="figures")
            for art in report.artifacts:
                mlflow.log_artifact(str(art), artifact_path="model")
            report.mlflow_run_id = run.info.run_id
        reports.append(report)
        s = report.summary
        log(f"{name}: test top1={s['top1']:.4f} macro_f1={s['macro_f1']:.4f} val top1={s['val_top1']:.4f} "
            f"(majority class: test {s['majority_top1']:.4f}, val {s['val_majority_top1']:.4f})")
        if s["below_majority"] or s["val_below_majority"]:
            warn(f"{name} is below the majority class: val top-1 {s['val_top1']:.4f} vs "
                 f"{s['val_majority_top1']:.4f}, test top-1 {s['top1']:.4f} vs {s['majority_top1']:.4f} for always "
                 f"answering {majority!r}; it learned less than the class frequencies (collapsed or untrained)"
                 + ("; not eligible as the encoder" if name in ENCODERS and s["val_below_majority"] else ""))

    # Few sample groups: the choice among the cross-validated rows and their options is made on
    # grouped folds over train+val, each candidate reported with its mean and spread over folds.
    grouped = None
    cv_options = [r.name for r in reports if r.name in CV_OPTIONS]
    if cv_options and grouped_selection_applies(cfg, data):
        log(f"choosing among {', '.join(cv_options)} and their options by grouped cross-validation")
        grouped = choose_model_by_grouped_cv(cfg, data, cv_options, log=log)
        for r in reports:
            if r.name in cv_options:
                b = grouped.selection.best_of(r.name)
                r.summary |= {"cv_top1": b["cv_top1"], "cv_top1_std": b["cv_top1_std"], "cv_candidate": b["candidate"]}
        log(f"chosen by {grouped.selection.method}: {grouped.selection.best} (CV top-1 "
            f"{grouped.chosen['cv_top1']:.4f} +- {grouped.chosen['cv_top1_std']:.4f}; test top-1 "
            f"{grouped.test['top1']:.4f}, {grouped.test['top1_unseen_samples']:.4f} on unseen samples)")

    classification = pd.DataFrame([r.summary for r in reports])
    # How much validation flattered each model: with sample groups (dataset.group_by) validation is
    # sample-disjoint from training, and this gap is what tells a leak from a good model.
    classification["val_test_gap"] = classification["val_top1"] - classification["top1"]
    per_class = pd.concat([r.per_class for r in reports], ignore_index=True)
    # The better encoder on validation, among those not below the majority class there: a model
    # that scores less than always answering one category is never the one to read images with.
    encoders = classification[classification["model"].isin(ENCODERS) & ~classification["val_below_majority"]]
    best = (str(encoders.sort_values(["val_knn_top1", "val_top1"], ascending=False).iloc[0]["model"])
            if len(encoders) else None)
    below = {split: [r.name for r in reports if r.summary[flag]]
             for split, flag in (("test", "below_majority"), ("val", "val_below_majority"))}
    # The encoders' own reports live with them; benchmark_tables writes reports/classification.*
    # with these rows next to MAEMI's, measured on the same records.
    rdir = vision_dir(cfg)
    rdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "classification_csv": rdir / "classification.csv", "classification_md": rdir / "classification.md",
        "per_class_csv": rdir / "per_class.csv", "per_class_md": rdir / "per_class.md",
        "summary": rdir / "summary.json", "test_scores": rdir / "test_scores.parquet",
    }
    test_ids = data.manifest.loc[data.manifest["split"] == "test", "image_id"].to_numpy()
    pd.DataFrame([{"model": r.name, "image_id": iid, "label": data.class_names[y], "scores": list(map(float, sc))}
                  for r in reports for iid, y, sc in zip(test_ids, data.split("test")[1], r.test_scores)]
                 ).to_parquet(paths["test_scores"], index=False)
    classification.to_csv(paths["classification_csv"], index=False)
    per_class.to_csv(paths["per_class_csv"], index=False)
    paths["classification_md"].write_text(
        f"# Classification on the test split ({cfg.dataset.name})\n\n"
        + classification.to_markdown(index=False, floatfmt=".4f")
        + f"\n\nMajority class (always answering `{majority}`, the most frequent train category): test top-1 "
        f"{classification['majority_top1'].iloc[0]:.4f}. Below it on test: "
        f"{', '.join(f'`{m}`' for m in below['test']) or 'none'}; on validation: "
        f"{', '.join(f'`{m}`' for m in below['val']) or 'none'}.\n\n"
        f"Encoder in use: `{cfg.vision.encoder}`; better on validation (cosine k-NN, then top-1), among encoders "
        f"not below the majority class: " + (f"`{best}`" if best else "none") + ".\n")
    if grouped is not None:
        paths["cv_selection_csv"], paths["cv_selection_md"] = rdir / "cv_selection.csv", rdir / "cv_selection.md"
        table = grouped.selection.table.copy()
        table["params"] = table["params"].map(lambda p: json.dumps(p, sort_keys=True))
        table["fold_top1"] = table["fold_top1"].map(lambda f: json.dumps([round(v, 4) for v in f]))
        table.to_csv(paths["cv_selection_csv"], index=False)
        paths["cv_selection_md"].write_text(f"# Models and options by grouped cross-validation ({cfg.dataset.name})\n\n"
                                            + cv_table_markdown(grouped))
        with paths["classification_md"].open("a") as fh:
            fh.write(f"\nChosen among the rows and their options by {grouped.selection.method}: "
                     f"`{grouped.selection.best}` (CV top-1 {grouped.chosen['cv_top1']:.4f} +- "
                     f"{grouped.chosen['cv_top1_std']:.4f}); refitted on train+val, test top-1 "
                     f"{grouped.test['top1']:.4f} ({grouped.test['top1_unseen_samples']:.4f} on the "
                     f"{grouped.test['n_unseen_samples']} images of unseen samples). Every candidate: "
                     f"`cv_selection.md`.\n")
        if tracker is not None:
            with tracker.run(ASSET, model="grouped_cv_selection"):
                mlflow.log_params({"chosen": grouped.selection.best, "chosen_by": grouped.selection.method,
                                   "chosen_option": grouped.chosen["option"]})
                mlflow.log_metrics({"cv_top1": grouped.chosen["cv_top1"], "cv_top1_std": grouped.chosen["cv_top1_std"]}
                                   | {f"test_{k}": float(v) for k, v in grouped.test.items()
                                      if not (isinstance(v, float) and np.isnan(v))})
                for key in ("cv_selection_csv", "cv_selection_md"):
                    mlflow.log_artifact(str(paths[key]), artifact_path="reports")
    paths["per_class_md"].write_text(f"# Per-class precision / recall / F1 ({cfg.dataset.name})\n\n"
                                     + per_class.to_markdown(index=False, floatfmt=".4f") + "\n")
    paths["summary"].write_text(json.dumps({
        "encoder": cfg.vision.encoder, "best_encoder_on_val": best, "class_names": data.class_names,
        "majority_class": majority, "below_majority_on_test": below["test"], "below_majority_on_val": below["val"],
        "data_version": manifest_hash(manifest), "models": [r.summary for r in reports],
        "grouped_cv": None if grouped is None else {
            "method": grouped.selection.method, "chosen": grouped.selection.best, "option": grouped.chosen["option"],
            "params": grouped.chosen["params"], "cv_top1": grouped.chosen["cv_top1"],
            "cv_top1_std": grouped.chosen["cv_top1_std"], "test": grouped.test},
    }, indent=2, default=float))
    return ClassifierSuiteResult(reports, classification, per_class, best, paths, grouped)
