"""Near copies by their pixels (``dataset.group_by: auto``): shifted, cropped, rotated and
mirrored copies of one micrograph that share no file name end up in one sample group.

Two images are copies when local features of one map onto the other under one similarity
transform (shift, rotation, scale), with or without a mirror, and their pixels then agree:

1. Features (per image, cached by image id under ``<workdir>/cache/near_copies/``): dark
   margins (the black border of a shifted copy) are trimmed, the image is reduced by one whole
   factor for the whole data set (its median longer side to about ``max_side`` pixels: a crop
   stays at the scale of its original) and its contrast stretched (1st-99th percentile); ORB
   keypoints and rBRIEF descriptors (scikit-image) are taken from it and, for mirrored copies
   (ORB is rotation- but not mirror-invariant), descriptors of the mirrored image at the
   mirrored keypoints.
2. Candidates: every descriptor is hashed on ``tables`` fixed random subsets of 16 of its 256
   bits; the ``neighbours`` images sharing the most (idf-weighted) hash keys with an image,
   directly or mirrored, are its candidates. Cheap (one sparse product) and strong: a copy
   repeats most descriptors almost bit for bit.
3. Geometry: descriptors matched as ``skimage.feature.match_descriptors`` does (Hamming,
   cross-checked, ratio test), then ``skimage.measure.ransac`` with a similarity transform
   (scale within ``max_scale``); at least ``min_inliers`` matches must agree within
   ``residual`` pixels.
4. Pixels: the transform, taken back to full resolution, maps one image onto the other. Snapped
   to a whole-pixel shift and a multiple of 90 degrees (with or without a mirror) when it is
   one, the fine detail of the overlap (the image minus its Gaussian blur) must correlate by at
   least ``min_detail_correlation``: a copy repeats the noise, a different image does not
   however alike its structure. Any other transform (a rescaled or slightly rotated copy) is
   resampled and compared on a coarser band (``min_band_correlation``).
5. Groups: connected components of the accepted pairs.

Why the pixel test: distinct images of one layout (ELPV cells: the same busbars in every cell)
share structure, and neighbouring multicrystalline cells cut from one ingot share their grain
pattern well enough for hundreds of ORB matches under the identity; only the noise tells them
apart (bench/near_copy_detection.py). A re-acquisition of a sample is therefore no near copy:
its groups come from names (``dataset.group_by`` as a regular expression). The group ids come
from :func:`maemi_core.data.sample_groups.detected_group_ids`, which keeps them stable.
"""

from __future__ import annotations

import uuid
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

# Part of the cache key: change it whenever the features of an image would change.
FEATURES_VERSION = "orb-1"


@dataclass(frozen=True)
class NearCopySettings:
    max_side: int = 400            # images are reduced by a whole factor to about this (pixels)
    n_keypoints: int = 500
    fast_threshold: float = 0.03
    n_scales: int = 3
    downscale: float = 1.5
    tables: int = 8                # hash tables of the candidate search
    neighbours: int = 8            # candidates verified per image
    max_ratio: float = 0.8         # descriptor ratio test
    residual: float = 2.5          # inlier distance (working pixels)
    min_inliers: int = 10
    max_scale: float = 2.0         # the larger of two copies is at most this much larger
    max_trials: int = 200
    min_detail_correlation: float = 0.9   # whole-pixel copies: fine detail of the overlap
    min_band_correlation: float = 0.9     # resampled copies: a coarser band

    def cache_key(self) -> str:
        """What the cached features depend on (the matching settings do not change them)."""
        import hashlib

        keep = ("max_side", "n_keypoints", "fast_threshold", "n_scales", "downscale")
        text = FEATURES_VERSION + repr(tuple(asdict(self)[k] for k in keep))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Features:
    """ORB features of one image: keypoints as (row, col) at the working scale, descriptors
    packed to 32 bytes, the same for its mirror image (columns mirrored), and ``frame``: where
    the working image lies in the original (top, left, height and width of the trimmed part,
    working height and width)."""
    keypoints: np.ndarray
    descriptors: np.ndarray
    mirror_keypoints: np.ndarray
    mirror_descriptors: np.ndarray
    frame: np.ndarray

    @staticmethod
    def empty(frame=(0, 0, 1, 1, 1, 1)) -> Features:
        k, d = np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
        return Features(k, d, k, d, np.asarray(frame, np.float64))


