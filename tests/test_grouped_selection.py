"""Choosing among models and options by grouped cross-validation: a sample group is never in two
folds, every candidate is scored on the same folds, and the best CV mean wins (a memoriser of
shifted copies does not)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from maemi_core.vision.model_selection import CvCandidate, grouped_folds, select_by_grouped_cv


def copies_of_samples(n_samples: int = 30, copies: int = 8, seed: int = 0):
    """``copies`` near-identical copies of each sample; the label follows the first 4 columns of
    the sample's centre weakly, the other 60 columns are the sample's own noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_samples) % 3
    centres = np.concatenate([np.eye(3)[labels] @ rng.normal(size=(3, 4)) * 1.5 + rng.normal(size=(n_samples, 4)),
                              rng.normal(size=(n_samples, 60))], axis=1)
    sample = np.repeat(np.arange(n_samples), copies)
    x = centres[sample] + rng.normal(scale=0.01, size=(len(sample), centres.shape[1]))
    return x, labels[sample], np.array([f"s{s:02d}" for s in sample])


@pytest.mark.parametrize("repeats", [1, 3])
def test_a_group_is_held_out_once_per_dealing_and_never_on_both_sides(repeats):
    _, y, g = copies_of_samples()
    folds = grouped_folds(y, g, folds=5, repeats=repeats, seed=4)
    assert len(folds) == 5 * repeats
    for r in range(repeats):
        held = [set(g[te]) for _, te in folds[5 * r: 5 * (r + 1)]]
        assert sum(len(h) for h in held) == len(set(g))               # every group held out exactly once
        assert set().union(*held) == set(g)
    for tr, te in folds:
        assert not set(g[tr]) & set(g[te])                           # never one group in two folds
        assert len(tr) + len(te) == len(y) and len(np.intersect1d(tr, te)) == 0
        assert set(y[te]) == {0, 1, 2}                               # classes dealt evenly (stratified)
    assert [te.tolist() for _, te in grouped_folds(y, g, 5, repeats, 4)] == [te.tolist() for _, te in folds]
    with pytest.raises(ValueError, match="at least 5 sample groups"):
        grouped_folds(y[:24], g[:24], folds=5)                       # 3 groups


def test_the_best_cv_mean_wins_not_the_memoriser_of_copies():
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    x, y, g = copies_of_samples()
    seen: dict[str, list] = {}

    def candidate(name, make, cols):
        def fit_predict(tr, te):
            seen.setdefault(name, []).append((tuple(tr), tuple(te)))
            return make().fit(x[tr][:, cols], y[tr]).predict(x[te][:, cols])
        return CvCandidate(name, name.split()[0], {"cols": len(cols)}, fit_predict)

    cands = [candidate("nn noise-columns", lambda: KNeighborsClassifier(1), np.arange(4, 64)),
             candidate("logreg signal", lambda: LogisticRegression(C=1.0, max_iter=2000), np.arange(4)),
             candidate("logreg noise", lambda: LogisticRegression(C=1.0, max_iter=2000), np.arange(4, 64))]
    sel = select_by_grouped_cv(cands, y, g, folds=5)
    t = sel.table.set_index("candidate")
    assert list(sel.table["candidate"]) == [c.name for c in cands]
    assert sel.best == t["cv_top1"].idxmax() == "logreg signal"
    for name, row in t.iterrows():                                  # mean and std over the 5 folds
        assert len(row["fold_top1"]) == 5
        assert row["cv_top1"] == pytest.approx(np.mean(row["fold_top1"]))
        assert row["cv_top1_std"] == pytest.approx(np.std(row["fold_top1"]))
    assert t.loc["logreg signal", "cv_top1"] > max(t.loc["logreg noise", "cv_top1"], t.loc["nn noise-columns", "cv_top1"]) + 0.15
    assert len({tuple(v) for v in seen.values()}) == 1               # every candidate on the same folds
    assert all(not set(g[list(tr)]) & set(g[list(te)]) for tr, te in seen["logreg signal"])
    assert sel.best_of("logreg")["candidate"] == "logreg signal"
    assert sel.method.startswith("grouped 5-fold CV") and "30 groups" in sel.method

    # Random folds (every copy its own group) put copies of a sample on both sides: the memoriser
    # then looks perfect. That is the estimate grouped folds exist to avoid.
    leaky = select_by_grouped_cv(cands, y, np.arange(len(y)).astype(str), folds=5)
    assert leaky.best == "nn noise-columns" and leaky.table.set_index("candidate").loc[leaky.best, "cv_top1"] > 0.95


