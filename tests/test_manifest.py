"""The raw_images manifest on real ELPV pixels laid out as a messy ImageFolder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from maemi_core.config import ConfigError
from maemi_core.data.manifest import build_manifest, leaked_images, load_manifest, manifest_dir, save_manifest, split_counts
from maemi_core.data.image_io import sha256_file


def test_manifest_validates_every_kind_of_file(messy_imagefolder, profile_factory):
    cfg = profile_factory()
    result = build_manifest(cfg)
    m = result.manifest.set_index(result.manifest["path"].map(lambda p: Path(p).name))

    assert sorted(m.index) == ["a.png", "b_rgba.png", "c16.tif", "d.jpg", "e.bmp", "f.png"]
    assert m.loc["c16.tif", "bit_depth"] == 16 and m.loc["c16.tif", "mode"].startswith("I;16")
    assert m.loc["c16.tif", "pixel_size_nm"] == pytest.approx(2.5)
    assert pd.isna(m.loc["a.png", "pixel_size_nm"])
    assert m.loc["b_rgba.png", "mode"] == "RGBA"
    assert m.loc["d.jpg", "mode"] == "RGB" and m.loc["a.png", "mode"] == "L"
    assert m.loc["f.png", "label"] == "clean"  # nested folders keep the class of their top folder
    assert (m["width"] == 300).all() and (m["height"] == 300).all()
    assert m.loc["a.png", "image_id"] == sha256_file(messy_imagefolder / "cracked" / "a.png")

    reasons = dict(zip(result.rejected["path"].map(lambda p: Path(p).name), result.rejected["reason"]))
    assert reasons == {
        "empty.png": "empty_file",
        "trunc.jpg": "truncated",
        "notes.txt": "unsupported_type",
        "fake.png": "undecodable",
        "stray.png": "no_class_folder",
    }
    assert result.n_candidates == 11  # .DS_Store is ignored, not rejected
    assert result.rejected_fraction == pytest.approx(5 / 11)


def test_saved_manifest_round_trips_and_quarantines(messy_imagefolder, profile_factory):
    cfg = profile_factory()
    result = build_manifest(cfg)
    paths = save_manifest(result, manifest_dir(cfg))
    loaded = load_manifest(cfg)
    pd.testing.assert_frame_equal(loaded, result.manifest, check_dtype=False)
    quarantined = sorted(p.parent.name for p in (manifest_dir(cfg) / "quarantine").rglob("*") if p.is_file())
    # The zero-byte file is copied too: the quarantine mirrors the rejected table.
    assert quarantined == sorted(["empty_file", "truncated", "unsupported_type", "undecodable", "no_class_folder"])
    assert paths["rejected"].is_file()
    # Sources are never touched.
    assert (messy_imagefolder / "clean" / "trunc.jpg").exists()


def test_splits_are_stable_when_images_are_added(tmp_path, elpv_paths, profile_factory, copy_file):
    root = tmp_path / "images"
    for i, p in enumerate(elpv_paths[:20]):
        copy_file(p, root / ("a" if i % 2 else "b") / p.name)
    cfg = profile_factory()
    before = build_manifest(cfg).manifest.set_index("image_id")["split"]
    assert set(before) == {"train", "val", "test"}

    for i, p in enumerate(elpv_paths[20:40]):
        copy_file(p, root / ("a" if i % 2 else "b") / p.name)
    after = build_manifest(cfg).manifest.set_index("image_id")["split"]
    assert len(after) == 40
    pd.testing.assert_series_equal(after.loc[before.index], before)


def test_duplicates_collapse_and_conflicting_labels_are_rejected(tmp_path, elpv_paths, profile_factory, copy_file):
    root = tmp_path / "images"
    copy_file(elpv_paths[0], root / "a" / "one.png")
    copy_file(elpv_paths[0], root / "a" / "one_copy.png")      # same class: a duplicate
    copy_file(elpv_paths[1], root / "a" / "two.png")
    copy_file(elpv_paths[1], root / "b" / "two_elsewhere.png")  # other class: a conflict
    copy_file(elpv_paths[2], root / "b" / "three.png")
    result = build_manifest(profile_factory())

    assert sorted(Path(p).name for p in result.manifest["path"]) == ["one.png", "three.png"]
    assert result.manifest["image_id"].is_unique
    assert len(result.duplicates) == 1
    assert Path(result.duplicates.iloc[0]["path"]).name == "one_copy.png"
    assert Path(result.duplicates.iloc[0]["duplicate_of"]).name == "one.png"
    conflicts = result.rejected[result.rejected["reason"] == "conflicting_labels"]
    assert sorted(Path(p).name for p in conflicts["path"]) == ["two.png", "two_elsewhere.png"]


def test_official_test_root_supplies_the_test_split(tmp_path, elpv_paths, profile_factory, copy_file):
    for i, p in enumerate(elpv_paths[:16]):
        copy_file(p, tmp_path / "images" / ("a" if i % 2 else "b") / p.name)
    for i, p in enumerate(elpv_paths[16:22]):
        copy_file(p, tmp_path / "official_test" / ("a" if i % 2 else "b") / p.name)
    # A copy of a test image slipped into the training folder: it must stay test only.
    copy_file(elpv_paths[16], tmp_path / "images" / "b" / "leaked_copy.png")
    result = build_manifest(profile_factory(test_root="official_test"))
    m = result.manifest
    test_ids = {sha256_file(p) for p in elpv_paths[16:22]}
    assert set(m.loc[m["split"] == "test", "image_id"]) == test_ids
    assert set(m.loc[m["source"] == "imagefolder", "split"]) <= {"train", "val"}
    assert leaked_images(m).empty
    assert len(result.duplicates) == 1


def test_max_per_class_slice_is_stable_and_covers_every_split(tmp_path, elpv_paths, profile_factory, copy_file):
    for i, p in enumerate(elpv_paths[:40]):
        copy_file(p, tmp_path / "images" / ("a" if i % 2 else "b") / p.name)
    cfg = profile_factory(max_per_class=5)
    first = build_manifest(cfg).manifest
    counts = split_counts(first)
    assert (counts.loc[["a", "b"], ["train", "val", "test"]] >= 1).all().all()
    assert (counts.loc[["a", "b"], "total"] <= 5).all()
    assert list(build_manifest(cfg).manifest["image_id"]) == list(first["image_id"])


def test_leakage_detector_finds_content_in_two_splits():
    m = pd.DataFrame({"image_id": ["x", "x", "y"], "split": ["train", "test", "val"]})
    assert list(leaked_images(m)["split"]) == ["train", "test"]


def test_empty_or_missing_dataset_says_what_to_do(tmp_path, profile_factory):
    with pytest.raises(ConfigError, match="does not exist"):
        build_manifest(profile_factory(root="nowhere"))
    (tmp_path / "images" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="has no files"):
        build_manifest(profile_factory())
    (tmp_path / "images" / "a" / "bad.png").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="could be used"):
        build_manifest(profile_factory())


def test_elpv_source_reads_the_package(elpv_paths):
    from maemi_core.data.sources import list_elpv

    cands = list_elpv()
    assert len(cands) == 2624
    labels = pd.Series([c.label for c in cands]).value_counts().to_dict()
    assert labels == {"functional": 1508, "defective": 715, "possibly_defective": 295, "likely_defective": 106}
    assert {c.extra["cell_type"] for c in cands} == {"mono", "poly"}


def test_one_class_is_refused_and_empty_class_folders_are_named(tmp_path, elpv_paths, profile_factory, copy_file):
    root = tmp_path / "images"
    for p in elpv_paths[:6]:
        copy_file(p, root / "cracked" / p.name)
    (root / "clean").mkdir()                                   # a class the user meant to have
    with pytest.raises(ConfigError, match=r"1 usable class \(cracked\).*empty class folders: clean.*at least two"):
        build_manifest(profile_factory())
    for p in elpv_paths[6:12]:
        copy_file(p, root / "porous" / p.name)
    result = build_manifest(profile_factory())
    assert set(result.manifest["label"]) == {"cracked", "porous"} and result.empty_classes == ["clean"]


def _frames(src, dst_dir, sample: str, n: int, start: int = 0):
    """``n`` different frames of one sample: shifted crops of one real cell (different bytes)."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("L")
        w, h = im.size
        for k in range(start, start + n):
            dst = dst_dir / f"{sample}_frame{k}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            im.crop((4 * k, 3 * k, w - 12 + 4 * k, h - 9 + 3 * k)).save(dst)


