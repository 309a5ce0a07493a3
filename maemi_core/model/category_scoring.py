"""Category scores of the MAEMI model: zero-shot classification by the likelihood of each
category name as the answer, made comparable across categories.

The likelihood pass (:func:`maemi_core.model.generation.candidate_log_likelihoods`) gives the
summed log-probability of each name's tokens after the prompt (``raw``). Summed scores favour
short names and whatever the prompt alone makes likely, so a tuned model can answer one
category for every image while its scores still rank images by class. Four other readouts:

- ``mean``: the raw score divided by the name's number of tokens (length normalisation);
- ``calibrated``: the raw score minus the raw score of the same prompt with a content-free image
  (mid-grey, every pixel 128) in place of each image, per category: contextual calibration as in
  "Calibrate Before Use" (Zhao et al., ICML 2021), with a blank image as the content-free input.
  One extra pass per distinct prompt text (one for every zero-shot image together).
- ``fitted``: matrix scaling ("On Calibration of Modern Neural Networks", Guo et al., ICML 2017):
  a multinomial logistic regression (scikit-learn) from the log-softmax of the raw scores to the
  category, fitted on the validation images after training, its L2 strength chosen by 5-fold
  cross-validated log-loss on those images. It learns the prior the tuned model over- or
  under-states and how much each category's score says about the others (ELPV's categories are
  ordered). Its weights travel in the package.
- ``head``: a multinomial logistic regression from the final hidden state at the answer's first
  position (the vector the language-model head reads the first answer token from, after the
  gated cross-attention has put the image into it) to the category, fitted on the train images'
  zero-shot prompts (standardised states, L2 strength chosen by 5-fold cross-validated
  log-loss). The category-name rows of the LM head are a few fixed directions of that state;
  this learns the directions that separate the categories (a linear probe of the tuned model's
  own state, not of the vision encoder's features). Fitted on train images, it is judged on the
  validation images directly. Zero-shot prompts only (the train few-shot prompts would re-read
  every demonstration). One extra likelihood pass over the train prompts (about 4 minutes for
  ELPV's 1,809 on 2 cores). Its weights travel in the package.

Which one a model uses is chosen on validation images after training and stored in the package
(``category_scoring``), so the benchmark, ``maemi classify`` and the served model all score
categories the same way. The few-shot prompt (demonstrations before the query image) gets its own
choice and its own ``fitted`` weights, made the same way on the validation few-shot prompts
(``category_scoring["few_shot"]``): a scaling fitted on one prompt's scores does not transfer to
another's. ``calibrated`` is not offered there (its content-free pass would read every
demonstration again). The criterion is the log-loss of the softmax over the categories: those
are the probabilities ``maemi classify`` and the served model return, and a proper scoring rule
rewards both ranking the images (macro AUC) and stating the real prior (top-1), where balanced
accuracy ignores the prior. ``fitted`` is judged on out-of-fold predictions (nested
cross-validation), never on the images it was fitted on; ``head`` never sees a validation image
before it is judged. A tie keeps the simpler, in the order raw, mean, calibrated, fitted, head.
The benchmark reports every scoring.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import numpy as np

SCORINGS = ("raw", "mean", "calibrated", "fitted", "head")
ZERO_SHOT, FEW_SHOT = "classify_zero_shot", "classify_few_shot"
CONTENT_FREE_PIXEL = 128
FITTED_CS = (0.01, 0.1, 1.0, 10.0, 100.0)    # inverse L2 strengths ``fitted`` chooses among
FITTED_FOLDS = 5


def name_lengths(tokenizer, class_names: list[str]) -> np.ndarray:
    """Tokens of each category name as the likelihood pass tokenises it."""
    return np.array([max(1, len(tokenizer(c, add_special_tokens=False)["input_ids"])) for c in class_names], dtype=float)


def content_free_image(size: int) -> np.ndarray:
    """(3, size, size) uint8 mid-grey: an image that shows nothing."""
    return np.full((3, size, size), CONTENT_FREE_PIXEL, dtype=np.uint8)


def content_free_scores(model, questions: list[str], class_names: list[str], rank: Optional[int] = None,
                        batch_size: int = 8) -> np.ndarray:
    """(len(questions), C) raw category scores of each question with a content-free image in
    place of each of its images; each distinct question is run once."""
    from maemi_core.model.generation import candidate_log_likelihoods
    from maemi_core.model.maemi_model import IMAGE_TOKEN

    distinct = list(dict.fromkeys(questions))
    if not distinct:
        return np.zeros((0, len(class_names)))
    grey = content_free_image(model.cfg.image_size)
    images = [[grey] * max(1, q.count(IMAGE_TOKEN)) for q in distinct]
    ll = candidate_log_likelihoods(model, distinct, images, class_names, rank=rank, batch_size=batch_size)
    row = {q: ll[i] for i, q in enumerate(distinct)}
    return np.stack([row[q] for q in questions])


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Scores turned into log-probabilities over the categories (rows)."""
    return scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)


