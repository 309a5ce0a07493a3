"""Text metrics of the paper's tables: BLEU-2, BLEU-4, ROUGE-1, ROUGE-2, ROUGE-L and METEOR per
sample, and their mean +- standard deviation over a table's test samples.

The scorers are `evaluate` metric modules that live in this package (``metrics/``) and load
from their file path, because the Hugging Face hub is not reachable from a fab network.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

METRICS = ["bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"]
MODULES = Path(__file__).resolve().parent / "metrics"
_TOKEN = re.compile(r"\w+(?:[.,'’-]\w+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (numbers like 0.33 and words like crack-free stay whole) and punctuation."""
    return _TOKEN.findall(str(text).lower())


def pair_metric_info(description: str, citation: str, inputs: str):
    """The ``MetricInfo`` of this package's metric modules: one prediction and one reference
    string per sample."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(description=description, citation=citation, inputs_description=inputs,
                               features=datasets.Features({"predictions": datasets.Value("string"),
                                                           "references": datasets.Value("string")}))


@lru_cache(maxsize=None)
def _module(name: str):
    import evaluate

    return evaluate.load(str(MODULES / f"{name}.py"))


def score_pairs(predictions: list[str], references: list[str]) -> pd.DataFrame:
    """One row per pair with the six metrics."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return pd.DataFrame(columns=METRICS, dtype=float)
    preds = [str(p) for p in predictions]
    refs = [str(r) for r in references]
    out: dict[str, list[float]] = {}
    for name in ("maemi_bleu", "maemi_rouge", "maemi_meteor"):
        out |= _module(name).compute(predictions=preds, references=refs)
    return pd.DataFrame(out)[METRICS]


def mean_std(scores: pd.DataFrame) -> dict[str, float]:
    """``{metric: mean, metric_std: standard deviation}`` over samples (population std, as the
    spread of the scores themselves; NaN for an empty table)."""
    row: dict[str, float] = {}
    for m in METRICS:
        vals = scores[m].to_numpy(dtype=float) if m in scores and len(scores) else np.array([])
        row[m] = float(vals.mean()) if vals.size else float("nan")
        row[f"{m}_std"] = float(vals.std()) if vals.size else float("nan")
    return row


def format_mean_std(row: dict | pd.Series, metric: str, digits: int = 3) -> str:
    m, s = row.get(metric), row.get(f"{metric}_std")
    if m is None or pd.isna(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"