def test_frames_of_one_sample_share_a_group_and_a_split(tmp_path, elpv_paths, profile_factory):
    root = tmp_path / "images"
    for i, src in enumerate(elpv_paths[:24]):
        _frames(src, root / ("a" if i % 2 else "b"), f"s{i:02d}", 4)
    grouped = build_manifest(profile_factory(group_by=r"/(s\d+)_frame")).manifest
    assert grouped.groupby("sample")["split"].nunique().max() == 1          # a sample never spans splits
    assert grouped.groupby("sample")["group_id"].nunique().max() == 1 and grouped["group_id"].nunique() == 24
    assert set(grouped["split"]) == {"train", "val", "test"}
    # The group's split is the hash of its id (the hash of the sample name): stable as frames are added.
    _frames(elpv_paths[0], root / "b", "s00", 6)                              # two more frames of s00
    again = build_manifest(profile_factory(group_by=r"/(s\d+)_frame")).manifest
    before = grouped.set_index("image_id")["split"]
    assert (again.set_index("image_id").loc[before.index, "split"] == before).all()
    # Without group_by, the frames of a sample scatter over the splits (the leak this prevents).
    plain = build_manifest(profile_factory()).manifest
    assert (plain["group_id"] == plain["image_id"]).all()
    assert plain.assign(sample=plain["path"].str.extract(r"/(s\d+)_frame")[0]).groupby("sample")["split"].nunique().max() > 1


