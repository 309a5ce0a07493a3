"""The on-prem measurement teacher: grounded answers from scikit-image measurements.

It needs no model and no network. For each prompt it measures the image(s)
(:mod:`maemi_core.teacher.measurements`) and writes one or two sentences for every fact key
the prompt pack lists for that prompt, from the numbers it measured plus what the dataset
states (label, pixel size and the acquisition metadata the profile lists in
``teacher.acquisition_metadata``; never manifest bookkeeping such as ids, hashes or splits).
It never claims what it did not measure: a fact it cannot establish (``unmeasurable``, or a
scale without calibration) is said to be unknown.
Deterministic: the same image and prompt always give the same answer.
"""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from typing import Optional

import numpy as np

from maemi_core.data.image_io import load_gray_array
from maemi_core.teacher.measurements import MEASUREMENT_VERSION, measure_image
from maemi_core.teacher.requests import ImageRef, TeacherAnswer, TeacherRequest

# Part of the teacher's identity (and so of every cache key): bumped when the text changes for
# the same measurements. 2: recorded metadata is the acquisition metadata only. 3: facts
# `morphology` (fibre network or particles, with their size distributions) and `beads`.
TEXT_VERSION = "3"


def _fmt_len(px: float, pixel_size_nm: Optional[float]) -> str:
    if not pixel_size_nm:
        return f"{px:.0f} px"
    nm = px * pixel_size_nm
    return f"{nm / 1000:.2f} um" if nm >= 1000 else f"{nm:.0f} nm"


def _fmt_size(px: float, pixel_size_nm: Optional[float]) -> str:
    """A feature size: one decimal below 100 px (fibres a few pixels wide), else as _fmt_len."""
    return f"{px:.1f} px" if not pixel_size_nm and px < 100 else _fmt_len(px, pixel_size_nm)


def _fmt_range(lo: float, hi: float, pixel_size_nm: Optional[float]) -> str:
    """``lo-hi unit`` with the unit of the larger value."""
    if not pixel_size_nm:
        digits = 1 if hi < 100 else 0
        return f"{lo:.{digits}f}-{hi:.{digits}f} px"
    lo_nm, hi_nm = lo * pixel_size_nm, hi * pixel_size_nm
    if hi_nm >= 1000:
        return f"{lo_nm / 1000:.2f}-{hi_nm / 1000:.2f} um"
    return f"{lo_nm:.0f}-{hi_nm:.0f} nm"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.01 or x == 0 else f"{100 * x:.1f}%"


def _level(x: float, low: float, high: float, words=("low", "moderate", "high")) -> str:
    return words[0] if x < low else words[2] if x > high else words[1]