def apply_fitted(raw: np.ndarray, fitted: dict) -> np.ndarray:
    """``fitted`` scores: the matrix scaling of :func:`fit_matrix_scaling` applied to ``raw``."""
    coef, intercept = np.asarray(fitted["coef"], dtype=float), np.asarray(fitted["intercept"], dtype=float)
    if coef.shape != (raw.shape[1], raw.shape[1]) or intercept.shape != (raw.shape[1],):
        raise ValueError(f"the fitted category scoring has {coef.shape[0]} categories, the scores {raw.shape[1]}: "
                         "the package and its category names disagree; re-run maemi_model")
    return log_softmax(raw) @ coef.T + intercept


def _matrix_scaling(seed: int, folds: int):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    return LogisticRegressionCV(Cs=list(FITTED_CS), cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                scoring="neg_log_loss", max_iter=5000)


def fitted_folds(y: np.ndarray, n_classes: int) -> int:
    """Folds for ``fitted`` on these labels: 0 (not offered) unless every category has at least
    three images, so that every fold of the nested cross-validation can learn every category."""
    least = int(np.bincount(y, minlength=n_classes).min())
    return 0 if least < 3 else min(FITTED_FOLDS, least)


def fit_matrix_scaling(raw: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """The ``fitted`` scoring's weights on these (validation) images: {"coef": C x C,
    "intercept": C, "C": the chosen inverse L2 strength}. Every category must be among ``y``
    (:func:`fitted_folds`)."""
    n = raw.shape[1]
    folds = fitted_folds(y, n)
    if not folds:
        raise ValueError("fitting the category scoring needs at least three validation images of every category")
    with warnings.catch_warnings():      # scikit-learn 1.9 announces a change of LogisticRegressionCV's attributes
        warnings.simplefilter("ignore", FutureWarning)
        m = _matrix_scaling(seed, folds).fit(log_softmax(raw), y)
    coef, intercept = np.asarray(m.coef_), np.asarray(m.intercept_)
    if n == 2:       # scikit-learn's binary model: one row, the log-odds of the second category
        coef, intercept = np.vstack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, intercept[0]])
    return {"coef": coef.tolist(), "intercept": intercept.tolist(), "C": float(m.C_[0])}


HEAD_CS = (0.001, 0.01, 0.1, 1.0)   # inverse L2 strengths ``head`` chooses among (standardised states)


