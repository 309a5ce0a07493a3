"""Can pixels alone tell a shifted / cropped / flipped copy of a micrograph from another image?

The detector behind ``dataset.group_by: auto`` (maemi_core/data/near_copies.py: ORB features,
candidates by hashed descriptors, RANSAC similarity, then the pixels of the overlap), measured on
1. the nanofibre training folder (--root, <class>/translated_<sample>_<n>.png: shifted copies
   of source micrograph <sample>): with the file-name groups as the truth, over the distinct
   images (byte-identical files are one image, as in the manifest), the precision and recall of
   pairs put in one group and the fraction of file-name groups recovered exactly (all their
   images in one detected group holding nothing else);
2. all 2,624 ELPV cells (distinct cells of near-identical layout; neighbouring multicrystalline
   cells share their grain pattern) plus copies of 40 of them (shifted with a black border,
   cropped, mirrored, rotated, brighter, rescaled, JPEG-recompressed): merges of distinct cells
   and copies found per kind.
Times are for a cold run (no feature cache), on one thread.

With --baselines, also the two detectors measured before (why there was no pixel grouping):
a. a dihedral DCT hash (64 bits; whole image and centre at 80% / 60%; smallest hash over the 8
   flips/rotations): pairs among distinct cells at each Hamming threshold, and copies found;
b. thumbnail candidates + normalised cross-correlation of the centre 60% (skimage
   match_template, 1/3 scale): the correlation of each cell's 5 most similar other cells, and
   of each copy with its original.

    OMP_NUM_THREADS=1 .venv/bin/python bench/near_copy_detection.py --root /data/nanofiber/train
"""

from __future__ import annotations

import argparse
import io
import re
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy.fft import dctn
from skimage.feature import match_template

from maemi_core.data.image_io import sha256_file
from maemi_core.data.near_copies import (
    NearCopySettings,
    cached_features,
    load_gray,
    near_copy_components,
    reduction_factor,
)
from maemi_core.data.sources import list_elpv

NAME = re.compile(r"^translated_(.+)_\d+\.png$")


