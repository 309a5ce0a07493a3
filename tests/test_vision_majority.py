"""A collapsed classifier never passes as a result: on an imbalanced set every vision row carries
the majority-class score (always the most frequent train category) and a below_majority flag, the
asset check warns, and a model below the majority is never chosen as the encoder."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from maemi_core.config import load_config
from maemi_core.data.manifest import load_manifest
from maemi_core.data.sources import list_elpv
from maemi_core.vision.classifiers import vision_dir
from maemi_dagster.assets.data import raw_images
from maemi_dagster.assets.vision import vit_classifier
from maemi_dagster.checks import VISION_CHECKS
from maemi_dagster.resources import MaemiConfigResource, MLflowResource
from tests.conftest import save_as


@pytest.fixture(scope="module")
def shuffled_imbalanced(tmp_path_factory):
    """56 real ELPV cells in two folders, 40 (~70%) and 16, assigned by a seeded shuffle that
    ignores the cells' own labels: there is nothing to learn but the class frequencies. A small
    paper ViT (2 layers) trains 3 epochs, alone (no baselines)."""
    tmp = tmp_path_factory.mktemp("majority")
    cells = [c.path for c in list_elpv()[:56]]
    order = np.random.default_rng(0).permutation(len(cells))
    for i, j in enumerate(order):
        save_as(cells[j], tmp / "images" / ("common" if i < 40 else "rare") / f"cell{j:03d}.png")
    profile = tmp / "profile.yaml"
    profile.write_text(yaml.safe_dump({
        "dataset": {"name": "shuffled", "kind": "imagefolder", "root": "images", "prompt_pack": "elpv",
                    "split": {"train": 0.6, "val": 0.2, "test": 0.2}, "max_imbalance_ratio": 20.0},
        "workdir": "work",
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "shuffled"},
        "vision": {"encoder": "vit", "baselines": [], "vit": {"depth": 2},
                   "train": {"max_epochs": 3, "batch_size": 16, "augment": False, "early_stopping_patience": 5,
                             "lr_patience": 5}},
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = dg.materialize([raw_images, vit_classifier, *VISION_CHECKS],
                                resources={"maemi_config": MaemiConfigResource(path=str(profile)),
                                           "mlflow_tracking": MLflowResource()},
                                instance=dg.DagsterInstance.ephemeral())
    assert result.success
    return load_config(profile), result


def test_vit_on_shuffled_labels_is_flagged_below_the_majority_and_the_check_warns(shuffled_imbalanced):
    cfg, result = shuffled_imbalanced
    vision = vision_dir(cfg)
    manifest = load_manifest(cfg)
    train = manifest[manifest["split"] == "train"]["label"]
    assert train.value_counts().idxmax() == "common"

    summary = json.loads((vision / "summary.json").read_text())
    (vit,) = summary["models"]
    # The majority scores are those of always answering "common", on each split.
    for split, key in (("val", "val_majority_top1"), ("test", "majority_top1")):
        expected = (manifest[manifest["split"] == split]["label"] == "common").mean()
        assert vit[key] == pytest.approx(expected)
    assert vit["val_majority_top1"] > 0.5
    # Shuffled labels with class weighting: below always answering "common", and flagged so.
    assert vit["val_top1"] < vit["val_majority_top1"], vit
    assert vit["val_below_majority"] is True
    assert vit["below_majority"] is (vit["top1"] < vit["majority_top1"])
    assert summary["majority_class"] == "common" and summary["below_majority_on_val"] == ["vit"]
    # Never the encoder: with no other encoder, none is.
    assert summary["best_encoder_on_val"] is None

    classification = pd.read_csv(vision / "classification.csv")
    assert {"majority_top1", "below_majority", "val_majority_top1", "val_below_majority"} <= set(classification)
    assert bool(classification.loc[0, "val_below_majority"]) is True
    assert "Below it on test" in (vision / "classification.md").read_text()

    (mat,) = result.asset_materializations_for_node("vit_classifier")
    assert mat.metadata["vit_val_below_majority"].value is True
    assert "vit" in mat.metadata["below_majority"].value
    assert mat.metadata["best_encoder_on_val"].value == "none"
    assert "val_below_majority" in mat.metadata["classification"].value

    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    below = checks["vit_classifier_not_below_majority"]
    assert not below.passed and below.severity == dg.AssetCheckSeverity.WARN
    assert below.metadata["below_majority_on_val"].value == "vit"
    assert "below the majority class" in below.description
    encoder = checks["vit_classifier_encoder_is_validation_winner"]
    assert not encoder.passed and encoder.severity == dg.AssetCheckSeverity.WARN


def test_majority_of_grouped_folds_is_scored_on_the_same_images():
    """With grouped CV, the majority score is each fold's training majority on its held-out
    images: the estimate a probe's val_top1 is compared with."""
    from sklearn.dummy import DummyClassifier

    from maemi_core.vision.model_selection import choose_c, majority_top1

    rng = np.random.default_rng(1)
    y = (rng.random(120) < 0.3).astype(int)         # ~70% class 0
    x = rng.normal(size=(120, 4))
    g = np.repeat(np.arange(40), 3).astype(str)
    sel = choose_c(lambda c: DummyClassifier(strategy="most_frequent"), (1.0,), x[:90], y[:90], g[:90],
                   x[90:], y[90:], g[90:], cv_below=100)
    assert sel.method.startswith("grouped")
    assert sel.majority_top1 == pytest.approx(sel.val_top1)      # the constant answer is the majority
    val = choose_c(lambda c: DummyClassifier(strategy="most_frequent"), (1.0,), x[:90], y[:90], g[:90],
                   x[90:], y[90:], g[90:], cv_below=10)
    assert val.method == "validation split" and val.majority_top1 == majority_top1(y[:90], y[90:]) == val.val_top1
