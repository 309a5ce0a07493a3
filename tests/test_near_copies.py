"""Near copies by their pixels (dataset.group_by: auto): shifted, cropped and mirrored copies of
one image form one group, distinct images never do, and group ids stay put as copies arrive."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from maemi_core.data.near_copies import (
    NearCopySettings,
    cached_features,
    image_features,
    match_packed,
    near_copy_components,
    reduction_factor,
)
from maemi_core.data.sample_groups import detected_group_ids

S = NearCopySettings()


def _gray(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _copies(g: np.ndarray) -> dict[str, np.ndarray]:
    """The kinds of copy a data set holds without a shared name (the nanofibre set's translated_*
    files are shifted copies padded with black)."""
    h, w = g.shape
    dy, dx = int(0.06 * h), int(0.04 * w)
    return {
        "shifted": np.pad(g[: h - dy, dx:], ((dy, 0), (0, dx))),                  # black border top/right
        "cropped": g[int(0.1 * h):int(0.85 * h), int(0.15 * w):int(0.9 * w)],
        "mirrored": g[:, ::-1],
        "flipped+shifted": np.pad(g[::-1][5:, : w - 7], ((0, 5), (7, 0))),
        "rotated": np.rot90(g).copy(),
    }


def _components(images: list[np.ndarray]) -> np.ndarray:
    factor = reduction_factor([max(g.shape) for g in images], S)
    feats = [image_features(g, S, factor) for g in images]
    return near_copy_components(feats, lambda i: images[i], S)


def test_shifted_cropped_and_mirrored_copies_are_grouped(elpv_paths):
    originals = [data.camera() / 255.0, data.brick() / 255.0, data.gravel() / 255.0,
                 _gray(elpv_paths[0]), _gray(elpv_paths[7])]
    images, source = [], []
    for k, g in enumerate(originals):
        for img in [g, *_copies(g).values()]:
            images.append(np.asarray(img, dtype=np.float32))
            source.append(k)
    labels = _components(images)
    for k in range(len(originals)):
        assert len({labels[i] for i, s in enumerate(source) if s == k}) == 1, f"copies of image {k} split"
    assert len(set(labels)) == len(originals), "distinct images merged"


def test_distinct_elpv_cells_are_never_merged(elpv_paths):
    """40 distinct cells of one layout (the same busbars and frame in every cell): no two merge."""
    images = [_gray(p) for p in elpv_paths[:40]]
    labels = _components(images)
    assert len(set(labels)) == len(images)


def test_match_packed_is_match_descriptors():
    from skimage.feature import match_descriptors

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (120, 32), dtype=np.uint8)
    b = np.concatenate([a[:60] ^ (rng.random((60, 32)) < 0.03).astype(np.uint8),
                        rng.integers(0, 256, (50, 32), dtype=np.uint8)])
    for ratio in (1.0, 0.8):
        ours = match_packed(a, b, ratio)
        theirs = match_descriptors(np.unpackbits(a, axis=1).astype(bool), np.unpackbits(b, axis=1).astype(bool),
                                   metric="hamming", cross_check=True, max_ratio=ratio)
        assert sorted(map(tuple, ours)) == sorted(map(tuple, theirs))


def test_group_ids_keep_the_earlier_id():
    # A group none of whose members was seen: its smallest member id; a single image: its own id.
    assert detected_group_ids(["c", "a", "b", "z"], [0, 0, 0, 3]) == ["a", "a", "a", "z"]
    # A new copy whose id sorts first joins and keeps the group's id.
    assert detected_group_ids(["0new", "a", "b"], [0, 0, 0], {"a": "a", "b": "a"}) == ["a"] * 3
    # Merging earlier groups: the id most members had; ties to the smallest id.
    earlier = {"a": "g1", "b": "g2", "c": "g2", "d": "d"}
    assert detected_group_ids(["a", "b", "c", "d"], [0, 0, 0, 0], earlier) == ["g2"] * 4
    assert detected_group_ids(["a", "b"], [0, 0], {"a": "g9", "b": "g1"}) == ["g1", "g1"]


def test_features_are_cached_by_image_id(tmp_path, elpv_paths, monkeypatch):
    import maemi_core.data.near_copies as nc

    items = [(f"id{i}", str(p), 0) for i, p in enumerate(elpv_paths[:3])]
    first = cached_features(items, tmp_path / "cache", S, 1)
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 3
    monkeypatch.setattr(nc, "image_features", lambda *a, **k: pytest.fail("features computed again"))
    again = cached_features(items, tmp_path / "cache", S, 1)
    for x, y in zip(first, again):
        assert np.array_equal(x.descriptors, y.descriptors) and np.array_equal(x.frame, y.frame)


def _shifted(src: np.ndarray, dy: int, dx: int) -> np.ndarray:
    return np.pad(src[: src.shape[0] - dy, dx:], ((dy, 0), (0, dx)))


def test_manifest_groups_copies_and_keeps_ids_when_a_copy_is_added(tmp_path, elpv_paths, profile_factory):
    """group_by: auto in the manifest build: the copies of a cell share a group; a later copy whose
    image id sorts before all of them joins it and no earlier image changes group or split."""
    from maemi_core.data.image_io import sha256_file
    from maemi_core.data.manifest import build_manifest, manifest_dir, save_manifest

    root = tmp_path / "images"
    cells = [np.asarray(Image.open(p).convert("L")) for p in elpv_paths[:6]]
    for i, cell in enumerate(cells):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cell).save(cls / f"cell{i}.png")
        if i < 2:                                      # two cells with two shifted copies each
            for k, (dy, dx) in enumerate(((6, 4), (3, 9))):
                Image.fromarray(_shifted(cell, dy, dx)).save(cls / f"copy{i}_{k}.png")
    cfg = profile_factory(group_by="auto")
    result = build_manifest(cfg)
    before = result.manifest.set_index("image_id")
    before["name"] = before["path"].map(lambda p: p.rsplit("/", 1)[-1])
    groups = before.groupby("group_id")["name"].apply(sorted).tolist()
    assert sorted(groups) == sorted([["cell0.png", "copy0_0.png", "copy0_1.png"],
                                     ["cell1.png", "copy1_0.png", "copy1_1.png"],
                                     ["cell2.png"], ["cell3.png"], ["cell4.png"], ["cell5.png"]])
    assert before.groupby("group_id")["split"].nunique().max() == 1
    save_manifest(result, manifest_dir(cfg))               # the published manifest a rebuild keeps ids from

    # A new copy of cell0 whose image id sorts before every member of its group.
    group0 = before.loc[before["name"] == "cell0.png", "group_id"].iloc[0]
    lowest = min(before.index[before["group_id"] == group0])
    for dy in range(1, 60):
        path = root / "b" / "late_copy.png"
        Image.fromarray(_shifted(cells[0], dy, 11)).save(path)
        if sha256_file(path) < lowest:
            break
    else:
        pytest.skip("no shift gave an image id that sorts first")
    after = build_manifest(cfg).manifest.set_index("image_id")
    assert after.loc[sha256_file(path), "group_id"] == group0
    assert (after.loc[before.index, "group_id"] == before["group_id"]).all()
    assert (after.loc[before.index, "split"] == before["split"]).all()
