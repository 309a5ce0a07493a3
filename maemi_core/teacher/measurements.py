"""What the on-prem measurement teacher knows about an image: numbers measured with scikit-image.

Every value here is measured on the pixels (greyscale, data bar removed, longest side
reduced to 256 px for speed; sizes are scaled back to the original pixel grid and to nm when
the pixel size is known). Nothing is inferred that was not measured; each group of values
backs one fact key of the prompt packs.

Morphology (:func:`measure_morphology`) works at a finer grid (longest side up to 1024 px):
the bright phase is thresholded to a mask and measured as a fibre network (skeleton and
distance transform: diameter distribution, beads, orientation coherence, coverage) and as
particles (watershed on the distance transform: size distribution); which of the two the
image shows is decided from the mask's skeleton length against its area.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, segmentation, transform

# Part of the measurement teacher's identity (and so of every cache key). 2: fibre and particle
# morphology (measure_morphology).
MEASUREMENT_VERSION = "2"
_WORK_SIDE = 256
_MORPH_SIDE = 1024          # fibres a few pixels wide must survive: a finer grid than _WORK_SIDE
BEAD_WIDTH_RATIO = 2.0      # a bead: local width more than this many times the median fibre width
FIBRE_ELONGATION = 8.0      # a fibre-like object: skeleton length at least this many widths
COMPACT_ELONGATION = 3.0    # a compact (particle-like) object: skeleton length under this many widths


def _prepare(gray: np.ndarray) -> tuple[np.ndarray, float]:
    h, w = gray.shape
    factor = min(1.0, _WORK_SIDE / max(h, w))
    if factor < 1.0:
        gray = transform.resize(gray, (max(8, round(h * factor)), max(8, round(w * factor))), anti_aliasing=True)
    return gray.astype(np.float64), factor


def measure_image(gray: np.ndarray, pixel_size_nm: float | None = None) -> dict:
    """All measurements of one greyscale image (values in [0, 1], HxW at original resolution)."""
    orig_h, orig_w = gray.shape
    g, factor = _prepare(gray)
    px = 1.0 / factor  # original pixels per working pixel
    out: dict = {"width_px": int(orig_w), "height_px": int(orig_h)}

    # intensity
    out["intensity"] = {
        "mean": float(g.mean()), "std": float(g.std()),
        "p1": float(np.percentile(g, 1)), "p99": float(np.percentile(g, 99)),
        "saturated_fraction": float(((g <= 0.005) | (g >= 0.995)).mean()),
    }

    # scale
    if pixel_size_nm:
        out["scale"] = {"pixel_size_nm": float(pixel_size_nm), "fov_w_nm": float(orig_w * pixel_size_nm),
                        "fov_h_nm": float(orig_h * pixel_size_nm)}
    else:
        out["scale"] = None

    # particles: the brighter Otsu phase, connected components
    thr = filters.threshold_otsu(g) if g.std() > 1e-6 else float(g.mean())
    fg = morphology.remove_small_objects(g > thr, max_size=8)
    labels = measure.label(fg)
    props = measure.regionprops(labels)
    diam = np.array([p.equivalent_diameter_area * px for p in props]) if props else np.zeros(0)
    solidity = np.array([p.solidity for p in props]) if props else np.zeros(0)
    out["particles"] = {
        "count": int(len(props)), "area_fraction": float(fg.mean()),
        "median_diameter_px": float(np.median(diam)) if len(diam) else 0.0,
        "p10_diameter_px": float(np.percentile(diam, 10)) if len(diam) else 0.0,
        "p90_diameter_px": float(np.percentile(diam, 90)) if len(diam) else 0.0,
        "largest_diameter_px": float(diam.max()) if len(diam) else 0.0,
        "threshold": float(thr),
    }
    out["boundaries"] = {
        "nonconvex_fraction": float((solidity < 0.8).mean()) if len(solidity) else 0.0,
        "boundary_density": float(np.mean(np.abs(np.diff(fg.astype(np.int8), axis=1)) > 0)),
    }

    # porosity: the darker phase as separate components (pores / voids)
    dark = morphology.remove_small_objects(g < thr, max_size=8)
    pores = measure.regionprops(measure.label(dark))
    pore_d = np.array([p.equivalent_diameter_area * px for p in pores]) if pores else np.zeros(0)
    out["porosity"] = {"dark_fraction": float(dark.mean()), "pore_count": int(len(pores)),
                       "median_pore_diameter_px": float(np.median(pore_d)) if len(pore_d) else 0.0}

    # orientation: structure tensor coherence and dominant direction
    arr = feature.structure_tensor(g, sigma=2.0, order="rc")
    a_rr, a_rc, a_cc = (float(x.mean()) for x in arr)
    tmp = math.sqrt((a_rr - a_cc) ** 2 + 4 * a_rc ** 2)
    l1, l2 = (a_rr + a_cc + tmp) / 2, (a_rr + a_cc - tmp) / 2
    coherence = (l1 - l2) / (l1 + l2) if l1 + l2 > 1e-12 else 0.0
    # Direction of the dominant structures (perpendicular to the dominant gradient), degrees from horizontal.
    grad_angle = 0.5 * math.degrees(math.atan2(2 * a_rc, a_cc - a_rr))
    out["orientation"] = {"coherence": float(coherence), "dominant_angle_deg": float((grad_angle + 90) % 180)}

    # edges
    edges = feature.canny(g, sigma=1.5)
    out["edges"] = {"edge_fraction": float(edges.mean())}

    # texture: GLCM on 32 levels, averaged over four directions
    q = np.clip((g * 31).round(), 0, 31).astype(np.uint8)
    glcm = feature.graycomatrix(q, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32, symmetric=True, normed=True)
    local_std = np.sqrt(np.clip(ndi.uniform_filter(g * g, 5) - ndi.uniform_filter(g, 5) ** 2, 0, None))
    out["texture"] = {"glcm_contrast": float(feature.graycoprops(glcm, "contrast").mean()),
                      "glcm_homogeneity": float(feature.graycoprops(glcm, "homogeneity").mean()),
                      "local_std": float(np.mean(local_std))}

    # uniformity: coefficient of variation of tile statistics (same score as sampling uses)
    from maemi_core.vision.similarity_sampling import spatial_heterogeneity_one

    tiles = _tile_means(g, 4)
    out["uniformity"] = {"heterogeneity": spatial_heterogeneity_one(g),
                         "brightest_tile": _tile_name(np.unravel_index(tiles.argmax(), tiles.shape)),
                         "darkest_tile": _tile_name(np.unravel_index(tiles.argmin(), tiles.shape))}

    # phases: multi-Otsu into three intensity classes
    try:
        t1, t2 = filters.threshold_multiotsu(g, classes=3)
        classes = np.digitize(g, [t1, t2])
        fractions = [float((classes == i).mean()) for i in range(3)]
    except ValueError:  # too few grey levels
        fractions = [1.0, 0.0, 0.0]
    out["phases"] = {"fractions": fractions, "n_major": int(sum(f >= 0.1 for f in fractions))}

    # dark regions: markedly darker than the image median
    med = float(np.median(g))
    dark_mask = g < 0.5 * med if med > 0.05 else g < 0.02
    dark_lab = measure.label(morphology.remove_small_objects(dark_mask, max_size=8))
    regions = measure.regionprops(dark_lab)
    largest = max(regions, key=lambda r: r.area) if regions else None
    out["dark_regions"] = {
        "fraction": float(dark_mask.mean()), "count": int(len(regions)),
        "largest_fraction": float(largest.area / g.size) if largest else 0.0,
        "largest_location": _location(largest.centroid, g.shape) if largest else None,
    }

    # line features: straight segments (probabilistic Hough on Canny edges)
    segs = transform.probabilistic_hough_line(edges, threshold=10, line_length=max(10, g.shape[1] // 8),
                                              line_gap=3, rng=0)
    lengths = [math.hypot(x1 - x0, y1 - y0) * px for (x0, y0), (x1, y1) in segs]
    angles = [math.degrees(math.atan2(-(y1 - y0), x1 - x0)) % 180 for (x0, y0), (x1, y1) in segs]
    buckets = {"horizontal": 0, "vertical": 0, "diagonal": 0}
    for a in angles:
        buckets["horizontal" if a < 15 or a > 165 else "vertical" if 75 < a < 105 else "diagonal"] += 1
    out["line_features"] = {"count": len(segs), "median_length_px": float(np.median(lengths)) if lengths else 0.0,
                            "directions": buckets}

    out.update(measure_morphology(gray, pixel_size_nm))
    return out


def _tile_means(g: np.ndarray, n: int) -> np.ndarray:
    h, w = g.shape
    return np.array([[g[i * h // n:(i + 1) * h // n, j * w // n:(j + 1) * w // n].mean() for j in range(n)]
                     for i in range(n)])


def _tile_name(ij) -> str:
    i, j = int(ij[0]), int(ij[1])
    row = "top" if i == 0 else "bottom" if i == 3 else "middle"
    col = "left" if j == 0 else "right" if j == 3 else "centre"
    return f"{row}-{col}"


def _location(centroid, shape) -> str:
    r, c = centroid
    row = "top" if r < shape[0] / 3 else "bottom" if r > 2 * shape[0] / 3 else "middle"
    col = "left" if c < shape[1] / 3 else "right" if c > 2 * shape[1] / 3 else "centre"
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}".replace("middle ", "")


# --- morphology: fibres and particles ------------------------------------------------------------

def _stats(values: np.ndarray, scale: float) -> dict:
    """Median, quartiles and 10th/90th percentiles of ``values`` (times ``scale``)."""
    if not len(values):
        return {"median": 0.0, "q1": 0.0, "q3": 0.0, "p10": 0.0, "p90": 0.0}
    p10, q1, med, q3, p90 = np.percentile(values, [10, 25, 50, 75, 90]) * scale
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "p10": float(p10), "p90": float(p90)}


def _noise_sigma(g: np.ndarray) -> float:
    """Standard deviation of pixel noise, from the median absolute difference of neighbours."""
    d = np.diff(g, axis=1)
    return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2)


def _bright_mask(g: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """The bright phase after removing slow background variation (charging, uneven detector
    response): Otsu's threshold on the smoothed, flattened image.

    ``sigma`` None: smoothing grows with the noise so that noise does not fray the outlines (a
    Gaussian of 1 px, up to 3 px for an image whose contrast is only a few noise levels): the
    mask whose skeleton and objects are measured. A given ``sigma`` (1 px for widths: heavier
    smoothing widens thin fibres) is followed by a 3 x 3 majority vote against ragged edges."""
    adaptive = sigma is None
    if adaptive:
        rough = g > filters.threshold_otsu(g) if g.std() > 1e-6 else np.zeros(g.shape, dtype=bool)
        contrast = float(np.median(g[rough]) - np.median(g[~rough])) if rough.any() and (~rough).any() else 0.0
        # white noise falls by 2 sqrt(pi) sigma under a Gaussian of sigma: aim at contrast >= 40 x noise
        sigma = (float(np.clip(40 * _noise_sigma(g) / (2 * math.sqrt(math.pi) * contrast), 1.0, 3.0))
                 if contrast > 0 else 1.0)
    sm = ndi.gaussian_filter(g.astype(np.float32), sigma, truncate=3.0).astype(np.float64)
    small = transform.resize(sm, (max(8, sm.shape[0] // 16), max(8, sm.shape[1] // 16)), anti_aliasing=True)
    flat = sm - transform.resize(filters.gaussian(small, 2.0), sm.shape)
    if flat.std() < 1e-4:
        return np.zeros(g.shape, dtype=bool)
    mask = flat > filters.threshold_otsu(flat)
    if not adaptive:
        mask = ndi.uniform_filter(mask.astype(np.float64), 3) > 0.5
    mask = morphology.remove_small_objects(mask, max_size=15)
    return morphology.remove_small_holes(mask, max_size=8)


def _skeleton_length(skel: np.ndarray) -> np.ndarray:
    """Centreline length carried by every skeleton pixel: half of each link to a neighbour
    (1 orthogonal, sqrt 2 diagonal; a diagonal link beside an orthogonal corner is not counted)."""
    s = skel
    w = np.zeros(s.shape, dtype=np.float64)
    h = s[:, :-1] & s[:, 1:]
    v = s[:-1, :] & s[1:, :]
    w[:, :-1] += 0.5 * h
    w[:, 1:] += 0.5 * h
    w[:-1, :] += 0.5 * v
    w[1:, :] += 0.5 * v
    d1 = s[:-1, :-1] & s[1:, 1:] & ~(s[:-1, 1:] | s[1:, :-1])
    d2 = s[:-1, 1:] & s[1:, :-1] & ~(s[:-1, :-1] | s[1:, 1:])
    half_diag = math.sqrt(2) / 2
    w[:-1, :-1] += half_diag * d1
    w[1:, 1:] += half_diag * d1
    w[:-1, 1:] += half_diag * d2
    w[1:, :-1] += half_diag * d2
    return np.where(s, np.maximum(w, 0.5), 0.0)   # an isolated pixel still stands for a point


def _coherence(mask: np.ndarray, sigma: float) -> tuple[float, float]:
    """Orientation coherence (0 isotropic .. 1 all parallel) and dominant direction (degrees from
    horizontal) of the mask's outlines, from the structure tensor averaged over the image. Wide
    fibres are measured on the mask reduced 2x (the same directions, a quarter of the pixels)."""
    m = mask.astype(np.float32)
    if sigma >= 3.0 and min(m.shape) >= 64:
        h, w = (m.shape[0] // 2) * 2, (m.shape[1] // 2) * 2
        m = m[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        sigma /= 2
    arr = feature.structure_tensor(m, sigma=sigma, order="rc")
    a_rr, a_rc, a_cc = (float(x.mean()) for x in arr)
    tmp = math.sqrt((a_rr - a_cc) ** 2 + 4 * a_rc ** 2)
    l1, l2 = (a_rr + a_cc + tmp) / 2, (a_rr + a_cc - tmp) / 2
    coherence = (l1 - l2) / (l1 + l2) if l1 + l2 > 1e-12 else 0.0
    grad_angle = 0.5 * math.degrees(math.atan2(2 * a_rc, a_cc - a_rr))
    return float(coherence), float((grad_angle + 90) % 180)


def _beads(mask: np.ndarray, dt: np.ndarray, fibre_radius: float) -> list[tuple[int, int, float]]:
    """Swellings of the fibres: distance maxima of radius above BEAD_WIDTH_RATIO x the fibre
    radius whose surroundings are mostly background. A bead on a fibre leaves the ring from 1 to
    1.6 of its radii crossed by the fibre's two arms only; where fibres cross at a shallow angle
    (up to about 2x, several fibres more) the ring is full of their arms. Measured on random
    synthetic networks, crossings fill that ring 42% or more, and those wider than 5 fibre radii
    (a knot of many fibres) 67% or more, so a maximum is a bead when its ring is under 40% full,
    or under 60% from 5 fibre radii (large beads in a dense mat are overlaid by other fibres).
    (row, col, radius) of each, the largest first; maxima closer than the larger radius are one bead."""
    floor = max(BEAD_WIDTH_RATIO * fibre_radius, 2.0)
    peaks = feature.peak_local_max(dt, min_distance=max(1, int(round(fibre_radius))), threshold_abs=floor,
                                   exclude_border=False)
    found: list[tuple[int, int, float]] = []
    h, w = mask.shape
    for r, c in sorted(peaks.tolist(), key=lambda rc: -dt[rc[0], rc[1]]):
        rad = float(dt[r, c])
        if any(math.hypot(r - r2, c - c2) <= max(rad, rad2) for r2, c2, rad2 in found):
            continue
        reach = int(math.ceil(1.6 * rad))
        yy, xx = np.mgrid[r - reach:r + reach + 1, c - reach:c + reach + 1]
        d = np.hypot(yy - r, xx - c)
        ring = (d > rad + 0.5) & (d <= 1.6 * rad)
        inside = ring & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        # Most of the ring must lie in the image: a crossing cut by the edge looks like a bead.
        allowed = 0.6 if rad >= 5 * fibre_radius else 0.4
        if inside.sum() >= 0.75 * ring.sum() and mask[yy[inside], xx[inside]].mean() < allowed:
            found.append((int(r), int(c), rad))
    return found


def _particle_sizes(mask: np.ndarray, dt: np.ndarray, px: float) -> dict:
    """Touching particles split by a watershed on the distance transform (one marker per
    distance maximum); sizes as equivalent diameters of the pieces not cut by the image edge."""
    comp = measure.label(mask)
    if comp.max() == 0:
        return {"count": 0, "diameter_px": _stats(np.zeros(0), px), "aspect_ratio": 0.0, "touching_fraction": 0.0}
    peak_r = ndi.maximum(dt, comp, index=np.arange(1, comp.max() + 1))
    min_distance = max(2, int(round(0.5 * float(np.median(peak_r)))))
    peaks = feature.peak_local_max(dt, min_distance=min_distance, threshold_abs=1.0, labels=comp,
                                   exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    pieces = segmentation.watershed(-dt, markers, mask=mask)
    t = measure.regionprops_table(pieces, properties=("area", "bbox", "axis_major_length", "axis_minor_length"))
    h, w = mask.shape
    inner = (t["bbox-0"] > 0) & (t["bbox-1"] > 0) & (t["bbox-2"] < h) & (t["bbox-3"] < w)
    if not inner.any():
        inner = np.ones(len(t["area"]), dtype=bool)
    diam = np.sqrt(4 * t["area"][inner] / np.pi)
    aspect = t["axis_major_length"][inner] / np.maximum(t["axis_minor_length"][inner], 1.0)
    # A piece that shares its connected object with another piece touches (or is fused with) it.
    owner = comp[tuple(peaks.T)]
    touching = float((np.bincount(owner)[owner] > 1).mean()) if len(peaks) else 0.0
    return {"count": int(len(t["area"])), "diameter_px": _stats(diam, px),
            "aspect_ratio": float(np.median(aspect)) if len(aspect) else 0.0, "touching_fraction": touching}


def measure_morphology(gray: np.ndarray, pixel_size_nm: float | None = None) -> dict:
    """Fibre and particle measurements of the bright phase; lengths in original pixels.

    ``morphology``: which the image shows (``fibres``, ``particles``, ``mixed``, ``continuous``
    when the bright phase covers nearly everything, ``none`` when there is no bright phase) with
    the numbers behind the decision; ``fibres``: diameter distribution (2 x the distance to the
    background at centreline pixels), beads, orientation coherence, coverage and skeleton length;
    ``particle_sizes``: the watershed size distribution.
    """
    h, w = gray.shape
    factor = min(1.0, _MORPH_SIDE / max(h, w))
    g = gray.astype(np.float64)
    if factor < 1.0:
        g = transform.resize(g, (max(8, round(h * factor)), max(8, round(w * factor))), anti_aliasing=True)
    px = 1.0 / factor
    mask = _bright_mask(g)             # objects, skeleton, beads, particles
    fine = _bright_mask(g, sigma=1.0)  # widths and coverage
    coverage = float(fine.mean())
    dt = ndi.distance_transform_edt(mask)
    skel = morphology.skeletonize(mask)
    length = _skeleton_length(skel)
    area_um2 = (h * w * pixel_size_nm ** 2 / 1e6) if pixel_size_nm else None

    # Per object: elongation = skeleton length / mean width = length^2 / area.
    comp = measure.label(mask)
    n = int(comp.max())
    if n:
        idx = np.arange(1, n + 1)
        areas = ndi.sum(mask, comp, idx)
        lengths = ndi.sum(length, comp, idx)
        elong = lengths ** 2 / np.maximum(areas, 1.0)
        fibre_like = float(areas[elong >= FIBRE_ELONGATION].sum() / areas.sum())
        compact = float(areas[elong < COMPACT_ELONGATION].sum() / areas.sum())
    else:
        fibre_like = compact = 0.0
    total_length = float(length.sum())
    if not n or coverage < 0.002:
        kind = "none"
    elif coverage > 0.9:
        kind = "continuous"
    elif fibre_like >= 0.6:
        kind = "fibres"
    elif compact >= 0.6:
        kind = "particles"
    else:
        kind = "mixed"
    out: dict = {"morphology": {
        "kind": kind, "coverage": coverage, "objects": n, "fibre_like_fraction": fibre_like,
        "compact_fraction": compact,
        # centreline length per unit of bright area (1 / mean width), in 1/px of the original grid
        "skeleton_length_per_area": float(total_length / max(mask.sum(), 1) / px),
        "grid_px": float(px),
    }}

    # Fibres: widths (2 x the distance to the background in the lightly smoothed mask) at the
    # centreline pixels that are a ridge of the distance map (spurs from a ragged outline run down
    # its slope and would bias the widths low).
    ridge = skel & (dt >= ndi.maximum_filter(dt, size=3) - 0.5) & fine
    if not ridge.any():
        ridge = skel & fine
    widths = 2.0 * ndi.distance_transform_edt(fine)[ridge]
    fibre_radius = float(np.median(widths)) / 2 if len(widths) else 0.0
    beads = _beads(mask, dt, fibre_radius) if fibre_radius > 0 else []
    coherence, angle = _coherence(mask, sigma=max(1.5, fibre_radius))
    length_px = total_length * px
    out["fibres"] = {
        "diameter_px": _stats(widths, px),
        "diameter_nm": _stats(widths, px * pixel_size_nm) if pixel_size_nm else None,
        "centreline_px": int(ridge.sum()),
        "length_px": float(length_px),
        "coverage": coverage, "porosity": 1.0 - coverage,
        "coherence": coherence, "dominant_angle_deg": angle,
        "bead_count": len(beads),
        "bead_diameter_px": _stats(np.array([2 * b[2] for b in beads]), px),
        # beads per 1000 px of fibre length, and per 100 um of fibre / per 1000 um2 of image when calibrated
        "beads_per_1000px": float(1000 * len(beads) / length_px) if length_px else 0.0,
        "beads_per_100um": (float(1e5 * len(beads) / (length_px * pixel_size_nm))
                            if pixel_size_nm and length_px else None),
        "beads_per_1000um2": float(1000 * len(beads) / area_um2) if area_um2 else None,
    }
    # A watershed of a fibre network only cuts fibres into pieces: particle sizes are for the rest.
    out["particle_sizes"] = _particle_sizes(mask, dt, px) if kind in ("particles", "mixed") else None
    return out
