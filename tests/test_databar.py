"""Instrument data-bar detection on real micrograph-like images (scikit-image's samples)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw

from maemi_core.data.databar import crop_databar, detect_databar
from maemi_core.data.image_io import load_gray_array
from maemi_core.data.manifest import build_manifest


def with_databar(gray: np.ndarray, rows: int, white_background: bool = False) -> np.ndarray:
    """Append an FEI-style bar: a separator line, then text and a scale bar on a flat band."""
    w = gray.shape[1]
    band = Image.new("L", (w, rows), 0)
    draw = ImageDraw.Draw(band)
    draw.text((8, 4), "HV 5.00 kV | WD 4.1 mm | mag 50 000 x | det ETD | 500 nm", fill=255)
    draw.line((w - 130, rows - 8, w - 20, rows - 8), fill=255, width=3)
    bar = np.asarray(band, dtype=np.float32) / 255.0
    separator = np.ones((2, w), dtype=np.float32)
    if white_background:
        bar, separator = 1.0 - bar, 1.0 - separator
    return np.vstack([gray, separator, bar])


@pytest.mark.parametrize("name", ["coins", "camera", "moon", "gravel"])
@pytest.mark.parametrize("rows", [18, 40])
@pytest.mark.parametrize("white", [False, True])
def test_detects_bars_of_any_height(name, rows, white):
    gray = getattr(skimage.data, name)().astype(np.float32) / 255.0
    assert detect_databar(gray) == 0
    full = with_databar(gray, rows, white_background=white)
    cropped, height = crop_databar(full)
    assert height == rows + 2
    np.testing.assert_array_equal(cropped, gray)


def test_no_false_bars_on_real_cells(elpv_paths):
    assert [detect_databar(load_gray_array(p)) for p in elpv_paths] == [0] * len(elpv_paths)


def test_manifest_records_the_crop(tmp_path, profile_factory, elpv_paths):
    coins = skimage.data.coins().astype(np.float32) / 255.0
    for i in range(3):
        Image.fromarray((with_databar(coins, 24 + 8 * i) * 255).astype(np.uint8)).save(
            (tmp_path / "images" / "particles").mkdir(parents=True, exist_ok=True) or
            tmp_path / "images" / "particles" / f"sem{i}.png")
    (tmp_path / "images" / "cells").mkdir()                  # a manifest needs two classes
    Image.open(elpv_paths[0]).save(tmp_path / "images" / "cells" / "plain.png")
    m = build_manifest(profile_factory(crop_databar=True)).manifest
    crops = dict(zip(m["path"].str.rsplit("/", n=1).str[-1], m["crop_bottom"]))
    assert crops == {"sem0.png": 26, "sem1.png": 34, "sem2.png": 42, "plain.png": 0}
    assert (m.loc[m["crop_bottom"] > 0, "height"] == coins.shape[0]).all()
