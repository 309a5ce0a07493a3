"""What the on-prem measurement teacher knows about an image: numbers measured with scikit-image.

Every value here is measured on the pixels (greyscale, data bar removed, longest side
reduced to 256 px for speed; sizes are scaled back to the original pixel grid and to nm when
the pixel size is known). Nothing is inferred that was not measured; each group of values
backs one fact key of the prompt packs.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, transform

MEASUREMENT_VERSION = "1"
_WORK_SIDE = 256


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