def test_ties_go_to_the_earlier_candidate_and_names_are_unique():
    _, y, g = copies_of_samples()
    same = [CvCandidate(n, "o", {}, lambda tr, te: np.zeros(len(te), int)) for n in ("first", "second")]
    assert select_by_grouped_cv(same, y, g).best == "first"
    scores = [CvCandidate("scores", "o", {}, lambda tr, te: np.eye(3)[y[te]])]   # (n, classes) scores
    assert select_by_grouped_cv(scores, y, g).table["cv_top1"].iloc[0] == 1.0
    with pytest.raises(ValueError, match="unique"):
        select_by_grouped_cv(same[:1] * 2, y, g)


def test_texture_svm_options_chosen_on_elpv_samples_and_scored_once_on_test(profile_factory, monkeypatch):
    """Real ELPV cells as 10 samples of 2 (rotated) copies each for train+val plus 12 test images,
    2 of them copies of a training sample: the texture SVM's feature sets and C chosen by grouped
    CV, the winner refitted on train+val and scored on test, split into seen and unseen samples."""
    from maemi_core.data.sources import list_elpv
    from maemi_core.data.transforms import build_image_array
    from maemi_core.vision import classifiers, texture_baseline
    from maemi_core.vision.classifiers import (
        SVM_CS, VisionData, choose_model_by_grouped_cv, cv_table_markdown, grouped_selection_applies,
    )

    # 32 small images: in this process (worker processes would take longer to start than to work)
    monkeypatch.setattr(classifiers, "texture_feature_matrix",
                        lambda images: texture_baseline.texture_feature_matrix(images, n_jobs=1))

    cells = list_elpv()
    picked = [c for c in cells if c.label == "functional"][:10] + [c for c in cells if c.label == "defective"][:10]
    base = pd.DataFrame({"path": [str(c.path) for c in picked], "label": [c.label for c in picked], "crop_bottom": 0})
    imgs = build_image_array(base, 64)
    train_cells = list(range(0, 5)) + list(range(10, 15))             # 5 samples per class in train+val
    rows, images = [], []
    for i in train_cells:
        for k in (0, 2):
            rows.append({"image_id": f"c{i}_{k}", "label": picked[i].label, "sample": f"cell{i}",
                         "split": "train" if i % 5 < 4 else "val"})
            images.append(np.rot90(imgs[i], k, axes=(1, 2)))
    for i in [j for j in range(20) if j not in train_cells] + [0, 10]:   # 10 unseen samples, then 2 seen
        rows.append({"image_id": f"t{i}_{len(rows)}", "label": picked[i].label, "sample": f"cell{i}", "split": "test"})
        images.append(imgs[i])
    manifest = pd.DataFrame(rows)
    manifest["group_id"] = manifest["sample"]
    manifest["crop_bottom"] = 0
    cfg = profile_factory()
    cfg.vision.classical_feature_sets = [["lbp", "glcm"], ["glcm"]]
    data = VisionData(manifest, ["defective", "functional"], np.ascontiguousarray(np.stack(images)),
                      manifest["label"].map({"defective": 0, "functional": 1}).to_numpy())
    assert grouped_selection_applies(cfg, data)
    assert not grouped_selection_applies(cfg, VisionData(manifest.drop(columns="sample"), data.class_names,
                                                         data.images, data.labels))

    choice = choose_model_by_grouped_cv(cfg, data, ["classical"])
    table = choice.selection.table
    assert len(table) == 2 * len(SVM_CS) and choice.selection.best == table.loc[table["cv_top1"].idxmax(), "candidate"]
    assert choice.chosen["option"] == "classical" and choice.chosen["params"]["feature_set"] in {"lbp+glcm", "glcm"}
    assert (choice.test["n_test"], choice.test["n_unseen_samples"], choice.test["n_seen_samples"]) == (12, 10, 2)
    assert 0.0 <= choice.test["top1_unseen_samples"] <= 1.0
    tv_groups = set(manifest.loc[manifest["split"] != "test", "group_id"])
    for tr, te in choice.selection.folds:                           # folds over train+val only
        assert max(te) < 20 and not set(manifest["group_id"].iloc[tr]) & set(manifest["group_id"].iloc[te])
        assert set(manifest["group_id"].iloc[np.concatenate([tr, te])]) == tv_groups
    md = cv_table_markdown(choice)
    assert "(chosen)" in md and "+-" in md and md.count("| `classical") == len(table)
