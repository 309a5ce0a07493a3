"""Fibre and particle morphology measured on drawn images of known geometry, the teacher text
that states it, and the nanofibre profile (whose data is never in CI)."""

from __future__ import annotations

import re
from functools import cache

import numpy as np
import pytest
from skimage import draw, filters

from maemi_core.config import ConfigError, load_config
from maemi_core.teacher.measurement_teacher import MeasurementTeacher
from maemi_core.teacher.measurements import measure_morphology
from maemi_core.teacher.prompt_pack import load_prompt_pack
from maemi_core.teacher.requests import ImageRef, TeacherRequest
from tests.conftest import REPO

SIZE = 512
BACKGROUND, FIBRE = 0.2, 0.75


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Optics and detector: a Gaussian blur of 1 px and white noise."""
    return np.clip(filters.gaussian(img, 1.0) + rng.normal(0, noise, img.shape), 0, 1)


def _fibre_lines(width: float, n: int, rng: np.random.Generator, angle: float | None, spread: float):
    """Straight fibres of exactly ``width`` px (filled rectangles) across a SIZE x SIZE canvas;
    random directions, or within ``spread`` radians of ``angle``."""
    img = np.full((SIZE, SIZE), BACKGROUND)
    lines = []
    for _ in range(n):
        theta = (angle if angle is not None else 0.0) + rng.uniform(-spread / 2, spread / 2)
        centre = rng.uniform(0, SIZE, 2)
        d = np.array([np.sin(theta), np.cos(theta)])            # (row, col) direction
        normal = np.array([d[1], -d[0]]) * width / 2
        p0, p1 = centre - d * 1.5 * SIZE, centre + d * 1.5 * SIZE
        poly = np.array([p0 + normal, p1 + normal, p1 - normal, p0 - normal])
        rr, cc = draw.polygon(poly[:, 0], poly[:, 1], img.shape)
        img[rr, cc] = FIBRE
        lines.append((centre, d))
    return img, lines


@cache
def fibres(width: float, beads: int = 0, n: int = 10, seed: int = 0, angle: float | None = None,
           spread: float = np.pi, noise: float = 0.05) -> np.ndarray:
    """A fibre network with ``beads`` discs of 3.2 fibre widths' diameter on fibres, away from
    crossings, each other and the edges."""
    rng = np.random.default_rng(seed)
    img, lines = _fibre_lines(width, n, rng, angle, spread)
    radius = 1.6 * width
    centres: list[np.ndarray] = []
    for _ in range(20000):
        if len(centres) == beads:
            break
        k = rng.integers(n)
        c, d = lines[k]
        p = c + d * rng.uniform(-SIZE, SIZE)
        inside = (p > 2 * radius).all() and (p < SIZE - 2 * radius).all()
        clear = all(abs(d2[0] * (p - c2)[1] - d2[1] * (p - c2)[0]) > radius + 2 * width
                    for j, (c2, d2) in enumerate(lines) if j != k)
        if inside and clear and all(np.hypot(*(p - q)) > 4 * radius for q in centres):
            centres.append(p)
    assert len(centres) == beads, "could not place the beads"
    for p in centres:
        rr, cc = draw.disk(tuple(p), radius, shape=img.shape)
        img[rr, cc] = FIBRE
    return _finish(img, rng, noise)


@cache
def particles(radius: float, n: int = 25, seed: int = 0) -> np.ndarray:
    """``n`` discs of ``radius`` px, some of them touching (centres down to 1.7 radii apart)."""
    rng = np.random.default_rng(seed)
    img = np.full((SIZE, SIZE), BACKGROUND)
    centres: list[np.ndarray] = []
    while len(centres) < n:
        c = rng.uniform(radius + 2, SIZE - radius - 2, 2)
        if all(np.hypot(*(c - q)) > 1.7 * radius for q in centres):
            centres.append(c)
    for c in centres:
        rr, cc = draw.disk(tuple(c), radius, shape=img.shape)
        img[rr, cc] = FIBRE
    return _finish(img, rng, 0.05)


# --- fibres -------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [6, 10, 16])
@pytest.mark.parametrize("noise", [0.05, 0.15])
def test_median_fibre_diameter_is_the_drawn_width(width, noise):
    m = measure_morphology(fibres(width, n=10 if width < 16 else 7, seed=width, noise=noise))
    assert m["morphology"]["kind"] == "fibres"
    d = m["fibres"]["diameter_px"]
    assert abs(d["median"] - width) <= 0.1 * width, d
    assert d["q1"] <= d["median"] <= d["q3"] and d["q3"] - d["q1"] <= 0.25 * width   # one width: a narrow spread
    assert m["fibres"]["bead_count"] == 0
    # coverage of straight fibres: width x centreline length / area (crossings counted once)
    assert 0.05 < m["fibres"]["coverage"] < 0.5 and m["fibres"]["porosity"] == pytest.approx(1 - m["fibres"]["coverage"])


def test_diameters_in_nm_with_a_pixel_size():
    m = measure_morphology(fibres(10, seed=10), pixel_size_nm=20.0)
    assert m["fibres"]["diameter_nm"]["median"] == pytest.approx(20.0 * m["fibres"]["diameter_px"]["median"])
    assert abs(m["fibres"]["diameter_nm"]["median"] - 200) <= 20
    assert m["fibres"]["beads_per_100um"] is not None


@pytest.mark.parametrize("width", [6, 10])
@pytest.mark.parametrize("beads", [1, 2, 4])
def test_beads_are_counted(width, beads):
    m = measure_morphology(fibres(width, beads=beads, seed=beads))
    f = m["fibres"]
    assert abs(f["bead_count"] - beads) <= 1, f["bead_count"]
    assert abs(f["bead_diameter_px"]["median"] - 3.2 * width) <= 0.2 * 3.2 * width
    assert f["beads_per_1000px"] == pytest.approx(1000 * f["bead_count"] / f["length_px"])


def test_aligned_fibres_are_coherent_and_random_ones_are_not():
    aligned = [measure_morphology(fibres(8, n=20, seed=s, angle=0.5, spread=0.35))["fibres"] for s in range(3)]
    random = [measure_morphology(fibres(8, n=20, seed=s))["fibres"] for s in range(3)]
    assert min(f["coherence"] for f in aligned) > 0.8
    assert max(f["coherence"] for f in random) < 0.4
    # direction of the fibres: 0.5 rad = 29 degrees from the horizontal, in the row-down convention
    # of the whole-image orientation measurement
    assert all(abs(f["dominant_angle_deg"] - np.degrees(0.5)) < 5 for f in aligned)


# --- particles ----------------------------------------------------------------------------------

@pytest.mark.parametrize("radius", [6, 12])
def test_particles_get_a_size_distribution_and_fibres_do_not(radius):
    m = measure_morphology(particles(radius, seed=radius))
    assert m["morphology"]["kind"] == "particles"
    p = m["particle_sizes"]
    assert abs(p["count"] - 25) <= 1                   # touching discs are split by the watershed
    assert abs(p["diameter_px"]["median"] - 2 * radius) <= 0.1 * 2 * radius
    assert p["diameter_px"]["q3"] - p["diameter_px"]["q1"] <= 0.15 * 2 * radius
    assert p["aspect_ratio"] < 1.2 and p["touching_fraction"] > 0
    assert measure_morphology(fibres(10, seed=10))["particle_sizes"] is None


def test_blank_and_flat_images_are_neither():
    assert measure_morphology(np.full((128, 128), 0.5))["morphology"]["kind"] == "none"
    assert measure_morphology(np.zeros((128, 128)))["morphology"]["kind"] == "none"


# --- the teacher --------------------------------------------------------------------------------

def _answer(task: str, facts: list[str], img: np.ndarray, pixel_size_nm=None, question: str = "Describe it.") -> str:
    pack = load_prompt_pack("sem")
    ref = ImageRef("synthetic", "/not/read", "fibres", pixel_size_nm=pixel_size_nm)
    req = TeacherRequest(task, question, [ref], facts, pack.system, pack.technique, pack.subject)
    return MeasurementTeacher().answer(req, grays=[img]).text


def test_the_sem_caption_states_fibre_diameter_and_beads():
    facts = load_prompt_pack("sem").caption.facts
    assert {"morphology", "beads"} <= set(facts)
    text = _answer("caption", facts, fibres(10, beads=2, seed=2))
    m = re.search(r"median fibre diameter (\d+(?:\.\d+)?) px \(interquartile range", text)
    assert m and abs(float(m.group(1)) - 10) <= 1, text
    assert re.search(r"\b[1-3] beads? \(swellings", text), text
    assert "fibre network covering" in text and "open space" in text
    # the fibres' orientation is stated once, by the morphology sentence
    assert text.count("orientation coherence") == 1, text

    nm = _answer("caption", facts, fibres(10, beads=2, seed=2), pixel_size_nm=20.0)
    m = re.search(r"median fibre diameter (\d+) nm", nm)
    assert m and abs(int(m.group(1)) - 200) <= 20, nm
    assert "per 100 um of fibre length" in nm


def test_sem_questions_about_size_and_defects_state_the_measurements():
    pack = load_prompt_pack("sem")
    q = {q.id: q for _, q in pack.questions()}
    size = _answer("vqa", q["size_distribution.size"].facts, particles(12, seed=12))
    m = re.search(r"median equivalent diameter (\d+(?:\.\d+)?) px", size)
    assert "compact particles" in size and m and abs(float(m.group(1)) - 24) <= 2.4, size
    defects = _answer("vqa", q["surface_characteristics.defects"].facts, fibres(6, beads=1, seed=1))
    assert "1 bead (swellings" in defects, defects
    assert "bead" not in _answer("vqa", ["beads", "porosity"], particles(12, seed=12))


def test_old_facts_are_unchanged_for_other_packs():
    # `particles` (thresholded bright features) still answers as before, beside the new facts
    text = _answer("vqa", ["particles", "orientation"], fibres(10, seed=10))
    assert text.startswith("Thresholding finds") and "The structure is" in text
    assert MeasurementTeacher().identity()["text_version"] == "3"


# --- the profile --------------------------------------------------------------------------------

def test_nanofiber_profile_loads_with_its_data_folders(tmp_path, monkeypatch):
    train, test = tmp_path / "train", tmp_path / "test"
    for root in (train, test):
        (root / "Defective").mkdir(parents=True)
    monkeypatch.setenv("MAEMI_NANOFIBER_ROOT", str(train))
    monkeypatch.setenv("MAEMI_NANOFIBER_TEST_ROOT", str(test))
    cfg = load_config(REPO / "configs" / "nanofiber.yaml")
    assert cfg.resolve(cfg.dataset.root) == train and cfg.resolve(cfg.dataset.test_root) == test
    assert (cfg.dataset.kind, cfg.dataset.prompt_pack, cfg.dataset.crop_databar) == ("imagefolder", "sem", False)
    assert cfg.model.train_budget.unit == "tokens"
    load_prompt_pack(cfg.dataset.prompt_pack)

    from maemi_core.data.sample_groups import sample_names
    names = sample_names(["Defective/translated_ppc9_011 (4)_22.png", "NonDefective/translated_pancnt2_01_40.png",
                          "SlightlyDefective/translated_PPC6-03_1.png", "Defective/translated_PPC9-_13.png",
                          "Defective/unrelated.png"], cfg.dataset.group_by)
    assert names == ["ppc9_011 (4)", "pancnt2_01", "PPC6-03", "PPC9-", None]


@pytest.mark.parametrize("missing", ["MAEMI_NANOFIBER_ROOT", "MAEMI_NANOFIBER_TEST_ROOT"])
def test_nanofiber_profile_says_how_to_get_the_data(tmp_path, monkeypatch, missing):
    monkeypatch.setenv("MAEMI_NANOFIBER_ROOT", str(tmp_path))
    monkeypatch.setenv("MAEMI_NANOFIBER_TEST_ROOT", str(tmp_path))
    monkeypatch.delenv(missing)
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "nanofiber.yaml")
    message = str(err.value)
    assert f"{missing} is not set" in message
    assert "cagriyardimci/Nanofiber_SEM_Dataset" in message or "docs/nanofiber.md" in message
    assert "<class>/<file>.png" in message


# --- the benchmark reads the numbers back -------------------------------------------------------

def test_the_benchmark_counts_an_answer_as_right_only_when_it_states_the_measured_number():
    import pandas as pd

    from maemi_core.evaluation.measurement_agreement import agreement_table, stated

    facts = load_prompt_pack("sem").caption.facts
    ref = _answer("caption", facts, fibres(10, beads=2, seed=2))
    d, unit = stated(ref, "fibre_diameter")
    assert unit == "px" and abs(d - 10) <= 1
    in_nm = _answer("caption", facts, fibres(10, beads=2, seed=2), pixel_size_nm=20.0)
    assert stated(in_nm, "fibre_diameter")[1] == "nm"
    assert stated("0.25 um wide: median fibre diameter 0.25 um", "fibre_diameter") == (250.0, "nm")
    assert stated("No beads (swellings) are found.", "bead_count") == (0.0, "")
    assert stated(float("nan"), "bead_count") is None          # an empty answer read back from CSV

    answers = {
        "copy": ref,                                                            # every number right
        "close": ref.replace(f"median fibre diameter {d:.1f} px", f"median fibre diameter {d * 1.15:.1f} px"),
        "far": ref.replace(f"median fibre diameter {d:.1f} px", f"median fibre diameter {d * 1.5:.1f} px"),
        "wrong_unit": ref.replace(f"median fibre diameter {d:.1f} px", f"median fibre diameter {d:.1f} nm"),
        "silent": "A fibre network of thin random fibres.",                     # states nothing
    }
    samples = pd.DataFrame([{"method": m, "record_id": "r1", "reference": ref, "answer": a}
                            for m, a in answers.items()])
    unrelated = pd.DataFrame([{"method": "copy", "record_id": "r2", "reference": "Cracks are visible.",
                               "answer": "Cracks are visible."}])
    table, per_record = agreement_table({"captioning": samples, "vqa": unrelated})
    assert set(table["table"]) == {"captioning"}            # a reference without numbers asks for none
    dia = table[table["quantity"] == "fibre_diameter"].set_index("method")
    assert dia["within_tolerance"].to_dict() == {"close": 1.0, "copy": 1.0, "far": 0.0, "silent": 0.0,
                                                 "wrong_unit": 0.0}
    assert dia.loc["silent", "stated"] == 0.0 and dia.loc["far", "stated"] == 1.0
    assert abs(dia.loc["far", "median_relative_error"] - 0.5) < 0.02
    copy = table[table["method"] == "copy"].set_index("quantity")
    assert {"fibre_diameter", "fibre_coverage", "bead_count", "bead_diameter", "orientation_coherence"} <= set(copy.index)
    assert (copy["within_tolerance"] == 1.0).all()
    assert len(per_record) == len(table)                    # one record per method and quantity here
