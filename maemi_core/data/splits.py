"""Deterministic train/val/test splits from the image hash.

An image's split depends only on its own bytes, so adding images never moves an old image
to another split, and identical content can never sit in two splits. Every class gets the
configured fractions in expectation (the hash is independent of the label), which is the
only kind of stratification that stays stable when new data arrives; the manifest's
asset check reports the realised per-class counts.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")


def split_unit(image_id: str) -> float:
    """A uniform number in [0, 1) from the image hash, salted so it is independent of any
    other use of the hash (e.g. ordering images for ``max_per_class`` slices)."""
    digest = hashlib.sha256(f"maemi-split:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(image_id: str, train: float, val: float, test: float, has_official_test: bool = False) -> str:
    """``train``/``val``/``test`` for one image.

    With an official test set (``dataset.test_root``) the test split comes only from there,
    so the other images are divided between train and val in proportion ``train:val``.
    """
    u = split_unit(image_id)
    if has_official_test:
        total = train + val
        return "train" if total <= 0 or u < train / total else "val"
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"
