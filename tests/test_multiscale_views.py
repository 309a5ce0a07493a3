"""More views of a micrograph for the frozen encoder: dihedral test-time augmentation and
multi-scale tiles of large (1024x700, 16-bit) images, on real ELPV pixels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from maemi_core.vision.multiscale_views import dihedral, scaled_tiles, tile_features, tile_starts


def test_the_eight_dihedral_transforms_are_distinct_rearrangements():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    outs = [dihedral(x, k) for k in range(8)]
    assert torch.equal(outs[0], x)
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8          # 8 different images...
    assert all(sorted(o.flatten().tolist()) == list(range(16)) for o in outs)   # ...of the same pixels
    assert torch.equal(dihedral(dihedral(x, 4), 4), x) and torch.equal(dihedral(dihedral(x, 1), 3), x)


def test_tiles_cover_a_wide_micrograph_at_each_scale():
    assert tile_starts(224, 224) == [0] and tile_starts(100, 224) == [0]
    starts = tile_starts(655, 224)
    assert starts[0] == 0 and starts[-1] == 655 - 224 and len(starts) == 3
    assert all(b - a <= 224 for a, b in zip(starts, starts[1:]))            # no gap between tiles
    rgb = np.random.default_rng(0).integers(0, 255, (700, 1024, 3), dtype=np.uint8)
    assert scaled_tiles(rgb, 1).shape == (2, 3, 224, 224)     # 224 x 328: two tiles side by side
    assert scaled_tiles(rgb, 2).shape == (6, 3, 224, 224)     # 448 x 655: 2 x 3
    with pytest.raises(ValueError, match="empty image"):
        scaled_tiles(np.zeros((0, 5, 3), np.uint8), 1)


@pytest.fixture(scope="module")
def encoder():
    from maemi_core.vision.efficientnet_lite0 import EfficientNetLite0Encoder

    return EfficientNetLite0Encoder()


def test_tile_features_of_a_16_bit_1024x700_micrograph(tmp_path, elpv_paths, encoder):
    """A 12-bit detector's image in a 16-bit TIFF gives the features of the same picture saved as
    8-bit (the occupied range is stretched, not divided by 65535), and tiles add what the
    whole-image view does not hold."""
    import tifffile

    with Image.open(elpv_paths[0]) as im:
        big = np.asarray(im.convert("L").resize((1024, 700), Image.Resampling.BICUBIC), dtype=np.float64)
    big = np.round((big - big.min()) / (big.max() - big.min()) * 255).astype(np.uint8)   # full 8-bit range
    Image.fromarray(big).save(tmp_path / "frame8.png")
    tifffile.imwrite(tmp_path / "frame16.tif", big.astype(np.uint16) * 16)                # 12-bit values
    whole = np.random.default_rng(0).normal(size=(2, 1280)).astype(np.float32)
    feats = tile_features(encoder, [str(tmp_path / "frame16.tif"), str(tmp_path / "frame8.png")], [0, 0], [1, 2], whole)
    assert feats.shape == (2, 1280 * 3) and np.array_equal(feats[:, :1280], whole)
    for j in (1, 2):
        a, b = feats[0, 1280 * j: 1280 * (j + 1)], feats[1, 1280 * j: 1280 * (j + 1)]
        assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.999
    scale1, scale2 = feats[0, 1280:2560], feats[0, 2560:]
    assert np.dot(scale1, scale2) / np.linalg.norm(scale1) / np.linalg.norm(scale2) < 0.99   # finer view differs
    with pytest.raises(ValueError, match="integer >= 1"):
        tile_features(encoder, [str(tmp_path / "frame8.png")], [0], [0], whole[:1])


def test_probe_variants_tiles_and_test_time_augmentation(profile_factory, elpv_paths, monkeypatch):
    """The probe on tile features and the probe with dihedral test-time augmentation, reported as
    their own rows; tile features are computed once per data version and scales."""
    from maemi_core.data.sources import list_elpv
    from maemi_core.data.transforms import build_image_array
    from maemi_core.vision import classifiers
    from maemi_core.vision.classifiers import VisionData, train_efficientnet_probe

    cands = list_elpv()
    rows = [c for c in cands if c.label == "functional"][:10] + [c for c in cands if c.label == "defective"][:10]
    split = (["train"] * 6 + ["val"] * 2 + ["test"] * 2) * 2
    manifest = pd.DataFrame({"image_id": [f"img{i:02d}" for i in range(20)], "path": [str(c.path) for c in rows],
                             "label": [c.label for c in rows], "split": split, "crop_bottom": 0})
    cfg = profile_factory()
    cfg.vision.tile_scales = [2]
    cfg.vision.grouped_cv_below = 0        # C on the validation split: 3 fits, not 15
    data = VisionData(manifest, ["defective", "functional"], build_image_array(manifest, 224),
                      manifest["label"].map({"defective": 0, "functional": 1}).to_numpy())
    plain = train_efficientnet_probe(cfg, data)
    tiles = train_efficientnet_probe(cfg, data, "efficientnet_lite0_tiles")
    tta = train_efficientnet_probe(cfg, data, "efficientnet_lite0_tta")
    assert (plain.name, tiles.name, tta.name) == ("efficientnet_lite0", "efficientnet_lite0_tiles", "efficientnet_lite0_tta")
    for r in (plain, tiles, tta):
        assert r.test_scores.shape == (4, 2) and np.allclose(r.test_scores.sum(1), 1.0)
    assert tiles.params["tile_scales"] == "2" and "test_time_augmentation" in tta.params
    assert tta.params["C"] == plain.params["C"] and not np.allclose(tta.test_scores, plain.test_scores)
    assert not np.allclose(tiles.test_scores, plain.test_scores)
    monkeypatch.setattr(classifiers, "tile_features", lambda *a, **k: pytest.fail("tile features recomputed"))
    again = train_efficientnet_probe(cfg, data, "efficientnet_lite0_tiles")
    np.testing.assert_allclose(again.test_scores, tiles.test_scores)
