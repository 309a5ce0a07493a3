"""Top-k accuracy, per-class precision/recall/F1 and the confusion-matrix figure (scikit-learn)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay, accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support,
    top_k_accuracy_score,
)


def top_k(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Top-k accuracy with k capped at the number of classes."""
    n_classes = scores.shape[1]
    k = min(k, n_classes)
    if k == n_classes:
        return 1.0  # every class is in the top k
    if n_classes == 2 and k == 1:
        return float(accuracy_score(y_true, scores.argmax(1)))
    return float(top_k_accuracy_score(y_true, scores, k=k, labels=np.arange(n_classes)))


def classification_summary(model: str, y_true: np.ndarray, scores: np.ndarray, class_names: list[str]) -> dict:
    y_pred = scores.argmax(1)
    labels = np.arange(len(class_names))
    return {
        "model": model,
        "top1": top_k(y_true, scores, 1),
        "top5": top_k(y_true, scores, 5),
        "top5_k": min(5, len(class_names)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "n_test": int(len(y_true)),
    }


def per_class_table(model: str, y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=np.arange(len(class_names)), zero_division=0)
    return pd.DataFrame({"model": model, "label": class_names, "precision": p, "recall": r, "f1": f, "support": s})


def confusion_matrix_figure(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str], title: str,
                            path: str | Path) -> Path:
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(len(class_names)))
    size = max(4.5, 0.9 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(cm, display_labels=class_names).plot(ax=ax, colorbar=False, xticks_rotation=45, cmap="Blues")
    ax.set_title(title)
    return _save(fig, path)


def loss_curve_figure(history: pd.DataFrame, title: str, path: str | Path, x: str = "epoch") -> Path:
    """Train/val loss per epoch (or along another ``x`` column, e.g. training tokens), and
    validation accuracy when the history has it."""
    with_acc = "val_acc" in history and history["val_acc"].notna().any()
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(10 if with_acc else 5.5, 3.6), squeeze=False)
    ax = axes[0]
    ax[0].plot(history[x], history["train_loss"], marker="o", label="train")
    ax[0].plot(history[x], history["val_loss"], marker="o", label="val")
    ax[0].set_xlabel(x); ax[0].set_ylabel("cross-entropy"); ax[0].legend()
    if with_acc:
        ax[1].plot(history["epoch"], history["val_acc"], color="tab:green")
        ax[1].set_xlabel("epoch"); ax[1].set_ylabel("val top-1")
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