def fact_sentences(fact: str, m: dict, ref: ImageRef, subject: str, technique: str) -> str:
    """One or two sentences stating the measured (or known) values behind ``fact``."""
    ps = ref.pixel_size_nm
    if fact == "label":
        return f"The dataset labels this {subject} as '{ref.label}'." if ref.label else ""
    if fact == "technique":
        return f"The image was acquired by {technique}."
    if fact == "metadata":
        if not ref.metadata:
            return "The dataset records no further metadata for this image."
        return "Recorded metadata: " + ", ".join(f"{k} {v}" for k, v in ref.metadata) + "."
    if fact == "scale":
        s = m["scale"]
        if not s:
            return (f"The file carries no pixel-size calibration, so absolute sizes cannot be given; "
                    f"the image is {m['width_px']} x {m['height_px']} pixels.")
        return (f"One pixel is {s['pixel_size_nm']:g} nm, so the field of view is "
                f"{_fmt_len(m['width_px'], ps)} x {_fmt_len(m['height_px'], ps)}.")
    if fact == "intensity":
        i = m["intensity"]
        return (f"Mean brightness is {i['mean']:.2f} on a 0-1 scale with {_level(i['std'], 0.08, 0.2)} contrast "
                f"(standard deviation {i['std']:.2f}; 1st-99th percentile {i['p1']:.2f}-{i['p99']:.2f}).")
    if fact == "particles":
        p = m["particles"]
        if p["count"] == 0:
            return "Thresholding finds no separate bright features."
        return (f"Thresholding finds {p['count']} bright feature{'s' if p['count'] != 1 else ''} covering "
                f"{_pct(p['area_fraction'])} of the area, with median equivalent diameter "
                f"{_fmt_len(p['median_diameter_px'], ps)} (10th-90th percentile {_fmt_len(p['p10_diameter_px'], ps)}-"
                f"{_fmt_len(p['p90_diameter_px'], ps)}).")
    if fact == "porosity":
        p = m["porosity"]
        return (f"The darker phase covers {_pct(p['dark_fraction'])} of the area in {p['pore_count']} separate "
                f"region{'s' if p['pore_count'] != 1 else ''} (median diameter {_fmt_len(p['median_pore_diameter_px'], ps)}).")
    if fact == "orientation":
        o = m["orientation"]
        kind = _level(o["coherence"], 0.15, 0.45, ("largely isotropic", "partly aligned", "strongly aligned"))
        return (f"The structure is {kind} (orientation coherence {o['coherence']:.2f}), with dominant direction "
                f"about {o['dominant_angle_deg']:.0f} degrees from horizontal.")
    if fact == "edges":
        return f"Edges make up {_pct(m['edges']['edge_fraction'])} of the pixels ({_level(m['edges']['edge_fraction'], 0.03, 0.12)} edge density)."
    if fact == "texture":
        t = m["texture"]
        word = "smooth" if t["glcm_homogeneity"] > 0.8 else "rough" if t["glcm_homogeneity"] < 0.5 else "moderately textured"
        return (f"The surface texture measures as {word} (GLCM homogeneity {t['glcm_homogeneity']:.2f}, "
                f"contrast {t['glcm_contrast']:.2f}).")
    if fact == "uniformity":
        u = m["uniformity"]
        word = _level(u["heterogeneity"], 0.15, 0.4, ("fairly uniform", "moderately uneven", "strongly uneven"))
        return (f"Content is {word} across the field of view (tile heterogeneity score {u['heterogeneity']:.2f}); "
                f"the brightest region is {u['brightest_tile']} and the darkest {u['darkest_tile']}.")
    if fact == "phases":
        f = m["phases"]["fractions"]
        return (f"Splitting the grey levels into three classes gives dark / medium / bright fractions of "
                f"{_pct(f[0])} / {_pct(f[1])} / {_pct(f[2])}, so {m['phases']['n_major']} intensity "
                f"phase{'s' if m['phases']['n_major'] != 1 else ''} each cover at least 10% of the image.")
    if fact == "boundaries":
        b = m["boundaries"]
        return (f"{_pct(b['nonconvex_fraction'])} of the bright features are non-convex (solidity below 0.8), "
                f"which indicates touching or merged features; phase boundaries cross {_pct(b['boundary_density'])} "
                f"of horizontal pixel steps.")
    if fact == "dark_regions":
        d = m["dark_regions"]
        if d["count"] == 0:
            return "No region is markedly darker than the rest of the image."
        return (f"Regions markedly darker than the median brightness cover {_pct(d['fraction'])} of the image in "
                f"{d['count']} part{'s' if d['count'] != 1 else ''}; the largest ({_pct(d['largest_fraction'])} of the "
                f"area) lies at the {d['largest_location']}.")
    if fact == "line_features":
        lf = m["line_features"]
        if lf["count"] == 0:
            return "No straight line segments are detected."
        dirs = ", ".join(f"{n} {k}" for k, n in lf["directions"].items() if n)
        return (f"{lf['count']} straight line segments are detected ({dirs}), median length "
                f"{_fmt_len(lf['median_length_px'], ps)}.")
    if fact == "morphology":
        return _morphology_sentences(m, ps)
    if fact == "beads":
        return _bead_sentences(m, ps)
    if fact == "unmeasurable":
        return ("This cannot be established from the image alone; only the visible features described here "
                "can be reported.")
    raise ValueError(f"unknown fact {fact!r}")


def _coherence_words(c: float) -> str:
    # Random synthetic networks measure 0.0-0.35, fibres within +-10 degrees about 0.9.
    return "randomly oriented" if c < 0.35 else "partly aligned" if c < 0.65 else "strongly aligned"


