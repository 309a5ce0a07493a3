"""The category scorings of maemi_core/model/category_scoring.py on scores whose truth is known:
``fitted`` (matrix scaling on validation images) against the fixed corrections, and the choice
by validation log-loss."""

import numpy as np
import pytest

from maemi_core.model.category_scoring import (
    apply_fitted, choose, fit_matrix_scaling, fitted_folds, log_loss, out_of_fold_fitted, score, variants,
)

PRIOR = np.array([0.55, 0.25, 0.12, 0.08])


def _scores(n: int, seed: int, bias=(-2.0, -1.0, 0.5, 1.5)) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from an uneven prior and log-likelihood-like scores that rank the images by
    class (signal plus noise) but state a prior the other way round (``bias``), as a tuned model's
    summed name likelihoods can."""
    rng = np.random.default_rng(seed)
    y = rng.choice(4, size=n, p=PRIOR)
    raw = 1.2 * np.eye(4)[y] + rng.normal(0, 1.0, (n, 4)) + np.array(bias)
    return y, raw


def test_fitted_scoring_learns_the_misstated_prior_and_is_chosen_by_validation_log_loss():
    y_val, raw_val = _scores(300, seed=0)
    y_test, raw_test = _scores(2000, seed=1)
    # A content-free correction that removes the model's bias but also every trace of the prior
    # (what `calibrated` does): good balanced accuracy, poor top-1 on an uneven prior.
    flat = np.array([-2.0, -1.0, 0.5, 1.5])
    candidates = variants(raw_val, np.ones(4), np.tile(flat, (len(y_val), 1)))
    candidates["fitted"] = out_of_fold_fitted(raw_val, y_val)
    chosen, got = choose(y_val, candidates)
    assert chosen == "fitted"
    assert got["fitted"]["log_loss"] < min(got[k]["log_loss"] for k in ("raw", "mean", "calibrated"))
    # balanced accuracy alone would have preferred the prior-free correction on these images
    assert got["calibrated"]["balanced_accuracy"] > got["fitted"]["balanced_accuracy"]

    fitted = fit_matrix_scaling(raw_val, y_val)
    assert np.shape(fitted["coef"]) == (4, 4) and len(fitted["intercept"]) == 4 and fitted["C"] > 0
    s = apply_fitted(raw_test, fitted)
    top1 = lambda sc: float(np.mean(sc.argmax(1) == y_test))          # noqa: E731
    majority = float(np.mean(y_test == 0))
    assert top1(s) > majority + 0.05 and top1(s) > top1(raw_test) + 0.2 and top1(s) > top1(raw_test - flat) + 0.05
    assert log_loss(y_test, s) < log_loss(y_test, raw_test)


def test_fitted_needs_three_validation_images_of_every_category_and_says_so():
    y, raw = _scores(200, seed=2)
    y[y == 3] = 0
    y[:2] = 3                                    # two images of the last category
    assert fitted_folds(y, 4) == 0
    with pytest.raises(ValueError, match="three validation images of every category"):
        fit_matrix_scaling(raw, y)
    with pytest.raises(ValueError, match="three images of every category"):
        out_of_fold_fitted(raw, y)
    for least in (3, 4, 6):                      # the fewest a category may have: nested folds still fit
        y[:least] = 3
        assert fitted_folds(y, 4) == min(5, least)
        oof = out_of_fold_fitted(raw, y)
        assert oof.shape == raw.shape and np.isfinite(oof).all()
        assert len(fit_matrix_scaling(raw, y)["intercept"]) == 4


def test_fitted_on_two_categories_and_a_package_that_disagrees_with_the_scores():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    raw = np.stack([rng.normal(0, 1, 200), 1.5 * y + rng.normal(0, 1, 200) - 3.0], axis=1)
    fitted = fit_matrix_scaling(raw, y)
    s = apply_fitted(raw, fitted)
    assert s.shape == (200, 2) and np.mean(s.argmax(1) == y) > 0.7
    with pytest.raises(ValueError, match="re-run maemi_model"):
        apply_fitted(np.zeros((5, 3)), fitted)


class _Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(1 + len(text) // 8))}


class _Package:
    """What score() reads of a loaded package: its tokenizer and metadata."""

    def __init__(self, meta):
        self.tokenizer, self.package_meta = _Tokenizer(), meta


def test_served_scores_use_the_packages_fitted_weights_or_refuse_without_them():
    y, raw = _scores(300, seed=4)
    fitted = fit_matrix_scaling(raw, y)
    names = ["a", "b", "c", "d"]
    package = _Package({"category_scoring": {"chosen": "fitted", "fitted": fitted}})
    np.testing.assert_allclose(score(package, ["q"] * 300, names, "fitted", raw), apply_fitted(raw, fitted))
    with pytest.raises(ValueError, match="no fitted category scoring"):
        score(_Package({"category_scoring": {"chosen": "raw"}}), ["q"] * 300, names, "fitted", raw)


def test_a_paired_macro_auc_difference_resamples_both_scorings_with_the_same_images():
    from maemi_core.model.category_scoring import macro_auc, paired_macro_auc_difference

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 150)
    informative = rng.normal(size=(150, 3))
    informative[np.arange(150), y] += 1.5
    blind = rng.normal(size=(150, 3))
    d = paired_macro_auc_difference(y, informative, blind, n_boot=300)
    assert d["diff"] == pytest.approx(macro_auc(y, informative) - macro_auc(y, blind))
    assert 0 < d["ci_low"] < d["diff"] < d["ci_high"]
    assert paired_macro_auc_difference(y, informative, informative, n_boot=50) == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def _states(n: int, seed: int, width: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Hidden-state-like vectors whose category lies along directions that are not the category
    names' (what ``head`` is for): labels from the uneven prior, the class signal spread over a
    random rotation of the first four coordinates, the rest noise."""
    rng = np.random.default_rng(seed)
    y = rng.choice(4, size=n, p=PRIOR)
    rotation = np.linalg.qr(np.random.default_rng(99).normal(size=(width, width)))[0]
    h = np.concatenate([2.0 * np.eye(4)[y], np.zeros((n, width - 4))], axis=1) + rng.normal(0, 1.0, (n, width))
    return y, h @ rotation