# --- features ------------------------------------------------------------------------------

def dark_margins(gray: np.ndarray, level: float = 0.02, fraction: float = 0.9) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of ``gray`` without the rows and columns along its edges that are
    (almost) all black: the border a shifted copy is padded with carries no content and would
    match any other border."""
    dark = gray <= level
    rows, cols = dark.mean(axis=1) >= fraction, dark.mean(axis=0) >= fraction

    def span(flags: np.ndarray) -> tuple[int, int]:
        lo, hi = 0, len(flags)
        while lo < hi and flags[lo]:
            lo += 1
        while hi > lo and flags[hi - 1]:
            hi -= 1
        return lo, hi

    (r0, r1), (c0, c1) = span(rows), span(cols)
    if r1 - r0 < 32 or c1 - c0 < 32:
        return 0, gray.shape[0], 0, gray.shape[1]
    return r0, r1, c0, c1


def reduction_factor(long_sides: Sequence[int], settings: NearCopySettings) -> int:
    """The whole factor a data set's images are reduced by: its median longer side to the nearest
    of ``max_side`` times a whole number. One factor for all keeps a copy and a crop of it at one
    scale."""
    return max(1, int(round(float(np.median(long_sides)) / settings.max_side))) if len(long_sides) else 1


def prepare(gray: np.ndarray, settings: NearCopySettings, factor: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """The working image (trimmed, reduced by the whole ``factor`` - default: to at most
    ``max_side`` pixels; more for an image over twice ``max_side`` times it -, contrast-stretched,
    float64 in [0, 1]) and its frame (see :class:`Features`). Each working pixel is the mean of
    whole pixels."""
    from skimage.transform import downscale_local_mean

    gray = np.asarray(gray, dtype=np.float32)
    r0, r1, c0, c1 = dark_margins(gray)
    side = max(r1 - r0, c1 - c0)
    f = max(int(factor) if factor else 1, int(np.ceil(side / (settings.max_side * (2 if factor else 1)))))
    r1, c1 = r1 - (r1 - r0) % f, c1 - (c1 - c0) % f
    g = gray[r0:r1, c0:c1]
    if f > 1:
        g = downscale_local_mean(g, (f, f))
    lo, hi = np.percentile(g, (1, 99))
    img = np.clip((g - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float64)
    return img, np.array([r0, c0, r1 - r0, c1 - c0, img.shape[0], img.shape[1]], np.float64)


def image_features(gray: np.ndarray, settings: NearCopySettings = NearCopySettings(),
                   factor: Optional[int] = None) -> Features:
    """ORB keypoints and descriptors of a greyscale image (float in [0, 1]) and of its mirror,
    taken at :func:`prepare`'s working scale."""
    from skimage.feature import ORB

    img, frame = prepare(gray, settings, factor)
    if min(img.shape) < 48:
        return Features.empty(frame)
    params = dict(n_keypoints=settings.n_keypoints, fast_threshold=settings.fast_threshold,
                  n_scales=settings.n_scales, downscale=settings.downscale)
    orb = ORB(**params)
    try:
        orb.detect_and_extract(img)
    except RuntimeError:             # no keypoint at all (a flat image)
        return Features.empty(frame)
    if len(orb.keypoints) == 0:
        return Features.empty(frame)
    # The mirror image's keypoints are the mirrored keypoints (FAST and Harris are symmetric) with
    # the orientation mirrored (pi - angle); only the descriptors are taken again. ORB.extract
    # sorts keypoints by octave (log(scale) / log(downscale), rounded down: the tiny factor keeps
    # an exact power from rounding to the octave below), so they go in sorted.
    order = np.argsort(orb.scales, kind="stable")
    mkp = orb.keypoints[order].astype(np.float64)
    mkp[:, 1] = img.shape[1] - 1 - mkp[:, 1]
    mirror = ORB(**params)
    mirror.extract(np.ascontiguousarray(img[:, ::-1]), mkp.copy(), orb.scales[order] * (1 + 1e-9),
                   np.pi - orb.orientations[order])
    return Features(orb.keypoints.astype(np.float32), np.packbits(orb.descriptors, axis=1),
                    mkp[mirror.mask_].astype(np.float32), np.packbits(mirror.descriptors, axis=1), frame)


