"""Choosing a classifier's regularisation (C) honestly: on the sample-disjoint validation split,
or - when that split is small - by cross-validation over train+val whose folds never split a
sample group (``group_id``: frames of one sample, see maemi_core/data/sample_groups.py).

Random folds over shifted copies of a few micrographs score the copies of a training image as
"validation": they pick the C that memorises best. Grouped folds score only unseen samples.

Every estimate comes with the majority-class score on the same images (always answering the most
frequent category of the data each model was fitted on): on an imbalanced set a model below it
has learned less than the class frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.model_selection import GroupKFold


@dataclass
class Selection:
    c: float
    val_top1: float        # the estimate the choice was made on
    method: str            # "validation split" or "grouped k-fold CV over train+val"
    scores: dict           # C -> that estimate
    # Always answering the most frequent training category, scored on the same images and folds
    # as ``val_top1``.
    majority_top1: float = 0.0


def majority_top1(y_fit: np.ndarray, y_eval: np.ndarray) -> float:
    """Top-1 of always answering the most frequent category of ``y_fit`` (ties to the smaller
    index, i.e. the first category name in sorted order), on ``y_eval``; 0.0 when either is empty."""
    if len(y_fit) == 0 or len(y_eval) == 0:
        return 0.0
    return float((np.asarray(y_eval) == np.bincount(np.asarray(y_fit)).argmax()).mean())


def choose_c(make_model: Callable[[float], object], cs: tuple[float, ...], x_tr: np.ndarray, y_tr: np.ndarray,
             g_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, g_va: np.ndarray,
             cv_below: int = 200, folds: int = 5) -> Selection:
    """The C with the best estimate (ties to the smaller C, the stronger regularisation)."""
    groups = np.concatenate([g_tr, g_va])
    if len(y_va) < cv_below and len(np.unique(groups)) >= folds:
        x, y = np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
        scores = {}
        splits = list(GroupKFold(n_splits=folds).split(x, y, groups))
        for c in cs:
            hits = []
            for tr, te in splits:
                m = make_model(c)
                m.fit(x[tr], y[tr])
                hits.append(m.predict(x[te]) == y[te])
            scores[c] = float(np.concatenate(hits).mean())
        majority = float(np.concatenate([y[te] == np.bincount(y[tr]).argmax() for tr, te in splits]).mean())
        method = f"grouped {folds}-fold CV over train+val ({len(np.unique(groups))} groups)"
    else:
        scores = {}
        for c in cs:
            m = make_model(c)
            m.fit(x_tr, y_tr)
            scores[c] = float((m.predict(x_va) == y_va).mean()) if len(y_va) else 0.0
        majority = majority_top1(y_tr, y_va)
        method = "validation split"
    best = max(cs, key=lambda c: (scores[c], -c))
    return Selection(best, scores[best], method, scores, majority)


@dataclass
class ColumnSelection:
    name: str              # the chosen column set
    selection: Selection   # C and its estimate on those columns
    scores: dict           # column set -> its best estimate


def choose_columns_and_c(make_model: Callable[[float], object], cs: tuple[float, ...], column_sets: dict[str, np.ndarray],
                         x_tr: np.ndarray, y_tr: np.ndarray, g_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray,
                         g_va: np.ndarray, cv_below: int = 200, folds: int = 5) -> ColumnSelection:
    """The column set (e.g. feature blocks) and C with the best estimate, each set by ``choose_c``
    on the same folds or validation split. Ties go to the earlier set (list the default first), so a
    set is only dropped for a better estimate."""
    if not column_sets:
        raise ValueError("no column set to choose from")
    best: tuple[str, Selection] | None = None
    scores = {}
    for name, cols in column_sets.items():
        sel = choose_c(make_model, cs, x_tr[:, cols], y_tr, g_tr, x_va[:, cols], y_va, g_va, cv_below, folds)
        scores[name] = sel.val_top1
        if best is None or sel.val_top1 > best[1].val_top1:
            best = (name, sel)
    return ColumnSelection(best[0], best[1], scores)
