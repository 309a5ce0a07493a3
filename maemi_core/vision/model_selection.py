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
from typing import TYPE_CHECKING, Callable

import numpy as np
from sklearn.model_selection import GroupKFold

if TYPE_CHECKING:
    import pandas as pd


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


# --- choosing among models and options by grouped cross-validation ----------------------------
#
# With few sample groups (tens of micrographs, each present as dozens of shifted copies) a single
# validation split holds a handful of samples per class: which model wins on it is mostly which
# samples landed there. Every candidate (a model with its options and C) is then scored on the
# same leave-samples-out folds over train+val, and the choice is made on the mean over folds; the
# spread over folds (std) says how much of a difference between two candidates is noise.


def grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int = 5, repeats: int = 1,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-groups-out folds over all images: every group is held out exactly once per repeat and
    is never on both sides of a fold. Groups are dealt to folds so that each fold holds about the
    same class mix (``StratifiedGroupKFold``, shuffled with ``seed + repeat``); ``repeats`` > 1
    deals them again differently, which averages out the luck of one dealing."""
    from sklearn.model_selection import StratifiedGroupKFold

    y, groups = np.asarray(y), np.asarray(groups)
    n_groups = len(np.unique(groups))
    if folds < 2 or n_groups < folds:
        raise ValueError(f"grouped cross-validation needs at least {max(folds, 2)} sample groups "
                         f"({folds} folds), got {n_groups}")
    out = []
    for r in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for tr, te in splitter.split(np.zeros(len(y)), y, groups):
            if set(groups[tr]) & set(groups[te]):      # never: the splitter keeps groups whole
                raise AssertionError("a sample group on both sides of a fold")
            out.append((tr, te))
    return out


@dataclass
class CvCandidate:
    """One choice to score: ``fit_predict(train_idx, held_out_idx)`` fits on the images at
    ``train_idx`` (indices into the arrays the selection is given) and returns, for each image at
    ``held_out_idx``, its predicted class or its (n, classes) scores (the prediction is the argmax)."""
    name: str                  # unique, e.g. "efficientnet_lite0 C=0.1"
    option: str                # the report row it belongs to (a vision.baselines name)
    params: dict
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class GroupedSelection:
    best: str                  # the candidate with the best CV mean (ties: the earlier candidate)
    table: "pd.DataFrame"      # one row per candidate, in the order given
    method: str
    folds: list                # the (train_idx, held_out_idx) pairs every candidate was scored on

    def row(self, name: str) -> dict:
        return self.table.set_index("candidate").loc[name].to_dict() | {"candidate": name}

    def best_of(self, option: str) -> dict:
        """The row of ``option``'s best candidate."""
        rows = self.table[self.table["option"] == option]
        if rows.empty:
            raise KeyError(option)
        return self.row(str(rows.loc[rows["cv_top1"].idxmax(), "candidate"]))


def _predicted(out) -> np.ndarray:
    out = np.asarray(out)
    return out.argmax(1) if out.ndim == 2 else out


def select_by_grouped_cv(candidates: list[CvCandidate], y: np.ndarray, groups: np.ndarray, folds: int = 5,
                         repeats: int = 1, seed: int = 0,
                         log: Callable[[str], None] = lambda m: None) -> GroupedSelection:
    """Score every candidate on the same grouped folds (:func:`grouped_folds`): top-1 per fold, its
    mean and std over folds, and the majority-class top-1 on the same folds (each fold's training
    majority on its held-out images). The best mean wins; ties go to the earlier candidate, so list
    the simpler ones first."""
    import pandas as pd

    if not candidates:
        raise ValueError("no candidate to choose from")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique: {names}")
    y = np.asarray(y)
    splits = grouped_folds(y, groups, folds, repeats, seed)
    majority = [float((y[te] == np.bincount(y[tr]).argmax()).mean()) for tr, te in splits]
    rows = []
    for cand in candidates:
        per_fold = [float((_predicted(cand.fit_predict(tr, te)) == y[te]).mean()) for tr, te in splits]
        rows.append({"candidate": cand.name, "option": cand.option, "params": cand.params,
                     "cv_top1": float(np.mean(per_fold)), "cv_top1_std": float(np.std(per_fold)),
                     "fold_top1": per_fold, "majority_top1": float(np.mean(majority))})
        log(f"{cand.name}: grouped CV top-1 {rows[-1]['cv_top1']:.3f} +- {rows[-1]['cv_top1_std']:.3f}")
    table = pd.DataFrame(rows)
    best = names[int(np.argmax(table["cv_top1"].to_numpy()))]     # argmax: the first of equal means
    n_groups = len(np.unique(groups))
    method = (f"grouped {folds}-fold CV over train+val ({n_groups} groups"
              + (f", {repeats} dealings" if repeats > 1 else "") + ")")
    return GroupedSelection(best, table, method, splits)