def _cache_path(cache_dir: Path, image_id: str, crop_bottom: int) -> Path:
    return cache_dir / image_id[:2] / f"{image_id}_{int(crop_bottom)}.npz"


def load_gray(path, crop_bottom: int = 0) -> np.ndarray:
    """The image as float greyscale in [0, 1] without its ``crop_bottom`` data-bar rows."""
    from maemi_core.data.image_io import load_gray_array

    gray = load_gray_array(path)
    return gray[: gray.shape[0] - int(crop_bottom)] if crop_bottom else gray


def cached_features(items: Sequence[tuple[str, str, int]], cache_dir: Optional[Path],
                    settings: NearCopySettings = NearCopySettings(), factor: Optional[int] = None,
                    progress: Callable[[Iterable], Iterable] = lambda it: it) -> list[Features]:
    """Features of ``(image_id, path, crop_bottom)`` items at reduction ``factor``, read from
    ``cache_dir`` when an earlier build computed them (the image id is the file's content hash)
    and written there otherwise (atomically: concurrent builds never read a half-written file)."""
    base = Path(cache_dir) / f"{settings.cache_key()}_x{factor or 0}" if cache_dir is not None else None
    names = [f.name for f in fields(Features)]
    out: list[Features] = []
    for image_id, path, crop in progress(items):
        target = _cache_path(base, image_id, crop) if base is not None else None
        if target is not None and target.is_file():
            try:
                with np.load(target) as z:
                    out.append(Features(*(z[n] for n in names)))
                continue
            except (OSError, ValueError, KeyError):
                pass                  # unreadable: computed again below
        feats = image_features(load_gray(path, crop), settings, factor)
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as fh:
                np.savez(fh, **asdict(feats))
            tmp.replace(target)
        out.append(feats)
    return out


# --- candidates ----------------------------------------------------------------------------

def _hash_keys(descriptors: np.ndarray, settings: NearCopySettings) -> np.ndarray:
    """The distinct (table, 16-bit key) codes of packed descriptors."""
    if len(descriptors) == 0:
        return np.zeros(0, np.int64)
    bits = np.unpackbits(descriptors, axis=1)
    rng = np.random.default_rng(20240527)           # fixed: the same keys in every build
    codes = []
    weights = (1 << np.arange(16)).astype(np.int64)
    for t in range(settings.tables):
        pick = rng.choice(256, 16, replace=False)
        codes.append((t << 16) + bits[:, pick].astype(np.int64) @ weights)
    return np.unique(np.concatenate(codes))