def test_a_new_frame_whose_image_id_sorts_first_moves_no_image(tmp_path, elpv_paths, profile_factory):
    """A later frame of a sample may hash below every earlier one: the group keeps its id and no
    image changes split, so a model warm-started on the earlier train images never finds them
    in val or test."""
    from PIL import Image

    root = tmp_path / "images"
    for i, src in enumerate(elpv_paths[:12]):
        _frames(src, root / ("a" if i % 2 else "b"), f"s{i:02d}", 3)
    kw = {"group_by": r"/(s\d+)_frame"}
    before = build_manifest(profile_factory(**kw)).manifest.set_index("image_id")
    s00 = before[before["sample"] == "s00"]
    assert len(s00) == 3 and s00["group_id"].nunique() == 1
    # Another frame of s00 (one pixel differs) whose image id sorts before all of s00's.
    with Image.open(sorted((root / "b").glob("s00_frame*.png"))[0]) as im:
        frame = im.copy()
    for k in range(1, 256):
        frame.putpixel((0, 0), k)
        new = root / "b" / "s00_frame9.png"
        frame.save(new)
        if sha256_file(new) < s00.index.min():
            break
    else:
        pytest.fail("no frame with a smaller image id")
    after = build_manifest(profile_factory(**kw)).manifest.set_index("image_id")
    assert len(after) == len(before) + 1 and after.loc[sha256_file(new), "sample"] == "s00"
    pd.testing.assert_frame_equal(after.loc[before.index, ["group_id", "split"]], before[["group_id", "split"]])
    assert after.loc[sha256_file(new), "split"] == s00["split"].iloc[0]


def test_samples_of_the_official_test_set_in_root_are_reported_or_removed(tmp_path, elpv_paths, profile_factory):
    for i, src in enumerate(elpv_paths[:12]):
        _frames(src, tmp_path / "images" / ("a" if i % 2 else "b"), f"s{i:02d}", 2)
    for i, src in enumerate(elpv_paths[12:16]):
        _frames(src, tmp_path / "official" / ("a" if i % 2 else "b"), f"t{i:02d}", 2)
    _frames(elpv_paths[12], tmp_path / "images" / "b", "t00", 2, start=2)   # t00 is a test sample; two more frames in root
    kw = {"test_root": "official", "group_by": r"/([st]\d+)_frame"}
    kept = build_manifest(profile_factory(**kw)).manifest
    siblings = kept[kept["test_sample_in_training"]]
    assert len(siblings) >= 1 and set(siblings["sample"]) == {"t00"} and set(siblings["split"]) <= {"train", "val"}
    dropped = build_manifest(profile_factory(**kw, drop_test_samples_from_training=True))
    assert not dropped.manifest["test_sample_in_training"].any()
    assert set(dropped.rejected.loc[dropped.rejected["reason"] == "same_sample_as_test", "path"]) == set(siblings["path"])


def test_a_sample_dominating_a_class_is_found_and_a_bad_pattern_is_refused(tmp_path, elpv_paths, profile_factory):
    from maemi_core.config import ConfigError
    from maemi_core.data.sample_groups import dominant_groups

    _frames(elpv_paths[0], tmp_path / "images" / "a", "big", 8)
    for i, src in enumerate(elpv_paths[1:9]):
        _frames(src, tmp_path / "images" / ("a" if i < 2 else "b"), f"s{i}", 1)
    m = build_manifest(profile_factory(group_by=r"/([a-z]+\d*)_frame")).manifest
    dom = dominant_groups(m, 0.5)
    assert list(dom["label"]) == ["a"] and dom["images"].iloc[0] == 8
    with pytest.raises(ConfigError, match="group_by is not a valid regular expression"):
        profile_factory(group_by="([unclosed")
