"""Table builders of the paper's evaluation (Tables 1, 3-7, 9, 10 and the deploy-any-rank claim
of A.1): pure functions from records, answers and scores to DataFrames, markdown and figures.

Uncertainty: every text metric is reported as a mean with a 95% percentile-bootstrap interval
over records (``<metric>_ci_low`` / ``<metric>_ci_high``), and methods that answered the same
records are compared by the paired difference of their per-record scores with its own
bootstrap interval (:func:`paired_differences`); an interval that excludes 0 is a difference
the benchmark can see. Answering lives in :mod:`~maemi_core.evaluation.answering`, the run and
registry part in :mod:`~maemi_core.evaluation.benchmark_run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from maemi_core.evaluation.answering import question as _question, reference as _reference
from maemi_core.vision.classification_metrics import _save, per_class_table
from maemi_core.evaluation.text_metrics import METRICS, score_pairs

# table name -> (instruction task, paper table, title)
TEXT_TABLES = {
    "captioning": ("caption", "Table 1", "Image captioning"),
    "vqa": ("vqa", "Table 3", "Open-ended VQA"),
    "vqa_intra_dissimilar": ("intra_dissimilar", "Table 4", "VQA on intra-class dissimilar groups"),
    "vqa_inter_similar": ("inter_similar", "Table 5", "VQA on inter-class similar groups"),
    "vqa_heterogeneity": ("heterogeneity", "Table 6", "VQA on spatial heterogeneity"),
}
CLASSIFICATION_TASKS = {"maemi_zero_shot": "classify_zero_shot", "maemi_few_shot": "classify_few_shot"}
IMAGE_TOKEN = "<image>"


# --- table builders (pure: records + answers in, DataFrames out) ----------------------------------

def text_samples(records: list[dict], answers: dict[str, list[str]]) -> pd.DataFrame:
    """Per-sample scores of every method on the same records."""
    frames = []
    refs = [_reference(r) for r in records]
    for method, got in answers.items():
        scores = score_pairs(got, refs)
        frames.append(pd.DataFrame({
            "method": method, "record_id": [r["id"] for r in records], "family": [r.get("family") for r in records],
            "length": [r.get("length") for r in records],
            "image_ids": [",".join(r["image_ids"]) for r in records], "question": [_question(r) for r in records],
            "reference": refs, "answer": got}).join(scores))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


BOOTSTRAP_SAMPLES = 2000


def bootstrap_ci(values, n_boot: int = BOOTSTRAP_SAMPLES, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over records (NaN for no records)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, (n_boot, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mean_ci(scores: pd.DataFrame) -> dict[str, float]:
    """``{metric, metric_ci_low, metric_ci_high, metric_std}`` for each text metric."""
    row: dict[str, float] = {}
    for m in METRICS:
        vals = scores[m].to_numpy(dtype=float) if m in scores and len(scores) else np.array([])
        lo, hi = bootstrap_ci(vals)
        row |= {m: float(vals.mean()) if vals.size else float("nan"), f"{m}_ci_low": lo, f"{m}_ci_high": hi,
                f"{m}_std": float(vals.std()) if vals.size else float("nan")}
    return row


def text_table(samples: pd.DataFrame, methods: list[str], unavailable: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per method: mean, 95% bootstrap interval and std of each metric over its samples."""
    rows = []
    for m in methods:
        s = samples[samples["method"] == m] if len(samples) else samples
        rows.append({"method": m, "n": int(len(s)), **mean_ci(s), "status": "ok"})
    nan = {f"{k}{suffix}": float("nan") for k in METRICS for suffix in ("", "_ci_low", "_ci_high", "_std")}
    for m, why in (unavailable or {}).items():
        rows.append({"method": m, "n": 0, **nan, "status": f"unavailable: {why}"})
    cols = ["method", "n", *[c for k in METRICS for c in (k, f"{k}_ci_low", f"{k}_ci_high", f"{k}_std")], "status"]
    return pd.DataFrame(rows, columns=cols)


