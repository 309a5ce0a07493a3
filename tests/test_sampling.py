"""Similarity sampling on hand-made embeddings whose right answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd

from maemi_core.vision.similarity_sampling import (
    build_groups, few_shot_demonstrations, heterogeneity_groups, inter_class_similar, intra_class_dissimilar,
    spatial_heterogeneity,
)


def unit(deg: list[float]) -> np.ndarray:
    r = np.deg2rad(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def make_index(rows: list[tuple[str, str, str, float]]) -> tuple[pd.DataFrame, np.ndarray]:
    """rows of (image_id, split, label, angle in degrees)."""
    index = pd.DataFrame([r[:3] for r in rows], columns=["image_id", "split", "label"])
    return index, unit([r[3] for r in rows])


def test_few_shot_returns_nearest_train_images_most_similar_last():
    index, emb = make_index([
        ("t", "train", "a", 0.0),
        ("t_copy", "train", "a", 0.0),     # exact duplicate of the target
        ("v5", "val", "a", 4.0),           # nearest of all, but not train
        ("x10", "train", "a", 10.0),
        ("x20", "train", "b", 20.0),
        ("x30", "train", "b", 30.0),
        ("x90", "train", "b", 90.0),
        ("q", "test", "b", 24.0),
    ])
    fs = few_shot_demonstrations(index, emb, k=3, chunk_size=3).set_index("target_id")
    assert fs.loc["t", "demo_ids"] == ["x30", "x20", "x10"]          # never itself, its copy, or val
    assert fs.loc["q", "demo_ids"] == ["x10", "x30", "x20"]           # 14, 6, 4 degrees away
    assert fs.loc["v5", "demo_ids"][-1] in {"t", "t_copy"}            # 4 degrees: t or its copy
    train_ids = set(index.loc[index["split"] == "train", "image_id"])
    for target, demos in fs["demo_ids"].items():
        assert target not in demos and set(demos) <= train_ids
        sims = fs.loc[target, "demo_similarities"]
        assert sims == sorted(sims)                                     # most similar last


def test_few_shot_matches_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    n = 300
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)],
                          "split": rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2]),
                          "label": rng.choice(["a", "b", "c"], size=n)})
    fs = few_shot_demonstrations(index, emb, k=5, chunk_size=64)
    train = np.flatnonzero(index["split"] == "train")
    for i in rng.choice(n, size=25, replace=False):
        cand = [j for j in train if j != i]
        expect = sorted(cand, key=lambda j: -float(emb[i] @ emb[j]))[:5][::-1]
        assert fs.iloc[i]["demo_ids"] == [f"i{j}" for j in expect]


def test_inter_class_groups_pick_the_cross_class_look_alikes():
    index, emb = make_index([
        ("a0", "train", "a", 0.0), ("b2", "train", "b", 2.0), ("c4", "train", "c", 4.0),
        ("a90", "train", "a", 90.0), ("b180", "train", "b", 180.0), ("c270", "train", "c", 270.0),
        ("a1", "test", "a", 1.0),  # other split: never in a train group
    ])
    groups = inter_class_similar(index, emb, "train", group_size=3, n_groups=1)
    assert len(groups) == 1
    assert sorted(groups[0]["image_ids"]) == ["a0", "b2", "c4"]
    assert len(set(groups[0]["labels"])) == 3


def test_intra_class_groups_are_farthest_points_within_one_class():
    angles = [0, 10, 20, 45, 100, 170, 180]
    index, emb = make_index([(f"a{d}", "train", "a", d) for d in angles] + [("b0", "train", "b", 0.0)])
    (group,) = intra_class_dissimilar(index, emb, "train", group_size=3, n_groups=1)
    assert set(group["labels"]) == {"a"}
    ids = group["image_ids"]
    anchor = int(ids[0][1:])
    # Second member: the class-mate least similar to the anchor.
    expect2 = min((d for d in angles if d != anchor), key=lambda d: np.cos(np.deg2rad(d - anchor)))
    assert ids[1] == f"a{expect2}"
    # Third: minimises the maximum similarity to the first two.
    rest = [d for d in angles if d not in (anchor, expect2)]
    expect3 = min(rest, key=lambda d: max(np.cos(np.deg2rad(d - anchor)), np.cos(np.deg2rad(d - expect2))))
    assert ids[2] == f"a{expect3}"


def test_heterogeneity_score_ranks_uneven_images_first():
    rng = np.random.default_rng(0)
    uniform = np.full((3, 64, 64), 128, np.uint8) + rng.integers(0, 3, (3, 64, 64)).astype(np.uint8)
    uneven = uniform.copy()
    uneven[:, :32, :32] = rng.integers(0, 255, (3, 32, 32)).astype(np.uint8)   # a rough cluster in one corner
    half = uniform.copy()
    half[:, :, :32] = 30
    scores = spatial_heterogeneity(np.stack([uniform, uneven, half]))
    assert scores[0] < 0.05 and scores[1] > scores[0] and scores[2] > scores[0]

    index = pd.DataFrame({"image_id": list("pqrs"), "split": "train", "label": ["a", "a", "a", "b"]})
    (group,) = heterogeneity_groups(index, np.array([0.1, 0.9, 0.5, 0.7]), "train", group_size=2, n_groups=1)
    assert group["image_ids"] == ["q", "r"]


def test_groups_never_mix_splits():
    rng = np.random.default_rng(1)
    n = 120
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)],
                          "split": rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2]),
                          "label": rng.choice(["a", "b", "c"], size=n)})
    groups = build_groups(index, emb, rng.random(n), group_size=3, groups_per_split=4)
    split_of = dict(zip(index["image_id"], index["split"]))
    assert set(groups["kind"]) == {"inter_class_similar", "intra_class_dissimilar", "spatial_heterogeneity"}
    for _, g in groups.iterrows():
        assert {split_of[i] for i in g["image_ids"]} == {g["split"]}
        assert len(g["image_ids"]) == 3 and len(set(g["image_ids"])) == 3
    assert groups["group_id"].is_unique
