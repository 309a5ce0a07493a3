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


def test_one_decode_path_a_tiff_with_a_data_bar_gives_the_same_visual_tokens_everywhere(tmp_path, profile_factory,
                                                                                       elpv_paths):
    """Training and the benchmark (the manifest's recorded crop), `maemi ask` / `classify` (image
    files) and the served model (base64) decode a 16-bit TIFF with an instrument data bar into the
    same input, and so the same visual tokens."""
    import base64

    import torch

    from maemi_core.evaluation.answering import Answerer
    from maemi_core.registry import serving
    from maemi_core.registry.maemi_pyfunc import decode_image
    from maemi_core.training.maemi_training import ImageStore
    from tests.test_maemi_model import tiny_model

    coins = skimage.data.coins().astype(np.float32) / 255.0
    folder = tmp_path / "images" / "particles"
    folder.mkdir(parents=True)
    tif = folder / "sem.tif"
    Image.fromarray((with_databar(coins, 30) * 4000 + 300).astype(np.uint16)).save(tif)   # 12-bit values in 16 bits
    (tmp_path / "images" / "cells").mkdir()
    Image.open(elpv_paths[0]).save(tmp_path / "images" / "cells" / "plain.png")
    manifest = build_manifest(profile_factory(crop_databar=True)).manifest
    assert manifest.loc[manifest["path"].str.endswith("sem.tif"), "crop_bottom"].item() == 32
    iid = manifest.loc[manifest["path"].str.endswith("sem.tif"), "image_id"].item()

    model = tiny_model()
    model.package_meta = {"crop_databar": True}
    training = ImageStore.from_manifest(manifest, 224).get(iid)
    benchmark = Answerer(model, manifest, 4).images.get(iid)
    cli = serving.read_images(model, [str(tif)])[0]
    served = decode_image(base64.b64encode(tif.read_bytes()).decode(), 224, crop_databar=True)
    for other in (benchmark, cli, served):
        np.testing.assert_array_equal(other, training)
    tokens = [model.encode_images(torch.from_numpy(a)[None, None]) for a in (training, benchmark, cli, served)]
    assert all(torch.equal(t, tokens[0]) for t in tokens)
    # Without the crop the bar would be part of the image: a different input.
    assert not np.array_equal(decode_image(base64.b64encode(tif.read_bytes()).decode(), 224), training)