def candidate_pairs(features: Sequence[Features], settings: NearCopySettings = NearCopySettings(),
                    block: int = 1024) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, score)``, i < j, among each image's ``neighbours`` images that share the
    most hash keys of their descriptors with it (idf-weighted; j's mirror counts as j), best
    first."""
    from scipy import sparse

    n = len(features)
    if n < 2:
        return []

    def matrix(keys: list[np.ndarray]) -> sparse.csr_matrix:
        rows = np.repeat(np.arange(n), [len(k) for k in keys])
        cols = np.concatenate(keys) if rows.size else np.zeros(0, np.int64)
        return sparse.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)),
                                 shape=(n, settings.tables << 16))

    direct = matrix([_hash_keys(f.descriptors, settings) for f in features])
    mirrored = matrix([_hash_keys(f.mirror_descriptors, settings) for f in features])
    df = np.asarray((direct + mirrored > 0).sum(axis=0)).ravel()
    idf = sparse.diags(np.log((1.0 + n) / (1.0 + df)).astype(np.float32))
    weighted = (direct @ idf).tocsr()
    k = min(settings.neighbours, n - 1)
    best: dict[tuple[int, int], float] = {}
    for start in range(0, n, block):
        stop = min(n, start + block)
        score = np.maximum((weighted[start:stop] @ direct.T).toarray(), (weighted[start:stop] @ mirrored.T).toarray())
        score[np.arange(stop - start), np.arange(start, stop)] = 0.0
        top = np.argpartition(-score, k - 1, axis=1)[:, :k]
        for r, js in enumerate(top):
            i = start + r
            for j in js:
                s = float(score[r, j])
                if s > 0 and j != i:
                    key = (min(i, int(j)), max(i, int(j)))
                    best[key] = max(best.get(key, 0.0), s)
    return sorted(((i, j, s) for (i, j), s in best.items()), key=lambda t: (-t[2], t[0], t[1]))


# --- geometry ------------------------------------------------------------------------------

def hamming_matrix(d_a: np.ndarray, d_b: np.ndarray) -> np.ndarray:
    """Hamming distances between packed 256-bit descriptors (popcount of 64-bit words)."""
    a, b = np.ascontiguousarray(d_a).view(np.uint64), np.ascontiguousarray(d_b).view(np.uint64)
    out = np.bitwise_count(a[:, 0, None] ^ b[None, :, 0]).astype(np.int32)
    for k in range(1, a.shape[1]):
        out += np.bitwise_count(a[:, k, None] ^ b[None, :, k])
    return out


def match_packed(d_a: np.ndarray, d_b: np.ndarray, max_ratio: float) -> np.ndarray:
    """``skimage.feature.match_descriptors(..., metric="hamming", cross_check=True, max_ratio=...)``
    on packed descriptors, from one popcount distance matrix (a few hundred times faster than
    SciPy's ``cdist`` on 256 booleans): mutual nearest neighbours whose distance is below
    ``max_ratio`` times that of the second nearest."""
    if len(d_a) == 0 or len(d_b) == 0:
        return np.zeros((0, 2), np.intp)
    dist = hamming_matrix(d_a, d_b)
    best_b = np.argmin(dist, axis=1)
    best_a = np.argmin(dist, axis=0)
    ia = np.flatnonzero(best_a[best_b] == np.arange(len(d_a)))
    ib = best_b[ia]
    if max_ratio < 1 and dist.shape[1] > 1:
        two = np.partition(dist[ia], 1, axis=1)[:, :2].astype(np.float64)
        second = np.where(two[:, 1] == 0, np.finfo(np.float64).eps, two[:, 1])
        keep = two[:, 0] / second < max_ratio
        ia, ib = ia[keep], ib[keep]
    return np.column_stack([ia, ib])


class Similarity2D:
    """The 2-D similarity ``w = a z + b`` (points as complex numbers, ``a = scale * e^(i angle)``),
    least-squares from point pairs in closed form: the model ``skimage.measure.ransac`` fits,
    a fraction of the cost of ``skimage.transform.SimilarityTransform``'s general estimate."""

    def __init__(self, a: complex = 1 + 0j, b: complex = 0j, ok: bool = True):
        self.a, self.b, self.ok = complex(a), complex(b), ok

    @classmethod
    def from_estimate(cls, src: np.ndarray, dst: np.ndarray) -> Similarity2D:
        z, w = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
        zc, wc = z - z.mean(), w - w.mean()
        den = float(np.sum(np.abs(zc) ** 2))
        if den < 1e-9:
            return cls(ok=False)
        a = complex(np.sum(wc * np.conj(zc)) / den)
        return cls(a, complex(w.mean() - a * z.mean()))

    def estimate(self, src: np.ndarray, dst: np.ndarray) -> bool:   # scikit-image < 0.26
        fit = self.from_estimate(src, dst)
        self.a, self.b, self.ok = fit.a, fit.b, fit.ok
        return fit.ok

    def __bool__(self) -> bool:
        return self.ok

    def residuals(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        return np.abs(self.a * (src[:, 0] + 1j * src[:, 1]) + self.b - (dst[:, 0] + 1j * dst[:, 1]))

    @property
    def scale(self) -> float:
        return abs(self.a)

    @property
    def matrix(self) -> np.ndarray:
        """3x3 homogeneous matrix on (x, y) = (column, row)."""
        a, b = self.a, self.b
        return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class PairMatch:
    inliers: int
    matches: int
    mirrored: bool = False
    model: Optional[np.ndarray] = None     # working (x, y) of the first -> of the second (mirrored)


def consensus_bound(src: np.ndarray, dst: np.ndarray, settings: NearCopySettings, seed: int = 0) -> int:
    """The most matches any of ``max_trials`` random two-point similarities (scale within
    ``max_scale``) brings within ``residual``: the search ``ransac`` makes, vectorised. A pair
    whose bound is under ``min_inliers`` is no copy and skips ``ransac`` (most pairs of distinct
    images of one layout, each costing ``max_trials`` model fits there)."""
    z, w = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
    pick = np.random.default_rng(seed).integers(0, len(z), size=(settings.max_trials, 2))
    dz = z[pick[:, 1]] - z[pick[:, 0]]
    keep = np.abs(dz) > 1e-6
    if not keep.any():
        return 0
    pick, dz = pick[keep], dz[keep]
    a = (w[pick[:, 1]] - w[pick[:, 0]]) / dz
    plausible = (np.abs(a) >= 1 / settings.max_scale) & (np.abs(a) <= settings.max_scale)
    if not plausible.any():
        return 0
    a, pick = a[plausible], pick[plausible]
    b = w[pick[:, 0]] - a * z[pick[:, 0]]
    return int((np.abs(a[:, None] * z[None, :] + b[:, None] - w[None, :]) < settings.residual).sum(axis=1).max())


def _geometry(kp_a, d_a, kp_b, d_b, settings: NearCopySettings, mirrored: bool) -> PairMatch:
    from skimage.measure import ransac

    if len(d_a) < settings.min_inliers or len(d_b) < settings.min_inliers:
        return PairMatch(0, 0, mirrored)
    m = match_packed(d_a, d_b, settings.max_ratio)
    if len(m) < settings.min_inliers:
        return PairMatch(0, len(m), mirrored)
    src = kp_a[m[:, 0]][:, ::-1].astype(np.float64)
    dst = kp_b[m[:, 1]][:, ::-1].astype(np.float64)

    if consensus_bound(src, dst, settings) < settings.min_inliers:
        return PairMatch(0, len(m), mirrored)

    def plausible(model, *_):
        return 1 / settings.max_scale <= model.scale <= settings.max_scale

    with warnings.catch_warnings():      # "no inliers" / "model not valid": a pair that is no copy
        warnings.simplefilter("ignore", UserWarning)
        model, inliers = ransac((src, dst), Similarity2D, min_samples=2, residual_threshold=settings.residual,
                                max_trials=settings.max_trials, stop_probability=0.999,
                                is_model_valid=plausible, rng=0)
    if model is None or inliers is None or not model or not plausible(model):
        return PairMatch(0, len(m), mirrored)
    return PairMatch(int(inliers.sum()), len(m), mirrored, model.matrix)


def verify_geometry(a: Features, b: Features, settings: NearCopySettings = NearCopySettings()) -> list[PairMatch]:
    """The similarity transform mapping ``a`` onto ``b``, or onto ``b`` mirrored when ``b`` as it is
    has none, that at least ``min_inliers`` matches agree on (an empty list: neither has)."""
    direct = _geometry(a.keypoints, a.descriptors, b.keypoints, b.descriptors, settings, False)
    if direct.inliers >= settings.min_inliers:
        return [direct]
    mirrored = _geometry(a.keypoints, a.descriptors, b.mirror_keypoints, b.mirror_descriptors, settings, True)
    return [mirrored] if mirrored.inliers >= settings.min_inliers else []


# --- pixels --------------------------------------------------------------------------------

def _to_working(frame: np.ndarray, mirrored: bool = False) -> np.ndarray:
    """3x3 matrix: original (x, y) -> working (x, y) (mirrored: of the mirrored working image)."""
    r0, c0, h, w, hw, ww = frame
    fr, fc = hw / h, ww / w
    m = np.array([[fc, 0.0, (0.5 - c0) * fc - 0.5], [0.0, fr, (0.5 - r0) * fr - 0.5], [0.0, 0.0, 1.0]])
    if mirrored:
        m = np.array([[-1.0, 0.0, ww - 1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    return m


_DIHEDRAL = [np.array(m, np.float64) for m in ([[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]],
                                                  [[0, 1], [-1, 0]], [[-1, 0], [0, 1]], [[1, 0], [0, -1]],
                                                  [[0, 1], [1, 0]], [[0, -1], [-1, 0]])]


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 256:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    return float(np.dot(a, b) / den) if den > 0 else 0.0


class Pixels:
    """An image as float greyscale with its fine detail (minus its Gaussian blur, sigma 1), a
    coarser band (blur sigma 1.5 minus blur sigma 4) and where both can be trusted (not within
    4 pixels of a clipped pixel, one at the image's lowest or highest value: a brightened copy
    saturates, and its detail there is gone), each computed once, when first asked for."""

    def __init__(self, gray: np.ndarray):
        self.gray = np.asarray(gray, dtype=np.float32)
        self._fine: Optional[np.ndarray] = None
        self._band: Optional[np.ndarray] = None
        self._usable: Optional[np.ndarray] = None

    @property
    def usable(self) -> np.ndarray:
        if self._usable is None:
            from scipy import ndimage as ndi

            g = self.gray
            clipped = (g >= g.max()) | (g <= g.min())
            self._usable = ~ndi.binary_dilation(clipped, iterations=4) if clipped.any() else np.ones(g.shape, bool)
        return self._usable

    @property
    def fine(self) -> np.ndarray:
        if self._fine is None:
            from scipy import ndimage as ndi

            self._fine = self.gray - ndi.gaussian_filter(self.gray, 1.0)
        return self._fine

    @property
    def band(self) -> np.ndarray:
        if self._band is None:
            from scipy import ndimage as ndi

            self._band = ndi.gaussian_filter(self.gray, 1.5) - ndi.gaussian_filter(self.gray, 4.0)
        return self._band


def pixel_agreement(pix_a, pix_b, fa: Features, fb: Features, match: PairMatch,
                    settings: NearCopySettings = NearCopySettings()) -> tuple[float, bool]:
    """(correlation, whole-pixel) of the overlap of two images under ``match``'s transform taken
    to full resolution. A shift by whole pixels and a multiple of 90 degrees (mirrored or not):
    the correlation of their fine detail (image minus its Gaussian blur, sigma 1) at the best
    whole-pixel shift within the estimate's precision (one working pixel and one more). Any
    other transform: that of a coarser band (blur sigma 1.5 minus blur sigma 4) after resampling."""
    from scipy import ndimage as ndi

    pix_a = pix_a if isinstance(pix_a, Pixels) else Pixels(pix_a)
    pix_b = pix_b if isinstance(pix_b, Pixels) else Pixels(pix_b)
    m = np.linalg.inv(_to_working(fb.frame, match.mirrored)) @ match.model @ _to_working(fa.frame)
    lin, t = m[:2, :2], m[:2, 2]
    # Where the comparison may look: inside both trimmed frames, two pixels off their edges.
    ar0, ac0, ah, aw = (int(v) for v in fa.frame[:4])
    br0, bc0, bh, bw = (int(v) for v in fb.frame[:4])
    step = max(1, int(np.ceil(np.sqrt(ah * aw / 150_000))))        # at most ~150k pixels compared
    ys, xs = np.mgrid[ar0 + 2:ar0 + ah - 2:step, ac0 + 2:ac0 + aw - 2:step]
    ys, xs = ys.ravel(), xs.ravel()
    enough = 0.05 * min(ah * aw, bh * bw) / step ** 2                 # the overlap: 5% of the smaller

    def inside(bx, by):
        return (bx >= bc0 + 2) & (bx <= bc0 + bw - 3) & (by >= br0 + 2) & (by <= br0 + bh - 3)

    trust_a = pix_a.usable[ys, xs]
    ys, xs = ys[trust_a], xs[trust_a]

    dist = [float(np.abs(lin - d).max()) for d in _DIHEDRAL]
    k = int(np.argmin(dist))
    if dist[k] <= 0.02:                   # a whole-pixel copy: compare the exact pixels
        fine_a, fine_b = pix_a.fine, pix_b.fine
        d = _DIHEDRAL[k].astype(np.int64)
        bx0 = d[0, 0] * xs + d[0, 1] * ys + int(np.round(t[0]))
        by0 = d[1, 0] * xs + d[1, 1] * ys + int(np.round(t[1]))
        few = np.arange(0, len(xs), max(1, len(xs) // 5_000))      # the search looks at ~5k pixels
        # The estimate is good to about a working pixel: search that far and one pixel more.
        reach = int(np.ceil(max(fa.frame[2] / fa.frame[4], fb.frame[2] / fb.frame[4]))) + 1
        best, shift = -1.0, (0, 0)
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                bx, by = bx0[few] + dx, by0[few] + dy
                ok = inside(bx, by)
                ok[ok] = pix_b.usable[by[ok], bx[ok]]
                if ok.sum() * len(xs) / len(few) < enough:
                    continue
                c = _ncc(fine_a[ys[few][ok], xs[few][ok]], fine_b[by[ok], bx[ok]])
                if c > best:
                    best, shift = c, (dx, dy)
        if best < 0:
            return 0.0, True
        bx, by = bx0 + shift[0], by0 + shift[1]
        ok = inside(bx, by)
        ok[ok] = pix_b.usable[by[ok], bx[ok]]
        return _ncc(fine_a[ys[ok], xs[ok]], fine_b[by[ok], bx[ok]]), True
    band_a, band_b = pix_a.band, pix_b.band
    bx, by = lin[0, 0] * xs + lin[0, 1] * ys + t[0], lin[1, 0] * xs + lin[1, 1] * ys + t[1]
    ok = inside(bx, by)
    ok[ok] = pix_b.usable[np.round(by[ok]).astype(np.int64), np.round(bx[ok]).astype(np.int64)]
    if ok.sum() < enough:
        return 0.0, False
    return _ncc(band_a[ys[ok], xs[ok]], ndi.map_coordinates(band_b, [by[ok], bx[ok]], order=1)), False


def is_copy(pix_a, pix_b, fa: Features, fb: Features, match: PairMatch,
            settings: NearCopySettings = NearCopySettings()) -> bool:
    """Whether the pixels (arrays or :class:`Pixels`) agree under ``match``: see :func:`pixel_agreement`."""
    score, whole = pixel_agreement(pix_a, pix_b, fa, fb, match, settings)
    return score >= (settings.min_detail_correlation if whole else settings.min_band_correlation)


# --- groups --------------------------------------------------------------------------------

def near_copy_components(features: Sequence[Features], load: Callable[[int], np.ndarray],
                         settings: NearCopySettings = NearCopySettings(),
                         on_pair: Optional[Callable[[int, int, list, bool], None]] = None) -> np.ndarray:
    """A component label per image (the smallest index of its component): the connected
    components of the candidate pairs whose geometry and pixels agree (``load(i)``: image i as
    float greyscale). A pair already joined through others is not verified again."""
    from collections import OrderedDict

    parent = list(range(len(features)))
    cache: OrderedDict[int, Pixels] = OrderedDict()

    def image(i: int) -> Pixels:
        """Image i, kept while the images last asked for take under ~1 GB (with their detail)."""
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        cache[i] = Pixels(load(i))
        while len(cache) > 2 and sum(3 * p.gray.nbytes for p in cache.values()) > 1 << 30:
            cache.popitem(last=False)
        return cache[i]

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in candidate_pairs(features, settings):
        ri, rj = find(i), find(j)
        if ri == rj:
            continue
        matches = verify_geometry(features[i], features[j], settings)
        same = any(is_copy(image(i), image(j), features[i], features[j], m, settings) for m in matches)
        if on_pair is not None:
            on_pair(i, j, matches, same)
        if same:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(len(features))])


def near_copy_group_ids(manifest, cfg, earlier: dict[str, str],
                        log: Callable[[str], None] = lambda msg: None,
                        settings: NearCopySettings = NearCopySettings()) -> tuple[list[str], list[Optional[str]]]:
    """``group_id`` and ``sample`` for every manifest row: groups of near copies with ids kept
    stable from ``earlier`` (:func:`maemi_core.data.sample_groups.detected_group_ids`); the
    sample of a group of several is named after its id, an image without copies has none."""
    import time

    from tqdm.auto import tqdm

    from maemi_core.data.sample_groups import detected_group_ids

    t0 = time.perf_counter()
    ids, paths = list(manifest["image_id"]), list(manifest["path"])
    crops = [int(c) for c in manifest["crop_bottom"]] if "crop_bottom" in manifest else [0] * len(ids)
    factor = reduction_factor([max(w, h) for w, h in zip(manifest["width"], manifest["height"])], settings)
    feats = cached_features(list(zip(ids, paths, crops)), cfg.workdir_path / "cache" / "near_copies", settings, factor,
                            progress=lambda it: tqdm(it, desc="near-copy features", unit="img", mininterval=2))
    components = near_copy_components(feats, lambda i: load_gray(paths[i], crops[i]), settings)
    gids = detected_group_ids(ids, list(components), earlier)
    sizes: dict[str, int] = {}
    for g in gids:
        sizes[g] = sizes.get(g, 0) + 1
    samples = [f"near copies {g[:12]}" if sizes[g] > 1 else None for g in gids]
    log(f"near copies (group_by: auto): {sum(1 for g in gids if sizes[g] > 1)} of {len(ids)} images in "
        f"{sum(1 for s in sizes.values() if s > 1)} groups of 2 or more ({time.perf_counter() - t0:.0f} s)")
    return gids, samples
