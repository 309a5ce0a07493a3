"""Teachers and the instruction set: packs, the measurement teacher, the cache, privacy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from maemi_core.teacher.instruction_set import generate_instruction_set, plan_records, validate_records
from maemi_core.teacher.measurement_teacher import MeasurementTeacher
from maemi_core.teacher.openai_teacher import TeacherFailed, is_refusal
from maemi_core.teacher.privacy import PrivacyError, check_teacher_privacy, is_on_prem
from maemi_core.teacher.prompt_pack import FACTS, load_prompt_pack
from maemi_core.teacher.requests import ImageRef, TeacherRequest, parse_teacher_prompt, render_teacher_prompt
from tests.teacher_fixtures import copy_pack, teacher_project

SEM_FAMILIES = ["Basics", "Morphology and Structure", "Size and Distribution", "Surface Characteristics",
                "Composition and Elements", "Interactions and Boundaries", "External Environment",
                "Image Technique and Modifications", "Functional Features", "Context and Application"]


@pytest.mark.parametrize("name", ["sem", "defects", "elpv"])
def test_shipped_packs_are_valid(name):
    pack = load_prompt_pack(name)
    assert pack.name == name and pack.version
    assert all(f in FACTS for _, q in pack.questions() for f in q.facts)
    assert "{categories}" not in pack.classify_zero_shot.render(categories="a, b")


def test_sem_pack_has_the_papers_ten_families():
    pack = load_prompt_pack("sem")
    assert [f.family for f in pack.vqa] == SEM_FAMILIES
    assert pack.questions()[0][1].text == "What type of nanomaterial is depicted in the image?"


def test_bad_pack_is_refused_with_a_pointer_to_the_format(tmp_path):
    from maemi_core.config import ConfigError

    path = copy_pack("elpv", tmp_path / "site.yaml")
    data = yaml.safe_load(path.read_text())
    data["vqa"][0]["questions"][0]["facts"] = ["telepathy"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="telepathy"):
        load_prompt_pack(str(path))
    with pytest.raises(ConfigError, match="README"):
        load_prompt_pack("no-such-pack")


def test_teacher_prompt_round_trips():
    refs = [ImageRef("a", "/x.png", "defective", 0, 2.5, (("cell type", "mono"),)),
            ImageRef("b", "/y.png", None, 0, None, ())]
    req = TeacherRequest("classify_few_shot", "Which category?", refs, ["label", "dark_regions"], "sys", "EL imaging",
                         "solar cell", query_label="functional", categories=["defective", "functional"])
    p = parse_teacher_prompt(render_teacher_prompt(req))
    assert (p.task, p.question, p.subject, p.technique) == ("classify_few_shot", "Which category?", "solar cell", "EL imaging")
    assert p.labels == ["defective", None] and p.pixel_sizes == [2.5, None]
    assert p.metadata == [{"cell type": "mono"}, {}]
    assert p.facts == ["label", "dark_regions"] and p.query_label == "functional"
    assert p.categories == ["defective", "functional"]


def test_measurement_teacher_is_grounded_and_deterministic(elpv_paths):
    pack = load_prompt_pack("sem")
    ref = ImageRef("x", str(elpv_paths[0]), "particles")
    scale_q = next(q for _, q in pack.questions() if q.id.endswith("scale"))
    t = MeasurementTeacher()
    req = TeacherRequest("vqa", scale_q.text, [ref], ["scale", "particles"], pack.system, pack.technique, pack.subject)
    a1 = t.answer(req).text
    assert a1 == MeasurementTeacher().answer(req).text
    assert "no pixel-size calibration" in a1 and " nm" not in a1   # never claims a scale it does not have
    calibrated = ImageRef("y", str(elpv_paths[0]), "particles", pixel_size_nm=2.0)
    a2 = t.answer(TeacherRequest("vqa", scale_q.text, [calibrated], ["scale"], "", pack.technique, pack.subject)).text
    assert "One pixel is 2 nm" in a2 and "600 nm x 600 nm" in a2
    env = t.answer(TeacherRequest("vqa", "Is it in a solvent?", [ref], ["unmeasurable"], "", "", "")).text
    assert "cannot be established from the image alone" in env


def test_measurements_see_what_is_in_the_image():
    from maemi_core.teacher.measurements import measure_image

    g = np.full((200, 200), 0.2)
    yy, xx = np.mgrid[:200, :200]
    for cy, cx in [(40, 40), (40, 150), (150, 60), (150, 150), (100, 100)]:
        g[(yy - cy) ** 2 + (xx - cx) ** 2 < 12 ** 2] = 0.9          # five bright discs, diameter ~24 px
    m = measure_image(g, pixel_size_nm=10.0)
    assert m["particles"]["count"] == 5
    assert 21 < m["particles"]["median_diameter_px"] < 27
    lines = np.full((200, 200), 0.8)
    lines[::40, :] = 0.1                                              # horizontal dark lines
    ml = measure_image(lines)
    assert ml["line_features"]["directions"]["horizontal"] > 0 and ml["line_features"]["directions"]["vertical"] == 0


def test_plan_covers_tasks_without_leaking_the_query_label(tmp_path):
    cfg, manifest, few_shot, groups = teacher_project(tmp_path)
    plan = plan_records(cfg, manifest, few_shot, groups, load_prompt_pack("elpv"))
    tasks = {p.task for p in plan}
    assert tasks == {"caption", "vqa", "classify_zero_shot", "classify_few_shot", "intra_dissimilar",
                     "inter_similar", "heterogeneity"}
    for p in plan:
        if p.task.startswith("classify"):
            assert p.request.images[-1].label is None and p.request.query_label == p.label
            # The query is the last image followed only by the question and the answer length: no label after it.
            assert p.student_prompt.rsplit("\n", 1)[0].endswith("<image>\n" + p.request.question)
            assert p.student_prompt.endswith(("Answer in detail.", "Answer with the category name only."))
        assert p.student_prompt.count("<image>") == len(p.request.images)
        assert "Known from the dataset" not in p.student_prompt
    fs = [p for p in plan if p.task == "classify_few_shot"]
    train_ids = set(manifest.loc[manifest["split"] == "train", "image_id"])
    assert all({r.image_id for r in p.request.images[:-1]} <= train_ids for p in fs)
    assert len({p.id for p in plan}) == len(plan)
    # Paper A.7: a concise and a detailed answer to the same question, the teacher told which.
    concise = {p.id.removesuffix("-concise"): p for p in plan if p.length == "concise"}
    detailed = {p.id: p for p in plan if p.length == "detailed"}
    assert concise and concise.keys() == detailed.keys()
    assert {p.task for p in concise.values()} == {"caption", "vqa", "classify_zero_shot", "classify_few_shot"}
    for pid, c in concise.items():
        assert c.request.question == detailed[pid].request.question and c.request.length == "concise"
        assert render_teacher_prompt(c.request) != render_teacher_prompt(detailed[pid].request)
        assert parse_teacher_prompt(render_teacher_prompt(c.request)).length == "concise"
    teacher = MeasurementTeacher()
    zs = next(c for c in concise.values() if c.task == "classify_zero_shot")
    assert teacher.answer(zs.request).text == f"{zs.label}."
    cap = next(c for c in concise.values() if c.task == "caption")
    short, long = teacher.answer(cap.request).text, teacher.answer(detailed[cap.id.removesuffix("-concise")].request).text
    assert long.startswith(short) and len(short) < len(long) and short.endswith(".")


def test_cache_makes_the_second_run_free_and_prompt_changes_regenerate_only_them(tmp_path):
    pack = copy_pack("elpv", tmp_path / "site_pack.yaml")
    cfg, manifest, few_shot, groups = teacher_project(tmp_path, tasks=["caption", "vqa"], prompt_pack=str(pack))
    first = generate_instruction_set(cfg, manifest, few_shot, groups)
    assert first.teacher_calls == len(first.records) > 0 and first.cache_hits == 0
    assert not validate_records(first.records)

    second = generate_instruction_set(cfg, manifest, few_shot, groups)
    assert second.teacher_calls == 0 and second.cache_hits == len(first.records)
    assert [r["conversations"] for r in second.records] == [r["conversations"] for r in first.records]

    data = yaml.safe_load(pack.read_text())
    data["caption"]["prompts"] = [p + " Be brief." for p in data["caption"]["prompts"]]
    data["version"] = "1.0.1"
    pack.write_text(yaml.safe_dump(data))
    third = generate_instruction_set(cfg, manifest, few_shot, groups)
    n_caption = sum(r["task"] == "caption" for r in first.records)
    assert third.teacher_calls == n_caption and third.cache_hits == len(first.records) - n_caption
    assert {r["provenance"]["prompt_pack_version"] for r in third.records} == {"1.0.1"}


class FlakyTeacher(MeasurementTeacher):
    """Fails every third request, as an overloaded endpoint would."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def answer(self, request, grays=None):
        self.calls += 1
        if self.calls % 3 == 0:
            raise TeacherFailed("HTTP 503 after 7 attempts", attempts=7)
        return super().answer(request, grays)


