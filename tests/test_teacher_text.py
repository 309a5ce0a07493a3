"""The teacher states only what the image shows and what the acquisition recorded.

Manifest bookkeeping (image and group ids, hashes, paths, splits, sample names, leakage flags)
must never reach the instruction records, nor the prompt sent to an external teacher.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from maemi_core.config import ConfigError
from maemi_core.teacher.instruction_set import generate_instruction_set, plan_records
from maemi_core.teacher.openai_teacher import OpenAITeacher
from maemi_core.teacher.prompt_pack import load_prompt_pack
from tests.teacher_fixtures import teacher_project

HEX_RUN = re.compile(r"[0-9a-fA-F]{16,}")
# Stated by their own facts: the label (`label`), pixel size and image size (`scale`).
STATED_BY_FACTS = {"label", "pixel_size_nm", "width", "height"}


def bookkeeping_in(text: str, rows: list[dict], allowed: set[str]) -> list[str]:
    """Names and values of manifest columns outside ``allowed`` that ``text`` states."""
    found = []
    low = text.lower()
    for c in rows[0]:
        if c in allowed:
            continue
        spoken = c.replace("_", " ")
        if "_" in c and (c.lower() in low or spoken.lower() in low):
            found.append(f"column name {c!r}")
        for row in rows:
            v = row[c]
            if v is None or v != v:         # None or NaN
                continue
            values = {str(v)} | ({Path(str(v)).name, Path(str(v)).stem} if c == "path" else set())
            for s in values:
                # Distinctive values anywhere; short ones (split names, flags, modes) next to their column name.
                if (len(s) >= 8 and s in text) or re.search(rf"\b{re.escape(spoken)}\b\s*[=:]?\s*{re.escape(s)}\b",
                                                             text, re.IGNORECASE):
                    found.append(f"{c} value {s!r}")
    return found


def _rows(manifest, image_ids: list[str]) -> list[dict]:
    by_id = manifest.set_index("image_id", drop=False)
    return [by_id.loc[i].to_dict() for i in image_ids]


def test_records_state_only_acquisition_metadata_and_no_hashes(tmp_path):
    cfg, manifest, few_shot, groups = teacher_project(tmp_path)
    # The data carries the bookkeeping this guards against, and one acquisition column.
    assert {"group_id", "test_sample_in_training", "sample", "cell_type"} <= set(manifest.columns)
    allowed = set(cfg.teacher.acquisition_metadata) | STATED_BY_FACTS
    result = generate_instruction_set(cfg, manifest, few_shot, groups)
    assert result.records and not result.failed

    leaks, hashes = {}, {}
    for r in result.records:
        text = "\n".join(turn["value"] for turn in r["conversations"])
        if found := bookkeeping_in(text, _rows(manifest, r["image_ids"]), allowed):
            leaks[r["id"]] = found
        if HEX_RUN.search(text):
            hashes[r["id"]] = HEX_RUN.findall(text)
    assert not leaks, f"{len(leaks)} of {len(result.records)} records state manifest bookkeeping, e.g. {next(iter(leaks.items()))}"
    assert not hashes, f"{len(hashes)} of {len(result.records)} records contain hashes, e.g. {next(iter(hashes.items()))}"

    # What the acquisition recorded is still stated: ELPV's cell type, wherever a prompt asks for metadata.
    with_metadata = [r for r in result.records if r["task"] == "caption" and r["length"] == "detailed"]
    assert with_metadata and all(re.search(r"cell type (mono|poly)\b", r["conversations"][-1]["value"])
                                 for r in with_metadata)


def test_an_external_teacher_is_sent_no_bookkeeping(tmp_path):
    cfg, manifest, few_shot, groups = teacher_project(tmp_path)
    allowed = set(cfg.teacher.acquisition_metadata) | STATED_BY_FACTS
    plan = plan_records(cfg, manifest, few_shot, groups, load_prompt_pack("elpv"))
    teacher = OpenAITeacher(cfg.teacher, api_key="unused")      # builds the messages; sends nothing here
    leaks, hashes, texts = {}, {}, []
    for p in plan:
        messages = teacher.messages(p.request)
        sent = [m["content"] for m in messages if isinstance(m["content"], str)]
        sent += [part["text"] for m in messages if isinstance(m["content"], list)
                 for part in m["content"] if part["type"] == "text"]
        text = "\n".join(sent)
        texts.append(text)
        if found := bookkeeping_in(text, _rows(manifest, [ref.image_id for ref in p.request.images]), allowed):
            leaks[p.id] = found
        if HEX_RUN.search(text):
            hashes[p.id] = HEX_RUN.findall(text)
    assert not leaks, f"{len(leaks)} of {len(plan)} prompts state manifest bookkeeping, e.g. {next(iter(leaks.items()))}"
    assert not hashes, f"{len(hashes)} of {len(plan)} prompts contain hashes, e.g. {next(iter(hashes.items()))}"
    assert all(re.search(r"cell type = (mono|poly)\b", t) for t in texts)   # the acquisition metadata still goes


def test_bookkeeping_cannot_be_declared_acquisition_metadata(tmp_path):
    cfg, manifest, few_shot, groups = teacher_project(tmp_path, teacher={"acquisition_metadata": ["cell_type", "group_id"]})
    with pytest.raises(ConfigError, match="group_id"):
        plan_records(cfg, manifest, few_shot, groups, load_prompt_pack("elpv"))