def paired_difference(a, b, n_boot: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of ``a - b`` over the same records with its bootstrap interval (``level``)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    lo, hi = bootstrap_ci(d, n_boot, level=level, seed=seed)
    return {"diff": float(d.mean()) if d.size else float("nan"), "ci_low": lo, "ci_high": hi, "n": int(d.size)}


def paired_differences(table: str, samples: pd.DataFrame, method: str, against: list[str]) -> pd.DataFrame:
    """``method`` minus each of ``against`` per metric, paired by record."""
    rows = []
    mine = samples[samples["method"] == method].set_index("record_id")
    for other in against:
        theirs = samples[samples["method"] == other].set_index("record_id")
        common = mine.index.intersection(theirs.index)
        if not len(common):
            continue
        for m in METRICS:
            d = paired_difference(mine.loc[common, m], theirs.loc[common, m])
            rows.append({"table": table, "comparison": f"{method} - {other}", "metric": m, **d,
                         "excludes_zero": bool(d["ci_low"] > 0 or d["ci_high"] < 0)})
    return pd.DataFrame(rows, columns=["table", "comparison", "metric", "diff", "ci_low", "ci_high", "n",
                                       "excludes_zero"])


def family_table(samples: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (method, family), s in samples.groupby(["method", "family"], sort=True):
        rows.append({"method": method, "family": family, "n": int(len(s)), **mean_ci(s)})
    return pd.DataFrame(rows)


def length_table(table: str, samples: pd.DataFrame) -> pd.DataFrame:
    """Per method and answer length (paper A.7): mean and interval of each metric."""
    rows = []
    for (method, length), s in samples.dropna(subset=["length"]).groupby(["method", "length"], sort=True):
        rows.append({"table": table, "method": method, "length": length, "n": int(len(s)), **mean_ci(s)})
    return pd.DataFrame(rows)


def likelihood_classification(name: str, labels: list[str], scores: np.ndarray, class_names: list[str],
                              generated: Optional[list[Optional[str]]] = None,
                              generated_labels: Optional[list[str]] = None,
                              log_likelihoods: bool = True) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Summary row and per-class table of a model that scores every category (MAEMI: the
    log-likelihood of each category name as the answer; a classifier: its class scores).
    ``generated``: categories parsed from generated answers (None: unparsed) for the records
    with labels ``generated_labels``, reported as a second accuracy with its ``unparsed`` count.
    Balanced accuracy (mean recall) and macro one-vs-rest AUC with a bootstrap interval: the AUC
    ranks images by each category's normalised score (``log_likelihoods``: log-softmax over the
    categories first), 0.5 for scores that ignore the image."""
    from sklearn.metrics import f1_score

    from maemi_core.vision.classification_metrics import top_k
    from maemi_core.model.category_scoring import balanced_accuracy, macro_auc, macro_auc_interval

    index = {c: i for i, c in enumerate(class_names)}
    y = np.array([index[lab] for lab in labels], dtype=int)
    scores = np.asarray(scores, dtype=float)
    y_pred = scores.argmax(1) if len(y) else np.zeros(0, dtype=int)
    hit = (y_pred == y).astype(float)
    lo, hi = bootstrap_ci(hit)
    k = min(5, len(class_names))
    summary = {
        "method": name,
        "top1": float(hit.mean()) if len(y) else float("nan"),
        "top1_ci_low": lo, "top1_ci_high": hi,
        "top5": top_k(y, scores, 5) if len(y) else float("nan"),
        "top5_k": k,
        "macro_f1": float(f1_score(y, y_pred, labels=np.arange(len(class_names)), average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y, y_pred, labels=np.arange(len(class_names)), average="weighted",
                                      zero_division=0)),
        "n_images": int(len(y)),
        "generated_top1": float("nan"), "n_generated": 0, "unparsed": 0,
    }
    summary["balanced_accuracy"] = balanced_accuracy(y, scores) if len(y) else float("nan")
    summary["macro_auc"] = macro_auc(y, scores, log_likelihoods) if len(y) else float("nan")
    summary["macro_auc_ci_low"], summary["macro_auc_ci_high"] = (
        macro_auc_interval(y, scores, normalise=log_likelihoods) if len(y) else (float("nan"), float("nan")))
    if generated is not None:
        g = np.array([index[p] if p is not None else -1 for p in generated], dtype=int)
        gy = np.array([index[lab] for lab in generated_labels], dtype=int)
        summary |= {"generated_top1": float((g == gy).mean()) if len(g) else float("nan"), "n_generated": int(len(g)),
                    "unparsed": int((g < 0).sum())}
    return summary, per_class_table(name, y, y_pred, class_names), y_pred


CLASSIFICATION_COLUMNS = ["method", "top1", "top1_ci_low", "top1_ci_high", "balanced_accuracy", "macro_auc",
                          "macro_auc_ci_low", "macro_auc_ci_high", "top5", "top5_k", "macro_f1", "weighted_f1",
                          "n_images", "generated_top1", "n_generated", "unparsed"]


def format_ci(row, metric: str, digits: int = 3) -> str:
    m, lo, hi = row.get(metric), row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if m is None or pd.isna(m):
        return "n/a"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown_table(df: pd.DataFrame, title: str, intro: str) -> str:
    """Each metric as ``mean [95% interval]``."""
    shown = df.copy()
    for m in [*METRICS, "top1"]:
        if m in shown and f"{m}_ci_low" in shown:
            shown[m] = [format_ci(r, m) for _, r in df.iterrows()]
            shown = shown.drop(columns=[c for c in (f"{m}_ci_low", f"{m}_ci_high", f"{m}_std") if c in shown])
    return f"# {title}\n\n{intro}\n\n" + shown.to_markdown(index=False, floatfmt=".4f") + "\n"


def _write(df: pd.DataFrame, md: str, base: Path) -> dict[str, Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(base.with_suffix(".csv"), index=False)
    base.with_suffix(".md").write_text(md)
    return {f"{base.name}_csv": base.with_suffix(".csv"), f"{base.name}_md": base.with_suffix(".md")}


def text_metrics_figure(tables: dict[str, pd.DataFrame], path: Path) -> Path:
    import matplotlib.pyplot as plt

    names = [n for n in TEXT_TABLES if n in tables]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        t = tables[name][tables[name]["status"] == "ok"]
        x = np.arange(len(METRICS))
        width = 0.8 / max(1, len(t))
        for j, (_, row) in enumerate(t.iterrows()):
            means = np.array([row[m] for m in METRICS])
            err = np.array([[row[m] - row[f"{m}_ci_low"] for m in METRICS], [row[f"{m}_ci_high"] - row[m] for m in METRICS]])
            ax.bar(x + j * width, means, width, yerr=err, label=row["method"], capsize=2)
        ax.set_xticks(x + 0.4 - width / 2, METRICS, rotation=60, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Text metrics on the test records (mean, 95% bootstrap interval)")
    return _save(fig, path)


def _thumbnail(path: str, crop: int, out: Path, size: int = 96) -> Path:
    from PIL import Image

    from maemi_core.data.image_io import load_rgb_uint8

    arr = load_rgb_uint8(path)
    if crop:
        arr = arr[: arr.shape[0] - crop]
    im = Image.fromarray(arr)
    im.thumbnail((size, size))
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    return out


