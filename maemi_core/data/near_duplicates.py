"""Near-duplicate groups: shifted, cropped, flipped, rotated or re-exposed copies of one
micrograph (and, by a filename pattern, every frame of one sample) share a ``group_id``, so they
always share a split.

Exact-byte dedup cannot see a shifted copy. Each image gets perceptual hashes (DCT hash: the
signs of the 8x8 lowest frequencies of a 32x32 grey thumbnail against their median, 64 bits)
that are

* invariant to brightness and contrast (a monotone grey-level change keeps the DCT signs),
* invariant to the 8 flips/rotations (the smallest hash over the dihedral transforms),
* tolerant to shifts and crops: hashes of the whole image and of its centre at two scales
  (80% and 60%), and two images are near copies when any pair of their hashes differs in at most
  ``dataset.near_duplicates.max_hamming`` bits (a crop's whole view matches the original's
  centre).

Groups are the connected components (union-find) of the near-copy pairs plus, with
``dataset.group_by`` (a regular expression whose first group names the sample, matched against
the path below the dataset root), of equal sample names. The group's id is the smallest image
id in it, so an image without near copies keeps the id, and the split, it always had.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from scipy.fft import dctn

HASH_SIZE, THUMB = 8, 32
CENTRES = (1.0, 0.8, 0.6)


def _dct_hash(thumb: np.ndarray) -> int:
    coeffs = dctn(thumb, norm="ortho")[:HASH_SIZE, :HASH_SIZE].ravel()[1:]   # drop the DC term
    bits = coeffs > np.median(coeffs)
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(4):
        r = np.rot90(a, k)
        out += [r, r[:, ::-1]]
    return out


def image_hashes(gray: np.ndarray) -> list[int]:
    """Orientation-free DCT hashes of the whole image and of its centre at each of ``CENTRES``."""
    gray = np.asarray(gray, dtype=np.float64)
    h, w = gray.shape
    lo, hi = float(gray.min()), float(gray.max())
    u8 = np.zeros_like(gray, dtype=np.uint8) if hi <= lo else ((gray - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    hashes = []
    for frac in CENTRES:
        ch, cw = max(1, int(round(h * frac))), max(1, int(round(w * frac)))
        top, left = (h - ch) // 2, (w - cw) // 2
        crop = Image.fromarray(u8[top:top + ch, left:left + cw]).resize((THUMB, THUMB), Image.Resampling.LANCZOS)
        thumb = np.asarray(crop, dtype=np.float64)
        hashes.append(min(_dct_hash(t) for t in _dihedral(thumb)))
    return hashes


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def near_pairs(hashes: np.ndarray, max_hamming: int, chunk: int = 512) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hash sets come within ``max_hamming`` bits (``hashes``: n x k uint64)."""
    n, k = hashes.shape
    pairs = set()
    for start in range(0, n, chunk):
        block = hashes[start:start + chunk]                       # b x k
        best = None
        for a in range(k):
            for b in range(k):
                d = _popcount(block[:, a, None] ^ hashes[None, :, b])   # b x n
                best = d if best is None else np.minimum(best, d)
        ii, jj = np.nonzero(best <= max_hamming)
        for i, j in zip(ii + start, jj):
            if i < j:
                pairs.add((int(i), int(j)))
    return sorted(pairs)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def sample_names(paths: list[str], root: Optional[Path], pattern: Optional[str]) -> list[Optional[str]]:
    """The sample each file belongs to by ``dataset.group_by`` (first regex group; None: no match)."""
    if not pattern:
        return [None] * len(paths)
    rx = re.compile(pattern)
    out = []
    for p in paths:
        rel = str(Path(p).relative_to(root)) if root is not None and Path(p).is_relative_to(root) else Path(p).name
        m = rx.search(rel)
        out.append((m.group(1) if m.groups() else m.group(0)) if m else None)
    return out


def group_ids(image_ids: list[str], hashes: Optional[np.ndarray], max_hamming: int,
              samples: Optional[list[Optional[str]]] = None) -> tuple[list[str], list[tuple[int, int]]]:
    """(group id per image, the near-copy pairs found). ``hashes`` None: no near-copy detection."""
    n = len(image_ids)
    uf = _UnionFind(n)
    pairs = near_pairs(hashes, max_hamming) if hashes is not None and n > 1 else []
    for i, j in pairs:
        uf.union(i, j)
    if samples is not None:
        first: dict[str, int] = {}
        for i, s in enumerate(samples):
            if s is not None:
                uf.union(i, first.setdefault(s, i))
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(uf.find(i), []).append(i)
    gid = [""] * n
    for idx in members.values():
        g = min(image_ids[i] for i in idx)
        for i in idx:
            gid[i] = g
    return gid, pairs