def dihedral(a: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(4):
        r = np.rot90(a, k)
        out += [r, r[:, ::-1]]
    return out


def dct_hashes(gray: np.ndarray) -> list[int]:
    h, w = gray.shape
    out = []
    for frac in (1.0, 0.8, 0.6):
        ch, cw = int(round(h * frac)), int(round(w * frac))
        top, left = (h - ch) // 2, (w - cw) // 2
        thumb = np.asarray(Image.fromarray(gray[top:top + ch, left:left + cw]).resize((32, 32), Image.Resampling.LANCZOS),
                           dtype=np.float64)
        best = None
        for t in dihedral(thumb):
            c = dctn(t, norm="ortho")[:8, :8].ravel()[1:]
            v = int(sum(1 << i for i, b in enumerate(c > np.median(c)) if b))
            best = v if best is None else min(best, v)
        out.append(best)
    return out


def variants(im: Image.Image):
    w, h = im.size
    yield "shift8%+resize", im.crop((int(.08 * w), int(.05 * h), w, h)).resize((w, h))
    yield "crop85%", im.crop((int(.075 * w), int(.075 * h), int(.925 * w), int(.925 * h)))
    yield "crop70%", im.crop((int(.1 * w), int(.2 * h), int(.8 * w), int(.9 * h)))
    yield "flip", ImageOps.mirror(im)
    yield "rot90", im.rotate(90, expand=True)
    yield "brighter", im.point(lambda v: min(255, int(v * 1.3 + 15)))


def small(im: Image.Image, scale: int = 3) -> np.ndarray:
    w, h = im.size
    return np.asarray(im.resize((max(8, w // scale), max(8, h // scale)), Image.Resampling.BOX), dtype=np.float32)


def descriptor(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    t = np.asarray(Image.fromarray(a[int(h * .2):int(h * .8), int(w * .2):int(w * .8)]).resize((16, 16)),
                   dtype=np.float32)
    vs = [(d.ravel() - d.mean()) / (np.linalg.norm(d.ravel() - d.mean()) + 1e-6) for d in dihedral(t)]
    return np.stack(vs)


def ncc(a: np.ndarray, b: np.ndarray, k: int) -> float:
    b = dihedral(b)[k]
    s, big = (a, b) if a.size <= b.size else (b, a)
    h, w = s.shape
    t = s[int(h * .2):int(h * .8), int(w * .2):int(w * .8)]
    if t.shape[0] > big.shape[0] or t.shape[1] > big.shape[1]:
        return 0.0
    return float(match_template(big, t).max())


def baselines() -> None:
    paths = [c.path for c in list_elpv()]
    grays = [np.asarray(Image.open(p).convert("L")) for p in paths]
    t = time.perf_counter()
    H = np.array([dct_hashes(g) for g in grays], dtype=np.uint64)
    print(f"{len(paths)} cells hashed in {time.perf_counter() - t:.1f} s")
    best = np.full((len(H), len(H)), 64, dtype=np.int64)
    for a in range(3):
        for b in range(3):
            best = np.minimum(best, np.bitwise_count(H[:, a, None] ^ H[None, :, b]).astype(np.int64))
    np.fill_diagonal(best, 64)
    copies = {}
    for i in range(40):
        im = Image.open(paths[i]).convert("L")
        for name, v in variants(im):
            hv = np.array(dct_hashes(np.asarray(v)), dtype=np.uint64)
            copies.setdefault(name, []).append(min(int(np.bitwise_count(x ^ y)) for x in H[i] for y in hv))
    print("\na. dihedral DCT hash: distinct-cell pairs within the threshold / copies found (of 40)")
    for th in (4, 6, 8, 10, 12):
        found = ", ".join(f"{n} {sum(d <= th for d in v)}" for n, v in copies.items())
        print(f"  <= {th:2d} bits: {int((best <= th).sum() // 2):6d} distinct pairs | {found}")

    A = [small(Image.fromarray(g)) for g in grays]
    D = np.stack([descriptor(a) for a in A])
    S = np.max(np.einsum("nd,mkd->nmk", D[:, 0, :], D), axis=2)
    np.fill_diagonal(S, -1)
    cand = np.argsort(-S, axis=1)[:, :5]
    distinct = np.array([ncc(A[i], A[j], int(np.argmax(D[i, 0] @ D[j].T))) for i in range(len(A)) for j in cand[i]])
    q = np.quantile(distinct, [0.5, 0.9, 0.99, 1.0])
    print(f"\nb. correlation of the centre 60%: distinct cells (5 most similar each) median {q[0]:.3f}, "
          f"90% {q[1]:.3f}, 99% {q[2]:.3f}, max {q[3]:.3f}")
    for name in copies:
        vals = []
        for i in range(40):
            v = dict(variants(Image.open(paths[i]).convert("L")))[name]
            a = small(v)
            vals.append(ncc(A[i], a, int(np.argmax(D[i, 0] @ descriptor(a).T))))
        print(f"  copies {name:15s}: min {min(vals):.3f}, median {np.median(vals):.3f}")


# --- the detector ------------------------------------------------------------------------

def detect(paths: list[str], settings: NearCopySettings) -> tuple[np.ndarray, dict]:
    """Component labels of ``paths`` by maemi_core.data.near_copies, as the manifest build runs it
    (one reduction factor for the set, features without a cache), with its times."""
    t0 = time.perf_counter()
    factor = reduction_factor([max(Image.open(p).size) for p in paths], settings)
    feats = cached_features([(f"{i}", p, 0) for i, p in enumerate(paths)], None, settings, factor)
    t1 = time.perf_counter()
    verified = []
    labels = near_copy_components(feats, lambda i: load_gray(paths[i]), settings,
                                  on_pair=lambda i, j, matches, same: verified.append(same))
    t2 = time.perf_counter()
    return labels, {"factor": factor, "features_s": t1 - t0, "matching_s": t2 - t1,
                    "pairs_verified": len(verified), "pairs_accepted": int(sum(verified))}


def pair_scores(labels: np.ndarray, truth: list[str]) -> dict:
    """Precision and recall of the pairs in one detected group against the true groups, and the
    true groups recovered exactly."""
    def pairs(keys) -> set:
        by: dict = {}
        for i, k in enumerate(keys):
            by.setdefault(k, []).append(i)
        return {p for members in by.values() for p in combinations(members, 2)}

    found, true = pairs(labels), pairs(truth)
    members: dict = {}
    for i, t in enumerate(truth):
        members.setdefault(t, []).append(i)
    exact = sum(1 for idx in members.values()
                if len({labels[i] for i in idx}) == 1 and int((labels == labels[idx[0]]).sum()) == len(idx))
    whole = sum(1 for idx in members.values() if len({labels[i] for i in idx}) == 1)
    return {"pairs_found": len(found), "pairs_true": len(true),
            "precision": len(found & true) / len(found) if found else 1.0,
            "recall": len(found & true) / len(true) if true else 1.0,
            "groups": len(members), "groups_exact": exact, "groups_whole": whole,
            "detected_groups": len(set(labels))}


def nanofibre(root: Path, settings: NearCopySettings) -> None:
    files = sorted(p for p in root.glob("*/*.png"))
    first: dict[str, tuple[str, str]] = {}
    clashes = 0
    for f in files:
        m = NAME.match(f.name)
        if not m:
            continue
        h = sha256_file(f)
        if h in first:
            clashes += first[h][1] != m.group(1)
            continue
        first[h] = (str(f), m.group(1))
    paths, truth = [v[0] for v in first.values()], [v[1] for v in first.values()]
    print(f"1. nanofibre {root}: {len(files)} files, {len(paths)} distinct images, {len(set(truth))} file-name groups"
          f" (identical bytes under two names: {clashes})")
    labels, t = detect(paths, settings)
    r = pair_scores(labels, truth)
    print(f"  pairs: precision {r['precision']:.4f}, recall {r['recall']:.4f} ({r['pairs_found']} found, "
          f"{r['pairs_true']} true)")
    print(f"  file-name groups recovered exactly: {r['groups_exact']} of {r['groups']} "
          f"({r['groups_exact'] / r['groups']:.3f}); all images in one group: {r['groups_whole']}; "
          f"detected groups: {r['detected_groups']}")
    print(f"  time: features {t['features_s']:.0f} s (reduction x{t['factor']}), matching {t['matching_s']:.0f} s "
          f"({t['pairs_verified']} pairs verified, {t['pairs_accepted']} accepted)")


def copy_kinds(im: Image.Image):
    """The copies of an ELPV cell the detector is measured on."""
    w, h = im.size
    a = np.asarray(im)
    yield "shifted+black", Image.fromarray(np.pad(a[: h - 12, 9:], ((12, 0), (0, 9))))
    yield "crop85%", im.crop((int(.075 * w), int(.075 * h), int(.925 * w), int(.925 * h)))
    yield "crop70%", im.crop((int(.1 * w), int(.2 * h), int(.8 * w), int(.9 * h)))
    yield "mirror", ImageOps.mirror(im)
    yield "rot90", im.rotate(90, expand=True)
    yield "brighter", im.point(lambda v: min(255, int(v * 1.3 + 15)))
    yield "shift8%+resize", im.crop((int(.08 * w), int(.05 * h), w, h)).resize((w, h))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    yield "jpeg90", Image.open(io.BytesIO(buf.getvalue())).convert("L")


def elpv(settings: NearCopySettings, n_copied: int = 40) -> None:
    cells = [str(c.path) for c in list_elpv()]
    copied = list(range(0, len(cells), len(cells) // n_copied))[:n_copied]
    with tempfile.TemporaryDirectory() as tmp:
        paths, origin, kind = list(cells), list(range(len(cells))), [None] * len(cells)
        for i in copied:
            with Image.open(cells[i]) as im:
                for name, v in copy_kinds(im.convert("L")):
                    out = Path(tmp) / f"{i}_{name.replace('%', '')}.png"
                    v.save(out)
                    paths.append(str(out))
                    origin.append(i)
                    kind.append(name)
        print(f"\n2. ELPV: {len(cells)} distinct cells and {len(paths) - len(cells)} copies of {len(copied)} of them")
        labels, t = detect(paths, settings)
    cell_labels = labels[: len(cells)]
    sizes: dict = {}
    for lab in cell_labels:
        sizes[lab] = sizes.get(lab, 0) + 1
    merged = [s for s in sizes.values() if s > 1]
    print(f"  merges of distinct cells: {sum(s - 1 for s in merged)} ({sum(merged)} cells in {len(merged)} groups)")
    found: dict = {}
    for j in range(len(cells), len(paths)):
        found.setdefault(kind[j], []).append(labels[j] == labels[origin[j]])
    print("  copies found: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in found.items()))
    print(f"  time: features {t['features_s']:.0f} s, matching {t['matching_s']:.0f} s "
          f"({t['pairs_verified']} pairs verified, {t['pairs_accepted']} accepted)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, help="the nanofibre training folder (<class>/translated_<sample>_<n>.png)")
    ap.add_argument("--skip-elpv", action="store_true", help="measure only the nanofibre folder")
    ap.add_argument("--baselines", action="store_true", help="also the DCT hash and thumbnail correlation")
    args = ap.parse_args()
    settings = NearCopySettings()
    t0 = time.perf_counter()
    if args.root:
        nanofibre(args.root, settings)
    if not args.skip_elpv:
        elpv(settings)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.baselines:
        print("\nBaselines")
        baselines()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