def fit_head(hidden: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> dict:
    """``head`` weights: a multinomial logistic regression from the standardised final hidden state
    at the answer position (the vector the language-model head turns into the first answer token)
    to the category, its L2 strength chosen by 5-fold cross-validated log-loss on these images."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    folds = fitted_folds(y, n_classes)
    if not folds:
        raise ValueError("fitting the head category scoring needs at least three images of every category")
    mean, std = hidden.mean(0), hidden.std(0)
    scale = np.where(std > 0, std, 1.0)      # a constant coordinate stays 0, whatever a new state holds there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = LogisticRegressionCV(Cs=list(HEAD_CS), cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                 scoring="neg_log_loss", max_iter=5000).fit((hidden - mean) / scale, y)
    coef, intercept = np.asarray(m.coef_), np.asarray(m.intercept_)
    if n_classes == 2:
        coef, intercept = np.vstack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, intercept[0]])
    return {"mean": mean.tolist(), "scale": scale.tolist(), "coef": coef.tolist(), "intercept": intercept.tolist(),
            "C": float(m.C_[0]), "n": int(len(y))}


def apply_head(hidden: np.ndarray, head: dict) -> np.ndarray:
    """``head`` scores (log-probabilities over the categories) of these hidden states."""
    coef = np.asarray(head["coef"], dtype=float)
    if hidden.shape[1] != coef.shape[1]:
        raise ValueError(f"the head category scoring reads {coef.shape[1]}-wide states, the model gives "
                         f"{hidden.shape[1]}: the package and its head disagree; re-run maemi_model")
    z = (hidden - np.asarray(head["mean"])) / np.asarray(head["scale"])
    return log_softmax(z @ coef.T + np.asarray(head["intercept"], dtype=float))


def out_of_fold_fitted(raw: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """``fitted`` scores of each image by a matrix scaling fitted without it (nested
    cross-validation): what the scoring is worth on images it has not seen."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    outer = fitted_folds(y, raw.shape[1])
    if not outer:
        raise ValueError("judging the fitted category scoring needs at least three images of every category")
    least = int(np.bincount(y, minlength=raw.shape[1]).min())
    inner = min(FITTED_FOLDS, least - -(-least // outer))   # each outer training part keeps this many of every category
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return cross_val_predict(_matrix_scaling(seed, inner), log_softmax(raw), y,
                                 cv=StratifiedKFold(outer, shuffle=True, random_state=seed + 1),
                                 method="predict_log_proba")


def variants(raw: np.ndarray, lengths: np.ndarray, content_free: Optional[np.ndarray],
             fitted: Optional[dict] = None, head: Optional[dict] = None,
             hidden: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Every scoring of the same raw scores (``calibrated`` only with content-free scores,
    ``fitted`` only with a package's fitted weights, ``head`` only with its weights and the
    prompts' answer-position hidden states)."""
    out = {"raw": raw, "mean": raw / lengths[None, :]}
    if content_free is not None:
        out["calibrated"] = raw - content_free
    if fitted is not None:
        out["fitted"] = apply_fitted(raw, fitted)
    if head is not None and hidden is not None:
        out["head"] = apply_head(hidden, head)
    return out


def score(model, questions: list[str], class_names: list[str], scoring: str, raw: np.ndarray,
          rank: Optional[int] = None, batch_size: int = 8, hidden: Optional[np.ndarray] = None) -> np.ndarray:
    """``raw`` scores of ``questions`` turned into ``scoring`` (``head``: from ``hidden``, the
    prompts' answer-position states, :func:`candidate_log_likelihoods` with ``return_hidden``)."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown category scoring {scoring!r}: one of {SCORINGS}")
    fitted, head = package_fitted(model), package_head(model)
    if scoring == "fitted" and fitted is None:
        raise ValueError("this package has no fitted category scoring: re-run maemi_model")
    if scoring == "head" and head is None:
        raise ValueError("this package has no head category scoring: re-run maemi_model")
    if scoring == "head" and hidden is None:
        raise ValueError("the head category scoring reads the prompts' hidden states: pass hidden")
    cf = content_free_scores(model, questions, class_names, rank, batch_size) if scoring == "calibrated" else None
    return variants(raw, name_lengths(model.tokenizer, class_names), cf, fitted, head, hidden)[scoring]


def _package_choice(model, task: str) -> dict:
    got = (getattr(model, "package_meta", None) or {}).get("category_scoring", {})
    return (got.get("few_shot") or {}) if task == FEW_SHOT else got


def package_scoring(model, task: str = ZERO_SHOT) -> str:
    """The scoring a loaded package was given at training time for ``task``'s prompts (``raw`` for
    packages without one). A package without a few-shot choice (made before there was one) reads
    few-shot prompts with its zero-shot scoring, except ``fitted`` (fitted on other prompts): ``raw``."""
    if task == FEW_SHOT and not _package_choice(model, FEW_SHOT):
        zero_shot = package_scoring(model)
        return "raw" if zero_shot in ("fitted", "head") else zero_shot
    return _package_choice(model, task).get("chosen", "raw")


def package_fitted(model, task: str = ZERO_SHOT) -> Optional[dict]:
    """The ``fitted`` scoring's weights a package carries for ``task``'s prompts (None: not fitted)."""
    return _package_choice(model, task).get("fitted")


def package_head(model, task: str = ZERO_SHOT) -> Optional[dict]:
    """The ``head`` scoring's weights a package carries for ``task``'s prompts (None: none)."""
    return _package_choice(model, task).get("head")


def balanced_accuracy(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (ties in a row go to the first class)."""
    if not len(y):
        return float("nan")
    pred = scores.argmax(1)
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-record weights whose weighted mean of hits is the balanced accuracy: the promotion's
    paired per-record comparison of balanced accuracy."""
    classes, counts = np.unique(y, return_counts=True)
    per = dict(zip(classes, len(y) / (len(classes) * counts)))
    return np.array([per[c] for c in y], dtype=float)


def macro_auc(y: np.ndarray, scores: np.ndarray, normalise: bool = True) -> float:
    """Mean one-vs-rest ROC AUC over the classes present with both outcomes; 0.5 for scores that
    do not depend on the image. ``normalise``: log-likelihoods, turned into log-probabilities
    over the categories (log-softmax) first; else the scores as given (a classifier's)."""
    aucs = [v for v in per_class_auc(y, scores, normalise) if np.isfinite(v)]
    return float(np.mean(aucs)) if aucs else float("nan")


def per_class_auc(y: np.ndarray, scores: np.ndarray, normalise: bool = True) -> list[float]:
    """One-vs-rest ROC AUC of each category's score (NaN for a category absent or alone)."""
    s = log_softmax(scores) if normalise else scores
    return [_auc(y == c, s[:, c]) if 0 < (y == c).sum() < len(y) else float("nan") for c in range(scores.shape[1])]


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half, as scikit-learn's roc_auc_score):
    the bootstrap evaluates it thousands of times, so no per-call validation."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n_pos = int(positive.sum())
    n_neg = len(score) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc_interval(y: np.ndarray, scores: np.ndarray, n_boot: int = 500, level: float = 0.95,
                       seed: int = 0, normalise: bool = True) -> tuple[float, float]:
    """Percentile-bootstrap interval of :func:`macro_auc` over the images."""
    return _image_bootstrap(len(y), lambda idx: macro_auc(y[idx], scores[idx], normalise), n_boot, level, seed)


def paired_macro_auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 2000,
                                level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """:func:`macro_auc` of scores ``a`` minus that of ``b`` on the same images, with a
    percentile-bootstrap interval (both resampled with the same images)."""
    lo, hi = _image_bootstrap(len(y), lambda idx: macro_auc(y[idx], a[idx]) - macro_auc(y[idx], b[idx]),
                              n_boot, level, seed)
    return {"diff": macro_auc(y, a) - macro_auc(y, b), "ci_low": lo, "ci_high": hi}


def _image_bootstrap(n: int, statistic: Callable[[np.ndarray], float], n_boot: int, level: float,
                     seed: int) -> tuple[float, float]:
    """Percentile interval of ``statistic(indices)`` over ``n_boot`` resamplings of ``n`` images
    (draws that are not finite, e.g. a category missing from the draw, left out)."""
    rng = np.random.default_rng(seed)
    draws = [statistic(idx) for idx in (rng.integers(0, n, n) for _ in range(n_boot))]
    draws = np.array([d for d in draws if np.isfinite(d)])
    if not len(draws):
        return float("nan"), float("nan")
    q = (1 - level) / 2 * 100
    return float(np.percentile(draws, q)), float(np.percentile(draws, 100 - q))


def log_loss(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean negative log-probability of the true category under the softmax of ``scores``."""
    return float(-log_softmax(scores)[np.arange(len(y)), y].mean()) if len(y) else float("nan")


def validation_metrics(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {"log_loss": log_loss(y, scores), "top1": float(np.mean(scores.argmax(1) == y)),
            "balanced_accuracy": balanced_accuracy(y, scores), "macro_auc": macro_auc(y, scores)}


def choose(y: np.ndarray, by_scoring: dict[str, np.ndarray]) -> tuple[str, dict[str, dict[str, float]]]:
    """The scoring with the lowest log-loss on these (validation) images (``fitted``: its
    out-of-fold scores); a tie keeps the earlier of ``SCORINGS``. Returns (chosen, the metrics of
    each: log-loss, top-1, balanced accuracy, macro AUC)."""
    got = {k: validation_metrics(y, v) for k, v in by_scoring.items()}
    best = min(m["log_loss"] for m in got.values())
    chosen = next(k for k in SCORINGS if k in got and got[k]["log_loss"] <= best + 1e-12)
    return chosen, got


def record_scores(model, recs: list[dict], class_names: list[str], media_of: Callable[[list[dict]], object],
                  batch_size: int = 8, rank: Optional[int] = None, return_hidden: bool = False):
    """(len(recs), C) raw category scores of each record's question with its images
    (``media_of(records)``: their visual tokens, e.g. from a memo); ``return_hidden``: and the
    answer position's final hidden states (``head``'s input)."""
    from maemi_core.model.generation import candidate_log_likelihoods

    return candidate_log_likelihoods(model, [r["conversations"][0]["value"] for r in recs], [[] for _ in recs],
                                     class_names, rank=rank, batch_size=batch_size,
                                     media_of=lambda a, b: media_of(recs[a:b]), return_hidden=return_hidden)


def validation_records(records: list[dict], class_names: list[str], task: str = ZERO_SHOT) -> list[dict]:
    """The validation records of ``task`` (zero- or few-shot) the scoring is chosen on (the
    detailed question, the one the benchmark scores), by record id."""
    return sorted([r for r in records if r["split"] == "val" and r["task"] == task
                   and r.get("length") != "concise" and r.get("label") in class_names], key=lambda r: r["id"])


def train_records(records: list[dict], class_names: list[str], task: str = ZERO_SHOT) -> list[dict]:
    """The train records of ``task`` whose hidden states ``head`` is fitted on (the detailed
    question, as :func:`validation_records`), by record id."""
    return sorted([r for r in records if r["split"] == "train" and r["task"] == task
                   and r.get("length") != "concise" and r.get("label") in class_names], key=lambda r: r["id"])


def choose_on_validation(model, records: list[dict], class_names: list[str], media_of: Callable[[list[dict]], object],
                         batch_size: int = 8, limit: Optional[int] = None, seed: int = 0, task: str = ZERO_SHOT,
                         head_train_images: Optional[int] = None) -> dict:
    """Score up to ``limit`` validation records of ``task`` (None: all) every way, fit ``fitted``
    on them, fit ``head`` on up to ``head_train_images`` train records (zero-shot prompts only;
    None: all, 0: not offered) and choose (see :func:`choose`). ``media_of(records)``: their
    visual tokens. Returns what the package stores: the choice, each scoring's validation
    metrics, ``fitted``'s and ``head``'s weights."""
    recs = validation_records(records, class_names, task)[:limit]
    if len({r["label"] for r in recs}) < 2:
        return {"chosen": "raw", "reason": "fewer than two categories among the validation images", "n": len(recs)}
    qs = [r["conversations"][0]["value"] for r in recs]
    raw, hidden = record_scores(model, recs, class_names, media_of, batch_size, return_hidden=True)
    cf = content_free_scores(model, qs, class_names, batch_size=batch_size) if task == ZERO_SHOT else None
    y = np.array([class_names.index(r["label"]) for r in recs])
    candidates = variants(raw, name_lengths(model.tokenizer, class_names), cf)
    fitted, head, notes = None, None, []
    if fitted_folds(y, len(class_names)):
        fitted = fit_matrix_scaling(raw, y, seed)
        candidates["fitted"] = out_of_fold_fitted(raw, y, seed)
    else:
        notes.append("fitted not offered: fewer than three validation images of some category")
    if task == ZERO_SHOT and head_train_images != 0:
        train = train_records(records, class_names, task)[:head_train_images]
        y_train = np.array([class_names.index(r["label"]) for r in train], dtype=int)
        if fitted_folds(y_train, len(class_names)):
            _, h_train = record_scores(model, train, class_names, media_of, batch_size, return_hidden=True)
            head = fit_head(h_train, y_train, len(class_names), seed)
            candidates["head"] = apply_head(hidden, head)
        else:
            notes.append("head not offered: fewer than three train images of some category")
    chosen, got = choose(y, candidates)
    out = {"chosen": chosen, "validation": got, "n": len(recs), "fitted": fitted}
    if head is not None:
        out["head"] = head
    return out | ({"note": "; ".join(notes)} if notes else {})
