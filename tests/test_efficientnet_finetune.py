"""Fine-tuning EfficientNet-Lite0's last blocks on cached trunk maps (a vit_classifier row)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from maemi_core.data.transforms import standardize


def _cells(n_per_class: int = 10):
    from maemi_core.data.sources import list_elpv
    from maemi_core.data.transforms import build_image_array
    from maemi_core.vision.classifiers import VisionData

    cands = list_elpv()
    rows = [c for c in cands if c.label == "functional"][:n_per_class] + \
           [c for c in cands if c.label == "defective"][:n_per_class]
    split = (["train"] * (n_per_class - 4) + ["val"] * 2 + ["test"] * 2) * 2 if n_per_class > 4 else \
        ["train"] * (2 * n_per_class)
    manifest = pd.DataFrame({"image_id": [f"img{i:02d}" for i in range(len(rows))], "path": [str(c.path) for c in rows],
                             "label": [c.label for c in rows], "split": split, "crop_bottom": 0})
    return VisionData(manifest, ["defective", "functional"], build_image_array(manifest, 224),
                      manifest["label"].map({"defective": 0, "functional": 1}).to_numpy())


def test_trunk_plus_tuned_top_is_the_pretrained_network_before_training():
    """Splitting the network at the tuned blocks changes nothing: trunk maps (cached as float16)
    through the copied top give the frozen probe's pooled features."""
    from maemi_core.vision.efficientnet_finetune import TunedTop, first_tuned_block, map_inputs, trunk_features
    from maemi_core.vision.efficientnet_lite0 import EfficientNetLite0Encoder

    data = _cells(2)
    encoder = EfficientNetLite0Encoder()
    first = first_tuned_block(encoder, 3)
    maps = trunk_features(encoder, data.images, first)
    assert maps.dtype == np.float16 and maps.shape == (4, 192, 7, 7)
    top = TunedTop(encoder, first, 2).eval()
    with torch.no_grad():
        got = top.features(map_inputs(maps)).numpy()
        ref = encoder.encode(standardize(torch.from_numpy(data.images)))[1].numpy()
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999
    assert all(p.requires_grad for p in top.parameters()) and not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match="between 1 and 16"):
        first_tuned_block(encoder, 0)


def test_dihedral_maps_are_rotations_and_flips_of_each_map():
    from maemi_core.vision.efficientnet_finetune import dihedral_maps

    x = torch.randn(16, 3, 5, 5)
    out = dihedral_maps(x, torch.Generator().manual_seed(0))
    seen = set()
    for a, b in zip(x, out):
        views = [torch.rot90(a, k, dims=(1, 2)) for k in range(4)]
        views += [torch.flip(v, dims=(2,)) for v in views]
        match = [i for i, v in enumerate(views) if torch.equal(v, b)]
        assert match
        seen.add(match[0])
    assert len(seen) > 2          # not always the identity


def test_finetune_row_trains_resumes_and_computes_the_trunk_once(profile_factory, monkeypatch):
    from maemi_core.vision import efficientnet_finetune
    from maemi_core.vision.classifiers import train_efficientnet_finetune

    cfg = profile_factory()
    cfg.vision.finetune_train.max_epochs = 3
    cfg.vision.finetune_train.batch_size = 8
    data = _cells()
    first = train_efficientnet_finetune(cfg, data, stop_after_epoch=1)      # a kill after epoch 1
    assert first.summary["epochs"] == 1
    monkeypatch.setattr(efficientnet_finetune, "trunk_features", lambda *a, **k: pytest.fail("trunk recomputed"))
    report = train_efficientnet_finetune(cfg, data)
    assert report.name == "efficientnet_lite0_finetune"
    assert report.summary["resumed_from_epoch"] == 1 and report.summary["epochs"] == 3
    assert report.test_scores.shape == (4, 2) and np.allclose(report.test_scores.sum(1), 1.0)
    assert 0.0 <= report.summary["val_top1"] <= 1.0 and report.params["finetune_blocks"] == 3
    assert report.figures["loss_curve"].is_file() and all(p.is_file() for p in report.artifacts)
