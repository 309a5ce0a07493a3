"""Can pixels alone tell a shifted / cropped / flipped copy of an ELPV cell from another cell?

Two detectors, measured on all 2,624 ELPV cells (distinct cells of near-identical layout) and on
copies of 40 of them:
1. a dihedral DCT hash (64 bits; whole image and centre at 80% / 60%; smallest hash over the 8
   flips/rotations): pairs among distinct cells at each Hamming threshold, and copies found;
2. thumbnail candidates + normalised cross-correlation of the centre 60% (skimage
   match_template, 1/3 scale): the correlation of each cell's 5 most similar other cells, and
   of each copy with its original.
A detector is usable when copies score better than distinct cells. This decides whether
`raw_images` groups by pixels; it groups by name (dataset.group_by) because neither is.

    .venv/bin/python bench/near_copy_detection.py
"""

from __future__ import annotations

import time

import numpy as np
from PIL import Image, ImageOps
from scipy.fft import dctn
from skimage.feature import match_template

from maemi_core.data.sources import list_elpv


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


def main() -> int:
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
    print("\n1. dihedral DCT hash: distinct-cell pairs within the threshold / copies found (of 40)")
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
    print(f"\n2. correlation of the centre 60%: distinct cells (5 most similar each) median {q[0]:.3f}, "
          f"90% {q[1]:.3f}, 99% {q[2]:.3f}, max {q[3]:.3f}")
    for name in copies:
        vals = []
        for i in range(40):
            v = dict(variants(Image.open(paths[i]).convert("L")))[name]
            a = small(v)
            vals.append(ncc(A[i], a, int(np.argmax(D[i, 0] @ descriptor(a).T))))
        print(f"  copies {name:15s}: min {min(vals):.3f}, median {np.median(vals):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