def test_failures_are_recorded_and_resumed_not_lost(tmp_path):
    cfg, manifest, few_shot, groups = teacher_project(tmp_path, tasks=["caption", "vqa"], teacher={"concurrency": 1})
    flaky = generate_instruction_set(cfg, manifest, few_shot, groups, teacher=FlakyTeacher())
    assert flaky.failed and flaky.records
    planned = len(flaky.records) + len(flaky.failed)
    failed_lines = (cfg.workdir_path / "instructions" / "failed.jsonl").read_text().splitlines()
    assert len(failed_lines) == len(flaky.failed) and "503" in json.loads(failed_lines[0])["error"]

    resumed = generate_instruction_set(cfg, manifest, few_shot, groups)  # a healthy teacher, same identity
    assert resumed.teacher_calls == len(flaky.failed) and resumed.cache_hits == len(flaky.records)
    assert len(resumed.records) == planned and not resumed.failed
    assert len({r["id"] for r in resumed.records}) == planned


def test_private_data_never_goes_to_an_external_teacher(tmp_path, monkeypatch):
    import openai

    def no_client(*a, **k):
        raise AssertionError("a client was created for a refused teacher")

    monkeypatch.setattr(openai, "OpenAI", no_client)
    cfg, manifest, few_shot, groups = teacher_project(
        tmp_path, teacher={"kind": "openai", "base_url": "https://api.openai.com/v1", "model": "gpt-4o"},
        tasks=["caption"])
    with pytest.raises(PrivacyError, match="allow_external_teacher: true"):
        generate_instruction_set(cfg, manifest, few_shot, groups)
    assert not (cfg.workdir_path / "instructions" / "instructions.jsonl").exists()

    assert is_on_prem("http://127.0.0.1:8000/v1") and is_on_prem("http://localhost:11434/v1")
    assert is_on_prem("http://gpu-box.fab.internal/v1", ["gpu-box.fab.internal"])
    assert not is_on_prem("https://api.openai.com/v1")
    cfg.teacher.allow_external_teacher = True
    check_teacher_privacy(cfg)  # explicitly allowed: no error
    cfg.teacher.allow_external_teacher = False
    cfg.dataset.private = False
    check_teacher_privacy(cfg)  # public data may go out


def test_refusals_are_detected():
    assert is_refusal("") and is_refusal("   ") and is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot assist with this request.")
    assert not is_refusal("The cell shows a dark crack across the top left.")


def test_workers_asking_about_one_image_at_once_measure_it_once(monkeypatch):
    import threading
    import time

    import maemi_core.teacher.measurement_teacher as mt

    calls = []

    def slow_measure(gray, pixel_size_nm=None):
        calls.append(1)
        time.sleep(0.2)
        return {"n": len(calls)}

    monkeypatch.setattr(mt, "measure_image", slow_measure)
    teacher = mt.MeasurementTeacher()
    ref = ImageRef(image_id="a" * 64, path="unused")
    gray = np.zeros((8, 8))
    got = []
    threads = [threading.Thread(target=lambda: got.append(teacher.measure(ref, gray))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 4 and all(g is got[0] for g in got)