def test_head_scoring_fitted_on_train_states_reads_held_out_images_and_travels_in_the_package():
    from maemi_core.model.category_scoring import apply_head, fit_head, package_head

    y_train, h_train = _states(600, seed=0)
    y_val, h_val = _states(400, seed=1)
    head = fit_head(h_train, y_train, 4)
    assert np.shape(head["coef"]) == (4, 24) and len(head["mean"]) == 24 and head["n"] == 600
    got = apply_head(h_val, head)
    np.testing.assert_allclose(np.exp(got).sum(1), 1.0, atol=1e-9)          # log-probabilities
    # raw name scores that see none of the signal (the names' rows point elsewhere) against the head
    raw = np.random.default_rng(2).normal(0, 1.0, (400, 4))
    candidates = variants(raw, np.ones(4), None, head=head, hidden=h_val)
    chosen, metrics = choose(y_val, candidates)
    assert chosen == "head" and metrics["head"]["macro_auc"] > 0.85 and metrics["raw"]["macro_auc"] < 0.6
    # served the same way: the package's weights, the prompts' states; refused without either
    names = ["a", "b", "c", "d"]
    package = _Package({"category_scoring": {"chosen": "head", "head": head}})
    assert package_head(package) == head
    np.testing.assert_allclose(score(package, ["q"] * 400, names, "head", raw, hidden=h_val), got)
    with pytest.raises(ValueError, match="pass hidden"):
        score(package, ["q"] * 400, names, "head", raw)
    with pytest.raises(ValueError, match="no head category scoring"):
        score(_Package({"category_scoring": {"chosen": "raw"}}), ["q"] * 400, names, "head", raw, hidden=h_val)
    with pytest.raises(ValueError, match="24-wide states"):
        apply_head(h_val[:, :10], head)


def test_head_scoring_needs_three_train_images_of_every_category_and_handles_two_categories():
    from maemi_core.model.category_scoring import apply_head, fit_head

    y, h = _states(200, seed=3)
    with pytest.raises(ValueError, match="three images of every category"):
        fit_head(h[y != 3][:50], np.where(y[y != 3][:50] == 0, 0, 1), 3)   # category 2 never seen
    binary = (y > 0).astype(int)
    head = fit_head(h, binary, 2)
    assert np.shape(head["coef"]) == (2, 24)
    assert np.mean(apply_head(h, head).argmax(1) == binary) > 0.7


def test_few_shot_prompts_of_an_older_package_served_by_head_fall_back_to_raw():
    from maemi_core.model.category_scoring import FEW_SHOT, package_scoring

    older = _Package({"category_scoring": {"chosen": "head", "head": {}}})
    assert package_scoring(older) == "head" and package_scoring(older, FEW_SHOT) == "raw"