def _morphology_sentences(m: dict, ps: Optional[float]) -> str:
    """What the bright phase is (fibre network, particles, both, a continuous layer or nothing)
    and the size distribution that goes with it."""
    mo = m["morphology"]
    kind = mo["kind"]
    if kind == "none":
        return "No bright phase separates from the background, so neither fibres nor particles can be measured."
    if kind == "continuous":
        return (f"The bright phase covers {_pct(mo['coverage'])} of the image as a nearly continuous layer, "
                f"so it holds neither separate fibres nor separate particles.")
    f = m["fibres"]
    d = f["diameter_px"]
    if kind == "fibres":
        o = f["coherence"]
        direction = (f", dominant direction about {f['dominant_angle_deg']:.0f} degrees from horizontal"
                     if o >= 0.35 else "")
        return (f"The bright phase forms a fibre network covering {_pct(f['coverage'])} of the area "
                f"({_pct(f['porosity'])} open space between fibres), with median fibre diameter "
                f"{_fmt_size(d['median'], ps)} (interquartile range {_fmt_range(d['q1'], d['q3'], ps)}). "
                f"The fibres are {_coherence_words(o)} (orientation coherence {o:.2f}{direction}).")
    p = m["particle_sizes"]
    pd = p["diameter_px"]
    if kind == "particles":
        return (f"The bright phase consists of compact particles: a watershed on the distance map separates "
                f"{p['count']} particle{'s' if p['count'] != 1 else ''} covering {_pct(f['coverage'])} of the area, "
                f"with median equivalent diameter {_fmt_size(pd['median'], ps)} (interquartile range "
                f"{_fmt_range(pd['q1'], pd['q3'], ps)}, 10th-90th percentile {_fmt_range(pd['p10'], pd['p90'], ps)}) "
                f"and median aspect ratio {p['aspect_ratio']:.1f}; {_pct(p['touching_fraction'])} of them touch "
                f"a neighbour.")
    return (f"The bright phase covers {_pct(f['coverage'])} of the area and mixes elongated and compact objects "
            f"({_pct(mo['fibre_like_fraction'])} of it lies in fibre-like objects). The elongated parts have median "
            f"width {_fmt_size(d['median'], ps)} (interquartile range {_fmt_range(d['q1'], d['q3'], ps)}); a "
            f"watershed on the distance map separates {p['count']} piece{'s' if p['count'] != 1 else ''} of median "
            f"equivalent diameter {_fmt_size(pd['median'], ps)} (interquartile range "
            f"{_fmt_range(pd['q1'], pd['q3'], ps)}).")


def _fmt_rate(x: float) -> str:
    return f"{x:.2g}" if x < 100 else f"{x:.0f}"


def _bead_sentences(m: dict, ps: Optional[float]) -> str:
    """Beads (local swellings) on a fibre network; nothing for other morphologies."""
    if m["morphology"]["kind"] not in ("fibres", "mixed"):
        return ""
    f = m["fibres"]
    n = f["bead_count"]
    what = "swellings more than twice the median fibre diameter"
    if n == 0:
        return f"No beads ({what}) are found on the fibres."
    if ps and f.get("beads_per_100um") is not None:
        density = f"{_fmt_rate(f['beads_per_100um'])} per 100 um of fibre length"
    else:
        density = f"{_fmt_rate(f['beads_per_1000px'])} per 1000 px of fibre length"
    return (f"{n} bead{'s' if n != 1 else ''} ({what}) sit{'s' if n == 1 else ''} on the fibres, "
            f"{density}, with median bead diameter {_fmt_size(f['bead_diameter_px']['median'], ps)}.")


class MeasurementTeacher:
    """Teacher protocol implementation that answers from measurements."""

    name = "measurement"

    def __init__(self, cache_size: int = 4096):
        self._measured: dict[tuple, dict] = {}
        self._inflight: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()
        self._cache_size = cache_size

    def identity(self) -> dict:
        return {"teacher": self.name, "version": MEASUREMENT_VERSION, "text_version": TEXT_VERSION}

    def measure(self, ref: ImageRef, gray: Optional[np.ndarray] = None) -> dict:
        key = (ref.image_id, ref.crop_bottom, ref.pixel_size_nm)
        with self._lock:
            if key in self._measured:
                return self._measured[key]
            # One measurement per image even when several workers ask about it at once (its
            # caption, VQA and classification records are planned next to each other).
            inflight = self._inflight.setdefault(key, threading.Lock())
        with inflight:
            with self._lock:
                if key in self._measured:
                    return self._measured[key]
            m = self._measure(ref, gray)
            with self._lock:
                if len(self._measured) >= self._cache_size:
                    self._measured.pop(next(iter(self._measured)))
                self._measured[key] = m
                self._inflight.pop(key, None)
            return m

    def _measure(self, ref: ImageRef, gray: Optional[np.ndarray]) -> dict:
        if gray is None:
            gray = load_gray_array(ref.path)
            if ref.crop_bottom:
                gray = gray[: gray.shape[0] - ref.crop_bottom]
        return measure_image(gray, ref.pixel_size_nm)

    def answer(self, request: TeacherRequest, grays: Optional[list[np.ndarray]] = None) -> TeacherAnswer:
        ms = [self.measure(ref, None if grays is None else grays[i]) for i, ref in enumerate(request.images)]
        text = compose_answer(request, ms)
        return TeacherAnswer(text=text, prompt_tokens=0, completion_tokens=len(text.split()))


def _describe(facts: list[str], m: dict, ref: ImageRef, req: TeacherRequest) -> str:
    if "morphology" in facts and m["morphology"]["kind"] == "fibres":
        # The morphology sentence states the fibres' own orientation; the whole-image value would
        # be a second, different coherence in the same answer.
        facts = [f for f in facts if f != "orientation"]
    return " ".join(s for f in facts if (s := fact_sentences(f, m, ref, req.subject, req.technique)))


