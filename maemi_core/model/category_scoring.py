"""Category scores of the MAEMI model: zero-shot classification by the likelihood of each
category name as the answer, made comparable across categories.

The likelihood pass (:func:`maemi_core.model.generation.candidate_log_likelihoods`) gives the
summed log-probability of each name's tokens after the prompt (``raw``). Summed scores favour
short names and whatever the prompt alone makes likely, so a tuned model can answer one
category for every image while its scores still rank images by class. Two corrections:

- ``mean``: the raw score divided by the name's number of tokens (length normalisation);
- ``calibrated``: the raw score minus the raw score of the same prompt with a content-free image
  (mid-grey, every pixel 128) in place of each image, per category: contextual calibration as in
  "Calibrate Before Use" (Zhao et al., ICML 2021), with a blank image as the content-free input.
  One extra pass per distinct prompt text (one for every zero-shot image together).

Which one a model uses is chosen on validation images after training (balanced accuracy; a tie
keeps the simpler, in the order raw, mean, calibrated) and stored in the package
(``category_scoring``), so the benchmark, ``maemi classify`` and the served model all score
categories the same way. The benchmark reports all three.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

SCORINGS = ("raw", "mean", "calibrated")
CONTENT_FREE_PIXEL = 128


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


def variants(raw: np.ndarray, lengths: np.ndarray, content_free: Optional[np.ndarray]) -> dict[str, np.ndarray]:
    """Every scoring of the same raw scores (``calibrated`` only with content-free scores)."""
    out = {"raw": raw, "mean": raw / lengths[None, :]}
    if content_free is not None:
        out["calibrated"] = raw - content_free
    return out


def score(model, questions: list[str], class_names: list[str], scoring: str, raw: np.ndarray,
          rank: Optional[int] = None, batch_size: int = 8) -> np.ndarray:
    """``raw`` scores of ``questions`` turned into ``scoring``."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown category scoring {scoring!r}: one of {SCORINGS}")
    cf = content_free_scores(model, questions, class_names, rank, batch_size) if scoring == "calibrated" else None
    return variants(raw, name_lengths(model.tokenizer, class_names), cf)[scoring]


def package_scoring(model) -> str:
    """The scoring a loaded package was given at training time (``raw`` for packages without one)."""
    return (getattr(model, "package_meta", None) or {}).get("category_scoring", {}).get("chosen", "raw")


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
    s = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True) if normalise else scores
    aucs = [_auc(y == c, s[:, c]) for c in range(scores.shape[1]) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


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
    rng = np.random.default_rng(seed)
    draws = [macro_auc(y[idx], scores[idx], normalise) for idx in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
    draws = np.array([d for d in draws if np.isfinite(d)])
    if not len(draws):
        return float("nan"), float("nan")
    a = (1 - level) / 2 * 100
    return float(np.percentile(draws, a)), float(np.percentile(draws, 100 - a))


def choose(y: np.ndarray, by_scoring: dict[str, np.ndarray]) -> tuple[str, dict[str, float]]:
    """The scoring with the best balanced accuracy on these (validation) images; a tie keeps the
    earlier of ``SCORINGS``. Returns (chosen, balanced accuracy of each)."""
    got = {k: balanced_accuracy(y, v) for k, v in by_scoring.items()}
    best = max(got.values())
    chosen = next(k for k in SCORINGS if k in got and got[k] >= best - 1e-12)
    return chosen, got


def choose_on_validation(model, records: list[dict], class_names: list[str], media_of: Callable[[list[dict]], object],
                         batch_size: int = 8, limit: Optional[int] = 128) -> dict:
    """Score up to ``limit`` validation zero-shot records every way and choose (see :func:`choose`).
    ``media_of(records)``: their visual tokens. Returns what the package stores."""
    from maemi_core.model.generation import candidate_log_likelihoods

    recs = [r for r in records if r["split"] == "val" and r["task"] == "classify_zero_shot"
            and r.get("length") != "concise" and r.get("label") in class_names]
    recs = sorted(recs, key=lambda r: r["id"])[:limit]
    if len({r["label"] for r in recs}) < 2:
        return {"chosen": "raw", "reason": "fewer than two categories among the validation images", "n": len(recs)}
    qs = [r["conversations"][0]["value"] for r in recs]
    raw = np.concatenate([candidate_log_likelihoods(model, qs[s:s + batch_size], [[] for _ in qs[s:s + batch_size]],
                                                    class_names, batch_size=batch_size,
                                                    media_of=lambda a, b, s=s: media_of(recs[s + a:s + b]))
                          for s in range(0, len(recs), batch_size)])
    cf = content_free_scores(model, qs, class_names, batch_size=batch_size)
    y = np.array([class_names.index(r["label"]) for r in recs])
    chosen, got = choose(y, variants(raw, name_lengths(model.tokenizer, class_names), cf))
    return {"chosen": chosen, "val_balanced_accuracy": got, "n": len(recs)}
