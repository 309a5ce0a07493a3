"""Sample groups: every frame, tile or re-acquisition of one physical sample shares a
``group_id`` and therefore a split, so validation and test never see a sample that training saw.

A fab names its files after the sample (``waferA12_frame03.tif``, ``lot7/s0042/tile_5.png``):
``dataset.group_by`` is a regular expression matched against the path below the dataset root
(``<class>/<file>`` for an image folder, the file name otherwise); its first group (or the whole
match) names the sample. Files it does not match stay groups of their own.

Group ids, and with them the splits (``assign_split`` hashes the group id), must not move when
data is added: a model warm-started from the champion has trained on the train images of every
earlier manifest, and any of them that moved to val or test would be scored as unseen.

- A named group's id is a hash of the sample name (:func:`sample_group_id`), never of its
  members: new frames of a sample join its group and leave the id, and the split of every
  earlier frame, as they were, whatever their image ids.
- A file without a name (no ``group_by``, or no match) is a group of its own whose id is its
  image id: the only member it will ever have, so no later file can change it.

Near copies by their pixels (``dataset.group_by: auto``, :mod:`maemi_core.data.near_copies`):
shifted, cropped, rotated and mirrored copies with no shared name form a group found by local
features (ORB, verified by a RANSAC similarity transform and by the pixels of the overlap). A
detected group must not simply take its smallest member id (a new copy whose hash sorts first
would rename the group and re-draw the split of all its members): a detected group keeps the id
an earlier manifest gave any of its members (when it merges several earlier groups, the id of
the one with the most images, ties to the smallest id, so that most earlier images stay put),
and only a group none of whose members was seen before takes the smallest member id
(:func:`detected_group_ids`; the earlier manifest is the latest published one,
:func:`earlier_group_ids`). An image without copies is then a group of its own whose id is its
image id, as without grouping.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

import pandas as pd

# dataset.group_by value that groups near copies by their pixels instead of by name.
AUTO_GROUPS = "auto"


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


def sample_group_id(sample: str) -> str:
    """The group id of a named sample: a hash of its name (salted, so it can never equal an
    image id, the sha256 of some file's bytes), independent of which frames it has."""
    return hashlib.sha256(f"maemi-sample:{sample}".encode()).hexdigest()


def group_ids(image_ids: list[str], samples: list[Optional[str]]) -> list[str]:
    """One id per image: the hash of its sample's name, or its own image id when it has none."""
    return [sample_group_id(s) if s is not None else iid for iid, s in zip(image_ids, samples)]


def detected_group_ids(image_ids: list[str], components: list, earlier: Optional[dict[str, str]] = None) -> list[str]:
    """One id per image for groups found by their pixels (``components``: one label per image,
    equal labels = one group), stable across builds by the rule above: a group keeps the id
    ``earlier`` (image id -> group id of an earlier manifest) gave its members - of several, the
    one most of its members had, ties to the smallest id - and a group none of whose members
    was seen before takes its smallest member id (a group of one: its own image id)."""
    earlier = earlier or {}
    members: dict = {}
    for iid, comp in zip(image_ids, components):
        members.setdefault(comp, []).append(iid)
    gid_of: dict = {}
    for comp, ids in members.items():
        seen: dict[str, int] = {}
        for iid in ids:
            if iid in earlier:
                seen[earlier[iid]] = seen.get(earlier[iid], 0) + 1
        gid_of[comp] = min(seen, key=lambda g: (-seen[g], g)) if seen else min(ids)
    return [gid_of[comp] for comp in components]


def earlier_group_ids(cfg) -> dict[str, str]:
    """image id -> group id in the latest published manifest (``<workdir>/raw_images``), empty
    when there is none: the ids a new build keeps."""
    path = cfg.workdir_path / "raw_images" / "manifest.parquet"
    if not path.is_file():
        return {}
    try:
        old = pd.read_parquet(path, columns=["image_id", "group_id"])
    except (OSError, ValueError, KeyError):     # unreadable, or from before sample groups
        return {}
    return dict(zip(old["image_id"], old["group_id"]))


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