_COMPARABLE = {  # (name, getter) of scalar measurements used to contrast images in a group
    "brightness": lambda m: m["intensity"]["mean"],
    "contrast": lambda m: m["intensity"]["std"],
    "bright-feature coverage": lambda m: m["particles"]["area_fraction"],
    "edge density": lambda m: m["edges"]["edge_fraction"],
    "dark-area fraction": lambda m: m["dark_regions"]["fraction"],
    "texture homogeneity": lambda m: m["texture"]["glcm_homogeneity"],
    "spatial heterogeneity": lambda m: m["uniformity"]["heterogeneity"],
    "orientation coherence": lambda m: m["orientation"]["coherence"],
}


def _spread(ms: list[dict]) -> list[tuple[float, str, list[float]]]:
    rows = []
    for name, get in _COMPARABLE.items():
        vals = [float(get(m)) for m in ms]
        rel = (max(vals) - min(vals)) / (abs(np.mean(vals)) + 1e-6)
        rows.append((rel, name, vals))
    return sorted(rows, reverse=True)


def _values(vals: list[float]) -> str:
    return ", ".join(f"image {i + 1}: {v:.2f}" for i, v in enumerate(vals))


def _first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (not one inside a number like 0.33)."""
    m = re.search(r"(?<!\d)\.(?=\s|$)|\.(?=\s+[A-Z])", text)
    return text[: m.end()].strip() if m else text.strip()


def compose_answer(req: TeacherRequest, ms: list[dict]) -> str:
    """The answer text for ``req`` given the measurements of its images (in order). A concise
    answer (paper A.7) is the category alone for classification, else the first sentence of the
    detailed answer: the same finding, without the supporting measurements."""
    if req.length == "concise":
        if req.task in ("classify_zero_shot", "classify_few_shot"):
            return f"{req.query_label or req.images[-1].label}."
        return _first_sentence(compose_answer(replace(req, length="detailed"), ms))
    n = len(req.images)
    if req.task in ("caption", "vqa"):
        return _describe(req.facts, ms[0], req.images[0], req)
    if req.task in ("classify_zero_shot", "classify_few_shot"):
        query = req.images[-1]
        label = req.query_label or query.label
        facts = [f for f in req.facts if f != "label"] or ["intensity", "dark_regions"]
        reason = _describe(facts, ms[-1], query, req)
        lead = f"{label}."
        if req.task == "classify_few_shot" and n > 1:
            same = [i + 1 for i, ref in enumerate(req.images[:-1]) if ref.label == label]
            lead += (f" It matches the category of demonstration image{'s' if len(same) > 1 else ''} "
                     f"{', '.join(map(str, same))}." if same else " None of the demonstrations share its category.")
        return f"{lead} {reason}".strip()
    spread = _spread(ms)
    if req.task == "intra_dissimilar":
        (_, d1, v1), (_, d2, v2) = spread[0], spread[1]
        shared = spread[-1]
        return (f"All {n} images are labelled '{req.images[0].label}'. They are most alike in {shared[1]} "
                f"({_values(shared[2])}) and differ most in {d1} ({_values(v1)}) and {d2} ({_values(v2)}). "
                + " ".join(f"Image {i + 1}: {_describe([f for f in req.facts if f != 'label'][:2] or ['intensity'], m, ref, req)}"
                           for i, (m, ref) in enumerate(zip(ms, req.images))))
    if req.task == "inter_similar":
        labels = [ref.label for ref in req.images]
        (_, d1, v1), (_, d2, v2) = spread[0], spread[1]
        shared = spread[-1]
        return (f"The images are labelled {', '.join(repr(l) for l in labels)} in order. They look alike in "
                f"{shared[1]} ({_values(shared[2])}). The measurements that separate them most are {d1} "
                f"({_values(v1)}) and {d2} ({_values(v2)}).")
    if req.task == "heterogeneity":
        parts = []
        for i, (m, ref) in enumerate(zip(ms, req.images)):
            u = m["uniformity"]
            parts.append(f"Image {i + 1} has tile heterogeneity {u['heterogeneity']:.2f}, brightest at the "
                         f"{u['brightest_tile']} and darkest at the {u['darkest_tile']}.")
        order = np.argsort([-m["uniformity"]["heterogeneity"] for m in ms])
        return (f"All {n} images are labelled '{req.images[0].label}'. " + " ".join(parts)
                + f" Image {order[0] + 1} is the most uneven and image {order[-1] + 1} the most uniform.")
    raise ValueError(f"unknown task {req.task!r}")
