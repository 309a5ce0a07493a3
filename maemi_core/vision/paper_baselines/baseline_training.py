"""Train one row of the paper's Tables 7/8 from scratch, select on val, score on test.

Every row reads the same images (the manifest's splits, decoded once at
``paper_baselines.image_size``), trains under the same budget (``epochs`` and ``minutes``,
whichever ends first), with the seed of the profile:

- supervised rows (ConvNets, ViTs, GNNs): ``vision.classifier_training.train_classifier``, the
  trainer of ``vit_classifier`` (class-weighted cross-entropy, lr halving and early stopping on
  val loss, the best-val-loss weights kept, a checkpoint every epoch from which a killed run
  resumes); images get the orientation-free augmentation, graphs none.
- Distillation (DeiT): a ResNet teacher trained first on half the budget, then the distillable
  ViT against it with vit-pytorch's ``DistillWrapper`` (hard distillation off, alpha 0.5) on the
  other half; the student's class token is scored.
- self-supervised rows (VSL, SMIM, Dino, graph contrastive): pretraining on the train images
  without labels, then a linear probe (standardised features, balanced logistic regression)
  whose C is chosen on val from 0.01, 0.1, 1, 10.

Scores on the test split: top-1 and top-k (k = min(5, classes)) with 95% percentile-bootstrap
intervals over test images, macro-F1, balanced accuracy, wall minutes and parameters.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from maemi_core.vision.classification_metrics import top_k
from maemi_core.vision.paper_baselines.zoo import Row

PROBE_CS = (0.01, 0.1, 1.0, 10.0)
BOOTSTRAP = 1000


@dataclass
class SplitData:
    class_names: list[str]
    images: dict[str, np.ndarray]       # split -> (N, 3, S, S) uint8
    labels: dict[str, np.ndarray]       # split -> (N,) int
    image_ids: dict[str, list[str]]


def split_data(manifest: pd.DataFrame, images: np.ndarray) -> SplitData:
    class_names = sorted(manifest["label"].unique())
    y = manifest["label"].map({c: i for i, c in enumerate(class_names)}).to_numpy()
    split = manifest["split"].to_numpy()
    idx = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    missing = [s for s, i in idx.items() if len(i) == 0]
    if missing:
        raise ValueError(f"the manifest has no {' or '.join(missing)} images: the baselines need train, val and test "
                         "(add images or change dataset.split)")
    return SplitData(class_names, {s: np.asarray(images[i]) for s, i in idx.items()}, {s: y[i] for s, i in idx.items()},
                     {s: list(manifest["image_id"].to_numpy()[i]) for s, i in idx.items()})


def _interval(hits: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of a mean over test images."""
    if len(hits) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), (BOOTSTRAP, len(hits)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def score(scores: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict:
    """Top-1 / top-k with intervals, macro-F1 and balanced accuracy of test ``scores`` (N, C)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    k = min(5, len(class_names))
    order = np.argsort(-scores, 1)
    hit1 = (order[:, 0] == y).astype(float)
    hitk = (order[:, :k] == y[:, None]).any(1).astype(float)
    lo1, hi1 = _interval(hit1)
    lok, hik = _interval(hitk)
    pred = order[:, 0]
    return {"top1": float(hit1.mean()), "top1_ci_low": lo1, "top1_ci_high": hi1, "top5": top_k(y, scores, 5),
            "top5_ci_low": lok, "top5_ci_high": hik, "top5_k": k,
            "macro_f1": float(f1_score(y, pred, labels=np.arange(len(class_names)), average="macro", zero_division=0)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)), "n_test": int(len(y))}


def linear_probe(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], num_classes: int) -> tuple[np.ndarray, float]:
    """Balanced logistic regression on standardised features, C chosen on val; returns the test
    scores (N, C) (log-probabilities; classes absent from train get -inf) and the chosen C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in PROBE_CS:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced"))
        model.fit(features["train"], labels["train"])
        acc = float((model.predict(features["val"]) == labels["val"]).mean())
        if best is None or acc > best[0]:
            best = (acc, c, model)
    _, c, model = best
    proba = np.full((len(features["test"]), num_classes), 1e-12)
    proba[:, model.classes_] = np.maximum(model.predict_proba(features["test"]), 1e-12)
    return np.log(proba), c


@torch.no_grad()
def _features(encode: Callable[[np.ndarray], torch.Tensor], arrays: dict[str, np.ndarray], batch: int = 64) -> dict:
    return {s: torch.cat([encode(a[i: i + batch]) for i in range(0, len(a), batch)]).numpy() for s, a in arrays.items()}


def _params(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


@dataclass
class Budget:
    epochs: int
    minutes: float
    batch_size: int
    lr: float
    seed: int
    model_size: str
    image_size: int
    graph_grid: int
    graph_hidden: int
    graph_layers: int


def train_row(row: Row, data: SplitData, budget: Budget, out: Path,
              log: Callable[[str], None] = lambda m: None, checkpoints: Optional[Path] = None) -> dict:
    """Train, select and score ``row``; writes ``history.csv`` and ``test_scores.npy`` under
    ``out`` and returns the table row. Checkpoints go to ``checkpoints`` (default ``out``): one
    folder per run, so two runs of the same row never resume each other's training, while a
    re-execution of a killed run resumes its own."""
    from maemi_core.config import ClassifierTrainingConfig
    from maemi_core.vision.classifier_training import image_inputs, predict_logits, train_classifier

    if row.unavailable:
        raise RuntimeError(f"{row.method} cannot run here: {row.unavailable}")
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = checkpoints or out
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(budget.seed)
    c = len(data.class_names)
    t0 = time.perf_counter()
    extra: dict = {}
    tcfg = ClassifierTrainingConfig(batch_size=budget.batch_size, lr=budget.lr, weight_decay=0.05,
                                    max_epochs=budget.epochs, early_stopping_patience=max(3, budget.epochs // 3),
                                    lr_patience=max(2, budget.epochs // 6), augment=True, class_weighting=True,
                                    seed=budget.seed)
    fingerprint = json.dumps({"row": row.method, "budget": budget.__dict__}, sort_keys=True)
    on_epoch = lambda r: log(f"{row.method} epoch {r.epoch}: train {r.train_loss:.4f} val {r.val_loss:.4f} "   # noqa: E731
                                 f"val top-1 {r.val_acc:.3f} ({r.images_per_s:.0f} images/s)")
    if row.kind == "supervised" and row.method == "Distillation":
        scores, history, params = _distill(data, budget, tcfg, checkpoints, fingerprint, on_epoch, log)
    elif row.kind == "supervised":
        from maemi_core.vision.paper_baselines.zoo import build_supervised

        model = build_supervised(row.method, c, budget.image_size, budget.model_size)
        progress = train_classifier(model, data.images["train"], data.labels["train"], data.images["val"],
                                    data.labels["val"], tcfg, checkpoints / "checkpoint.pt", fingerprint, on_epoch=on_epoch,
                                    max_minutes=budget.minutes)
        scores = predict_logits(model, data.images["test"]).numpy()
        history, params = pd.DataFrame([h.__dict__ for h in progress.history]), _params(model)
    elif row.kind == "graph":
        from maemi_core.vision.paper_baselines.graph_models import GraphClassifier
        from maemi_core.vision.paper_baselines.patch_graphs import GraphBatcher, node_features

        feats = {s: node_features(a, budget.graph_grid) for s, a in data.images.items()}
        batcher = GraphBatcher.fitted(feats["train"], budget.graph_grid)
        model = GraphClassifier(row.method, feats["train"].shape[-1], budget.graph_hidden, budget.graph_layers, c)
        progress = train_classifier(model, feats["train"], data.labels["train"], feats["val"], data.labels["val"],
                                    tcfg.model_copy(update={"augment": False}), checkpoints / "checkpoint.pt", fingerprint,
                                    on_epoch=on_epoch, inputs=batcher, max_minutes=budget.minutes,
                                    extra_loss=lambda m: m.extra_loss())
        scores = predict_logits(model, feats["test"], inputs=batcher).numpy()
        history, params = pd.DataFrame([h.__dict__ for h in progress.history]), _params(model)
    elif row.kind == "image_ssl":
        from maemi_core.vision.paper_baselines.image_ssl import pretrain

        encoder, hist = pretrain(row.method, data.images["train"], budget.image_size, budget.model_size,
                                 budget.epochs, budget.minutes, budget.batch_size, budget.lr, budget.seed, log)
        feats = _features(lambda a: encoder(image_inputs(a)), data.images)
        scores, extra["probe_C"] = linear_probe(feats, data.labels, c)
        history, params = pd.DataFrame(hist), _params(encoder)
    elif row.kind == "graph_contrastive":
        from maemi_core.vision.paper_baselines.graph_contrastive import pretrain_graphs
        from maemi_core.vision.paper_baselines.patch_graphs import GraphBatcher, node_features

        feats = {s: node_features(a, budget.graph_grid) for s, a in data.images.items()}
        batcher = GraphBatcher.fitted(feats["train"], budget.graph_grid)
        encoder, hist = pretrain_graphs(row.method, feats["train"], batcher, budget.graph_hidden, budget.epochs,
                                        budget.minutes, budget.batch_size, budget.lr, budget.seed, log)
        emb = _features(lambda a: encoder.graph_embeddings(batcher(a)), feats)
        scores, extra["probe_C"] = linear_probe(emb, data.labels, c)
        history, params = pd.DataFrame(hist), _params(encoder)
    else:
        raise KeyError(f"unknown row kind {row.kind!r}")
    minutes = (time.perf_counter() - t0) / 60
    history.to_csv(out / "history.csv", index=False)
    np.save(out / "test_scores.npy", scores)
    result = {"method": row.method, "table": row.table, "family": row.family, "source": row.source,
              "citation": row.citation, **score(scores, data.labels["test"], data.class_names),
              "train_minutes": minutes, "epochs": int(len(history)), "params": params,
              "budget_epochs": budget.epochs, "budget_minutes": budget.minutes, "image_size": budget.image_size,
              "model_size": budget.model_size, **extra}
    return result


def _distill(data: SplitData, budget: Budget, tcfg, checkpoints: Path, fingerprint: str, on_epoch, log):
    """DeiT: a ResNet teacher (half the budget), then the distillable ViT against it."""
    import torch.nn.functional as F

    from maemi_core.data.transforms import augment
    from maemi_core.vision.classifier_training import class_weights, image_inputs, predict_logits, train_classifier
    from maemi_core.vision.paper_baselines.library_modules import import_submodule
    from maemi_core.vision.paper_baselines.zoo import build_supervised

    c = len(data.class_names)
    half = max(1, budget.epochs // 2)
    teacher = build_supervised("ResNet", c, budget.image_size, budget.model_size)
    train_classifier(teacher, data.images["train"], data.labels["train"], data.images["val"], data.labels["val"],
                     tcfg.model_copy(update={"max_epochs": half}), checkpoints / "teacher_checkpoint.pt", fingerprint + "teacher",
                     on_epoch=on_epoch, max_minutes=budget.minutes / 2)
    teacher.eval().requires_grad_(False)
    student = build_supervised("Distillation", c, budget.image_size, budget.model_size).net
    wrapper = import_submodule("vit_pytorch", "distill").DistillWrapper(teacher=teacher, student=student,
                                                                       temperature=3.0, alpha=0.5, hard=False)
    opt = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=budget.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(budget.seed)
    y = torch.from_numpy(data.labels["train"].astype(np.int64))
    weights = class_weights(data.labels["train"], c)
    best, history, t0 = None, [], time.perf_counter()
    n = len(y)
    for epoch in range(1, half + 1):
        wrapper.train()
        teacher.eval()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, budget.batch_size):
            idx = order[start: start + budget.batch_size]
            x = augment(image_inputs(data.images["train"][idx.numpy()]), gen)
            loss = wrapper(x, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        logits = predict_logits(student, data.images["val"])
        val_y = torch.from_numpy(data.labels["val"].astype(np.int64))
        val_loss = float(F.cross_entropy(logits, val_y, weight=weights))
        val_acc = float((logits.argmax(1) == val_y).float().mean())
        history.append({"epoch": epoch, "train_loss": total / n, "val_loss": val_loss, "val_acc": val_acc})
        log(f"Distillation student epoch {epoch}: train {total / n:.4f} val {val_loss:.4f} val top-1 {val_acc:.3f}")
        if best is None or val_loss < best[0]:
            best = (val_loss, {k: v.clone() for k, v in student.state_dict().items()})
        if (time.perf_counter() - t0) / 60 >= budget.minutes / 2:
            break
    student.load_state_dict(best[1])
    scores = predict_logits(student, data.images["test"]).numpy()
    return scores, pd.DataFrame(history), _params(student) + _params(teacher)
