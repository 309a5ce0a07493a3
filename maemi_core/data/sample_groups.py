"""Sample groups: every frame, tile or re-acquisition of one physical sample shares a
``group_id`` and therefore a split, so validation and test never see a sample that training saw.

A fab names its files after the sample (``waferA12_frame03.tif``, ``lot7/s0042/tile_5.png``):
``dataset.group_by`` is a regular expression matched against the path below the dataset root
(``<class>/<file>`` for an image folder, the file name otherwise); its first group (or the whole
match) names the sample. Files it does not match stay groups of their own. The group's id is the
smallest image id in it, so an image without siblings keeps the id, and the split, it always had.

Not done here: finding near copies by their pixels (shifted, cropped, flipped copies with no
shared name). Perceptual hashes and thumbnail correlation were measured on ELPV
(bench/near_copy_detection.py) and cannot tell distinct cells from copies there, so grouping
is by name only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import pandas as pd


def relative_path(path: str, source: str, cfg) -> str:
    """What ``dataset.group_by`` is matched against: the path below the folder the file came from
    (``<class>/<file>`` for the dataset root, the test root and a fab batch), else the file name."""
    ds = cfg.dataset
    if source.startswith("incoming:"):
        base = cfg.incoming_path / source.split(":", 1)[1]
    elif source == "imagefolder_test" and ds.test_root:
        base = cfg.resolve(ds.test_root)
    elif source == "imagefolder" and ds.root:
        base = cfg.resolve(ds.root)
    else:
        return Path(path).name
    p = Path(path)
    base = base.resolve()
    return str(p.relative_to(base)) if p.is_relative_to(base) else p.name


def sample_names(rel_paths: list[str], pattern: Optional[str]) -> list[Optional[str]]:
    """The sample each file belongs to by ``pattern`` (None: no pattern, or no match)."""
    if not pattern:
        return [None] * len(rel_paths)
    rx = re.compile(pattern)
    out: list[Optional[str]] = []
    for rel in rel_paths:
        m = rx.search(rel)
        out.append((m.group(1) if m.groups() else m.group(0)) if m else None)
    return out


def group_ids(image_ids: list[str], samples: list[Optional[str]]) -> list[str]:
    """One id per image: the smallest image id among the images of the same sample."""
    smallest: dict[str, str] = {}
    for iid, s in zip(image_ids, samples):
        if s is not None:
            smallest[s] = min(smallest.get(s, iid), iid)
    return [smallest[s] if s is not None else iid for iid, s in zip(image_ids, samples)]


def group_table(manifest: pd.DataFrame, top: int = 20) -> pd.DataFrame:
    """The largest groups: id, sample name, images, classes and splits."""
    g = manifest.groupby("group_id").agg(sample=("sample", "first"), images=("image_id", "size"),
                                         classes=("label", lambda s: ",".join(sorted(set(s)))),
                                         splits=("split", lambda s: ",".join(sorted(set(s)))))
    return g.sort_values("images", ascending=False).head(top).reset_index()


def dominant_groups(manifest: pd.DataFrame, max_fraction: float) -> pd.DataFrame:
    """(class, group) pairs where one group holds more than ``max_fraction`` of a class's images
    (in a class of at least 4 images): validation on such a class measures one sample."""
    counts = manifest.groupby(["label", "group_id"]).size().rename("images").reset_index()
    totals = manifest.groupby("label").size().rename("class_images")
    counts = counts.join(totals, on="label")
    counts["fraction"] = counts["images"] / counts["class_images"]
    return counts[(counts["fraction"] > max_fraction) & (counts["class_images"] >= 4)].reset_index(drop=True)
