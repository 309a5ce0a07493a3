"""OpenAITeacher over real HTTP against `maemi teacher-serve` on a free loopback port."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import openai
import pytest

from maemi_core.teacher.instruction_set import generate_instruction_set, validate_records
from maemi_core.teacher.openai_teacher import OpenAITeacher
from tests.teacher_fixtures import teacher_project

MAEMI = str(Path(sys.executable).parent / "maemi")


@contextmanager
def teacher_server(*args: str):
    proc = subprocess.Popen([MAEMI, "teacher-serve", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        assert m, f"server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield m.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # never leave a server behind
            proc.kill()
            proc.wait(timeout=10)


def stats(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=5) as r:
        return json.loads(r.read())


def test_models_endpoint_and_plain_client():
    with teacher_server("--model", "fab-teacher") as url:
        client = openai.OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in client.models.list().data] == ["fab-teacher"]


def test_instruction_set_through_http_with_multi_image_requests(tmp_path):
    with teacher_server() as url:
        cfg, manifest, few_shot, groups = teacher_project(
            tmp_path, teacher={"kind": "openai", "base_url": url, "model": "maemi-measurement-teacher",
                               "price_input_per_mtok": 10.0, "price_output_per_mtok": 30.0},
            tasks=["caption", "vqa", "classify_few_shot", "inter_similar"], per_class=3)
        result = generate_instruction_set(cfg, manifest, few_shot, groups)
        assert result.records and not result.failed and not validate_records(result.records)
        assert result.teacher_calls == len(result.records) == stats(url)["completions"]
        multi = [r for r in result.records if len(r["image_ids"]) > 1]
        assert {r["task"] for r in multi} == {"classify_few_shot", "inter_similar"}
        # The few-shot answer starts with the true category, as the measurement teacher behind HTTP was told.
        for r in result.records:
            if r["task"] == "classify_few_shot":
                assert r["conversations"][1]["value"].startswith(r["label"] + ".")
        assert result.prompt_tokens > 0 and result.completion_tokens > 0 and result.cost > 0
        assert {r["provenance"]["model"] for r in result.records} == {"maemi-measurement-teacher"}

        again = generate_instruction_set(cfg, manifest, few_shot, groups)
        assert again.teacher_calls == 0 and again.cache_hits == len(result.records)
        assert stats(url)["completions"] == result.teacher_calls


def test_retries_on_429_then_500_lose_and_duplicate_nothing(tmp_path):
    with teacher_server("--fault", "429", "--fault", "500") as url:
        cfg, manifest, few_shot, groups = teacher_project(
            tmp_path, teacher={"kind": "openai", "base_url": url, "model": "m", "concurrency": 1,
                               "backoff_base_s": 0.01, "backoff_max_s": 0.05},
            tasks=["caption"], per_class=2)
        result = generate_instruction_set(cfg, manifest, few_shot, groups)
        n = 2 * len(manifest)                                 # a concise and a detailed caption per image (A.7)
        assert len(result.records) == n and not result.failed
        assert len({r["id"] for r in result.records}) == n
        assert result.teacher_calls == n
        assert result.http_attempts == n + 2                 # exactly the two injected failures were retried
        assert stats(url) == {"requests": n + 2, "completions": n}


def test_gives_up_after_bounded_retries(tmp_path):
    with teacher_server(*(["--fault", "503"] * 10)) as url:
        cfg, *_ = teacher_project(tmp_path, teacher={"kind": "openai", "base_url": url, "model": "m",
                                                     "max_retries": 2, "backoff_base_s": 0.0}, tasks=["caption"],
                                  per_class=1)
        from maemi_core.teacher.openai_teacher import TeacherFailed
        from maemi_core.teacher.requests import ImageRef, TeacherRequest

        from maemi_core.data.sources import list_elpv

        teacher = OpenAITeacher(cfg.teacher, sleep=lambda s: None)
        req = TeacherRequest("caption", "Describe.", [ImageRef("x", str(list_elpv()[0].path), "functional")],
                             ["intensity"], "sys", "EL", "solar cell")
        with pytest.raises(TeacherFailed, match="503"):
            teacher.answer(req)
        assert stats(url)["requests"] == 3


def test_external_baseline_row_over_http_and_privacy_refusal(tmp_path, elpv_paths):
    """An OpenAI-compatible endpoint answers the student prompts (images as data URLs, markers
    removed); an unreachable one is unavailable; a private dataset never reaches an outside host."""
    from maemi_core.config import BaselineEndpoint
    from maemi_core.evaluation.external_baselines import ask_baseline

    cfg, manifest, _, _ = teacher_project(tmp_path, tasks=["caption"], per_class=1)
    recs = [{"id": f"r{i}", "image": str(p), "image_ids": [f"id{i}"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the cell."}, {"from": "gpt", "value": "ref"}]}
        for i, p in enumerate(elpv_paths[:2])]
    with teacher_server() as url:
        got = ask_baseline(cfg, BaselineEndpoint(name="local_vlm", base_url=url, model="m"), recs, {})
        assert got.unavailable is None and got.failed == 0
        assert set(got.answers) == {"r0", "r1"} and all(len(a) > 20 for a in got.answers.values())
        assert stats(url)["requests"] == 2
    down = ask_baseline(cfg, BaselineEndpoint(name="gone", base_url="http://127.0.0.1:9/v1", model="m",
                                              timeout_s=3), recs, {})
    assert down.unavailable and "Connection" in down.unavailable and not down.answers
    assert cfg.dataset.private
    outside = ask_baseline(cfg, BaselineEndpoint(name="cloud", base_url="https://vlm.example.com/v1", model="m"),
                           recs, {})
    assert outside.unavailable and "private" in outside.unavailable


def test_a_teacher_failing_on_30_percent_fails_the_blocking_check_with_counts(tmp_path):
    from maemi_dagster.checks import instruction_set_teacher_failures
    from maemi_dagster.resources import MaemiConfigResource

    with teacher_server("--fail-fraction", "0.3") as url:
        cfg, manifest, few_shot, groups = teacher_project(
            tmp_path, teacher={"kind": "openai", "base_url": url, "model": "m", "concurrency": 2, "max_retries": 1,
                               "backoff_base_s": 0.0}, tasks=["caption"], per_class=3)
        result = generate_instruction_set(cfg, manifest, few_shot, groups)
    planned = 2 * len(manifest)
    assert len(result.records) + len(result.failed) == planned and 0.1 < len(result.failed) / planned < 0.6
    check = instruction_set_teacher_failures(dg.build_asset_check_context(), MaemiConfigResource(path=str(cfg.config_path)))
    assert not check.passed and "re-materialize" in check.description
    table = check.metadata["failures_per_split"].value
    assert "failed_fraction" in table and check.metadata["failed"].value == len(result.failed)
    assert "injected persistent fault" in check.metadata["top_errors"].value


def test_malformed_200_bodies_are_retried_and_every_attempt_counted(tmp_path):
    with teacher_server("--fault", "200", "--fault", "200") as url:
        cfg, manifest, few_shot, groups = teacher_project(
            tmp_path, teacher={"kind": "openai", "base_url": url, "model": "m", "concurrency": 1,
                               "backoff_base_s": 0.0, "backoff_max_s": 0.0}, tasks=["caption"], per_class=1)
        result = generate_instruction_set(cfg, manifest, few_shot, groups)
        n = 2 * len(manifest)
        assert len(result.records) == n and not result.failed
        assert result.http_attempts == n + 2 == stats(url)["requests"]
