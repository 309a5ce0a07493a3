"""The instruction-following dataset: image-question-answer records written by a teacher.

Records use LLaVA's conversation format (``id``, ``image`` or ``images``,
``conversations`` of ``human``/``gpt`` turns with ``<image>`` placeholders) plus ``task``,
``split`` (inherited from the images; test-split records are the benchmark's ground truth),
``label`` and ``provenance``. Every teacher answer goes through the content-addressed
:class:`~maemi_core.teacher.cache.TeacherCache`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd
from tqdm.auto import tqdm

from maemi_core.config import ConfigError, MaemiConfig
from maemi_core.teacher.cache import cache_key, open_teacher_cache
from maemi_core.teacher.openai_teacher import TeacherFailed, is_refusal
from maemi_core.teacher.privacy import check_teacher_privacy
from maemi_core.teacher.prompt_pack import PromptPack, load_prompt_pack
from maemi_core.teacher.requests import ImageRef, Teacher, TeacherRequest, render_teacher_prompt
from maemi_core.run_isolation import stage_dir

IMAGE_TOKEN = "<image>"


@dataclass
class PlannedRecord:
    id: str
    task: str
    split: str
    request: TeacherRequest
    student_prompt: str
    label: Optional[str]
    family: Optional[str] = None
    question_id: Optional[str] = None
    group_id: Optional[str] = None
    length: Optional[str] = None          # "concise" / "detailed" where the task has both (paper A.7)


# What the student prompt asks for, per answer length (paper A.7).
LENGTH_INSTRUCTIONS = {
    "detailed": "Answer in detail.",
    "concise": "Answer in one short sentence.",
}
CONCISE_CLASSIFICATION = "Answer with the category name only."


def with_lengths(plan: list[PlannedRecord], tasks: list[str]) -> list[PlannedRecord]:
    """Each planned record of ``tasks`` twice: the detailed answer (the same teacher request as
    before, so cached answers stay valid) and a concise one (id suffix ``-concise``); the
    student prompt ends with the length it wants."""
    from dataclasses import replace

    out = []
    for p in plan:
        if p.task not in tasks:
            out.append(p)
            continue
        concise = (CONCISE_CLASSIFICATION if p.task.startswith("classify") else LENGTH_INSTRUCTIONS["concise"])
        out.append(replace(p, student_prompt=f"{p.student_prompt}\n{LENGTH_INSTRUCTIONS['detailed']}", length="detailed"))
        out.append(replace(p, id=f"{p.id}-concise", request=replace(p.request, length="concise"),
                           student_prompt=f"{p.student_prompt}\n{concise}", length="concise"))
    return out


def _rank(*parts: str) -> str:
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


# Manifest columns the teacher states through their own facts (`label`, `scale`), and those that
# are the manifest's bookkeeping: nothing the image shows or the acquisition recorded, never stated.
STATED_BY_FACTS = frozenset({"label", "pixel_size_nm"})
BOOKKEEPING_COLUMNS = frozenset({"image_id", "path", "split", "source", "crop_bottom", "forced_split",
                                 "sample", "group_id", "test_sample_in_training"})
_HEX_RUN = re.compile(r"[0-9a-fA-F]{16,}")


def acquisition_columns(cfg: MaemiConfig, manifest: pd.DataFrame) -> list[str]:
    """The manifest columns that ``teacher.acquisition_metadata`` lets the teacher state, in the
    profile's order; a bookkeeping column in that list is a configuration error."""
    listed = list(cfg.teacher.acquisition_metadata)
    bad = [c for c in listed if c in BOOKKEEPING_COLUMNS]
    if bad:
        raise ConfigError(
            f"teacher.acquisition_metadata in {cfg.config_path} lists {', '.join(bad)}: manifest bookkeeping, "
            f"not something the acquisition recorded; the teacher never states it. Remove it from the list.")
    return [c for c in dict.fromkeys(listed) if c in manifest.columns and c not in STATED_BY_FACTS]


def image_refs(manifest: pd.DataFrame, metadata_columns: Sequence[str] = ()) -> dict[str, ImageRef]:
    """One :class:`ImageRef` per manifest row. Its ``metadata`` holds only ``metadata_columns``
    (see :func:`acquisition_columns`), never an identifier: a value with a run of 16 or more hex
    digits (a hash) is left out."""
    refs = {}
    for row in manifest.itertuples(index=False):
        r = row._asdict()
        meta = tuple((c.replace("_", " "), str(r[c])) for c in metadata_columns
                     if pd.notna(r[c]) and not _HEX_RUN.search(str(r[c])))
        ps = r.get("pixel_size_nm")
        refs[r["image_id"]] = ImageRef(image_id=r["image_id"], path=r["path"], label=r["label"],
                                       crop_bottom=int(r.get("crop_bottom") or 0),
                                       pixel_size_nm=float(ps) if ps is not None and pd.notna(ps) else None,
                                       metadata=meta)
    return refs


def plan_records(cfg: MaemiConfig, manifest: pd.DataFrame, few_shot: pd.DataFrame, groups: pd.DataFrame,
                 pack: PromptPack) -> list[PlannedRecord]:
    """Every record the configured tasks call for, in a deterministic order."""
    t = cfg.teacher
    refs = image_refs(manifest, acquisition_columns(cfg, manifest))
    categories = sorted(manifest["label"].unique())
    cats = ", ".join(categories)
    common = dict(system=pack.system, technique=pack.technique, subject=pack.subject)
    rows = manifest[manifest["split"].isin(t.splits)].sort_values("image_id")
    plan: list[PlannedRecord] = []
    one = f"{IMAGE_TOKEN}\n"
    questions = pack.questions()
    for row in rows.itertuples(index=False):
        iid, split, label = row.image_id, row.split, row.label
        ref = refs[iid]
        if "caption" in t.tasks:
            prompt = min(pack.caption.prompts, key=lambda p: _rank(iid, p))
            plan.append(PlannedRecord(f"caption-{iid[:16]}", "caption", split,
                                      TeacherRequest("caption", prompt, [ref], pack.caption.facts, **common),
                                      one + prompt, label))
        if "vqa" in t.tasks:
            chosen = sorted(questions, key=lambda fq: _rank(iid, fq[1].id))
            if t.vqa_questions_per_image is not None:
                chosen = chosen[: t.vqa_questions_per_image]
            for fam, q in sorted(chosen, key=lambda fq: fq[1].id):
                plan.append(PlannedRecord(f"vqa-{iid[:16]}-{q.id}", "vqa", split,
                                          TeacherRequest("vqa", q.text, [ref], q.facts, **common),
                                          one + q.text, label, family=fam.id, question_id=q.id))
        # The query image's label is hidden from the student but given to the teacher.
        hidden = ImageRef(ref.image_id, ref.path, None, ref.crop_bottom, ref.pixel_size_nm, ref.metadata)
        if "classify_zero_shot" in t.tasks:
            q = pack.classify_zero_shot.render(categories=cats)
            plan.append(PlannedRecord(f"classify_zero_shot-{iid[:16]}", "classify_zero_shot", split,
                                      TeacherRequest("classify_zero_shot", q, [hidden], pack.classify_zero_shot.facts,
                                                     query_label=label, categories=categories, **common),
                                      one + q, label))
    if "classify_few_shot" in t.tasks and len(few_shot):
        fs = few_shot.set_index("target_id")
        for row in rows.itertuples(index=False):
            if row.image_id not in fs.index:
                continue
            demo_ids = list(fs.loc[row.image_id, "demo_ids"])
            if not demo_ids:
                continue
            ref = refs[row.image_id]
            hidden = ImageRef(ref.image_id, ref.path, None, ref.crop_bottom, ref.pixel_size_nm, ref.metadata)
            demos = [refs[d] for d in demo_ids]
            q = pack.classify_few_shot.render(k=len(demos), categories=cats)
            student = "".join(f"{IMAGE_TOKEN}\nCategory: {d.label}\n" for d in demos) + one + q
            plan.append(PlannedRecord(f"classify_few_shot-{row.image_id[:16]}", "classify_few_shot", row.split,
                                      TeacherRequest("classify_few_shot", q, demos + [hidden], pack.classify_few_shot.facts,
                                                     query_label=row.label, categories=categories, **common),
                                      student, row.label))
    kinds = {"intra_dissimilar": ("intra_class_dissimilar", pack.intra_dissimilar),
             "inter_similar": ("inter_class_similar", pack.inter_similar),
             "heterogeneity": ("spatial_heterogeneity", pack.heterogeneity)}
    for task, (kind, template) in kinds.items():
        if task not in t.tasks or not len(groups):
            continue
        for g in groups[(groups["kind"] == kind) & groups["split"].isin(t.splits)].itertuples(index=False):
            members = [refs[i] for i in g.image_ids]
            labels = list(g.labels)
            q = template.render(n=len(members), label=labels[0], labels=", ".join(labels))
            plan.append(PlannedRecord(f"{task}-{g.group_id}", task, g.split,
                                      TeacherRequest(task, q, members, template.facts, **common),
                                      IMAGE_TOKEN * len(members) + "\n" + q, labels[0] if len(set(labels)) == 1 else None,
                                      group_id=g.group_id))
    return with_lengths(plan, list(t.concise_tasks))


@dataclass
class InstructionSetResult:
    records: list[dict]
    failed: list[dict]
    teacher_calls: int = 0
    cache_hits: int = 0
    http_attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    paths: dict[str, Path] = field(default_factory=dict)
    pack_version: str = ""

    def counts(self) -> pd.DataFrame:
        df = pd.DataFrame([{"task": r["task"], "split": r["split"]} for r in self.records])
        if df.empty:
            return pd.DataFrame()
        return pd.crosstab(df["task"], df["split"])


def instructions_dir(cfg: MaemiConfig) -> Path:
    return stage_dir(cfg, "instructions")


def teacher_cache_path(cfg: MaemiConfig) -> Path:
    """The teacher cache, shared by every run of the workdir (answers are keyed by content; sqlite
    serialises writers). A cache from before run isolation (``instructions/``) is adopted."""
    path = cfg.workdir_path / "cache" / "teacher_cache.sqlite"
    legacy = cfg.workdir_path / "instructions" / "teacher_cache.sqlite"
    if not path.exists() and legacy.is_file():
        import shutil

        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(legacy, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make_teacher(cfg: MaemiConfig, api_key: Optional[str] = None) -> Teacher:
    """The configured teacher, after the privacy check (nothing is created for a refused setup)."""
    check_teacher_privacy(cfg)
    if cfg.teacher.kind == "openai":
        from maemi_core.teacher.openai_teacher import OpenAITeacher

        return OpenAITeacher(cfg.teacher, api_key=api_key)
    from maemi_core.teacher.measurement_teacher import MeasurementTeacher

    return MeasurementTeacher()


def _record(p: PlannedRecord, answer: dict, key: str, pack: PromptPack, identity: dict) -> dict:
    imgs = [ref.path for ref in p.request.images]
    rec = {"id": p.id}
    if len(imgs) == 1:
        rec["image"] = imgs[0]
    else:
        rec["images"] = imgs
    rec |= {
        "image_ids": [ref.image_id for ref in p.request.images],
        "conversations": [{"from": "human", "value": p.student_prompt}, {"from": "gpt", "value": answer["text"]}],
        "task": p.task, "split": p.split, "label": p.label, "family": p.family, "question_id": p.question_id,
        "group_id": p.group_id, "length": p.length,
        "provenance": {
            "teacher": identity.get("teacher"), "model": identity.get("model") or f"measurement-v{identity.get('version')}",
            "prompt_pack": pack.name, "prompt_pack_version": pack.version,
            "created": datetime.fromtimestamp(answer["created"], timezone.utc).isoformat(timespec="seconds"),
            "cache_key": key,
        },
    }
    return rec


def generate_instruction_set(cfg: MaemiConfig, manifest: pd.DataFrame, few_shot: pd.DataFrame, groups: pd.DataFrame,
                             teacher: Optional[Teacher] = None, log: Callable[[str], None] = lambda m: None,
                             api_key: Optional[str] = None) -> InstructionSetResult:
    pack = load_prompt_pack(cfg.dataset.prompt_pack, Path(cfg.project_root))
    teacher = teacher if teacher is not None else make_teacher(cfg, api_key)
    identity = teacher.identity()
    cache = open_teacher_cache(cfg, teacher_cache_path(cfg))
    try:
        plan = plan_records(cfg, manifest, few_shot, groups, pack)
        log(f"{len(plan)} records planned with pack {pack.name} v{pack.version}, teacher {identity}")
        result = InstructionSetResult(records=[], failed=[], pack_version=pack.version)

        keyed = [(p, cache_key([r.image_id for r in p.request.images], p.request.system,
                               render_teacher_prompt(p.request), identity)) for p in plan]
        done: dict[str, dict] = {}
        todo: list[tuple[PlannedRecord, str]] = []
        for p, key in keyed:
            hit = cache.get(key)
            if hit is not None:
                done[key] = hit
                result.cache_hits += 1
            else:
                todo.append((p, key))
        log(f"{result.cache_hits} answers from the cache, {len(todo)} to ask the teacher")

        def ask(p: PlannedRecord, key: str):
            try:
                return key, teacher.answer(p.request), None
            except TeacherFailed as exc:
                return key, None, (str(exc), exc.attempts)
            except Exception as exc:  # a bad image or a teacher bug must not lose the rest
                return key, None, (f"{type(exc).__name__}: {exc}", 1)

        workers = max(1, cfg.teacher.concurrency)
        failures: dict[str, tuple[str, int]] = {}
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(ask, p, key) for p, key in todo]
            for fut in tqdm(as_completed(futures), total=len(futures), desc="teacher", unit="rec", mininterval=2):
                key, ans, err = fut.result()
                result.teacher_calls += 1
                if ans is not None and is_refusal(ans.text):
                    err, ans = (f"empty or refused answer: {ans.text[:120]!r}", ans.attempts), None
                if ans is None:
                    failures[key] = err
                    result.http_attempts += err[1]
                    cache.fail(key, err[0], err[1], identity)
                    continue
                result.http_attempts += ans.attempts
                result.prompt_tokens += ans.prompt_tokens
                result.completion_tokens += ans.completion_tokens
                cache.put(key, ans.text, ans.prompt_tokens, ans.completion_tokens, ans.attempts, identity)
                done[key] = cache.get(key)
    finally:   # closed on every path: a teacher error must not leave the cache (or its connection) open
        cache.close()
    t = cfg.teacher
    result.cost = (result.prompt_tokens * t.price_input_per_mtok + result.completion_tokens * t.price_output_per_mtok) / 1e6

    for p, key in keyed:
        if key in done:
            result.records.append(_record(p, done[key], key, pack, identity))
        elif key in failures:
            result.failed.append({"id": p.id, "task": p.task, "split": p.split, "error": failures[key][0],
                                  "attempts": failures[key][1], "cache_key": key})
    result.records.sort(key=lambda r: r["id"])
    result.paths = save_instruction_set(cfg, result, identity)
    log(f"{len(result.records)} records, {len(result.failed)} failed, {result.teacher_calls} teacher calls, "
        f"{result.cache_hits} cache hits")
    return result


def _write_jsonl(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def save_instruction_set(cfg: MaemiConfig, result: InstructionSetResult, identity: dict) -> dict[str, Path]:
    out = instructions_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"records": out / "instructions.jsonl", "failed": out / "failed.jsonl", "summary": out / "summary.json"}
    _write_jsonl(result.records, paths["records"])
    _write_jsonl(result.failed, paths["failed"])
    paths["summary"].write_text(json.dumps({
        "records": len(result.records), "failed": len(result.failed), "teacher_calls": result.teacher_calls,
        "cache_hits": result.cache_hits, "http_attempts": result.http_attempts,
        "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "cost": result.cost,
        "teacher": identity, "prompt_pack": cfg.dataset.prompt_pack, "prompt_pack_version": result.pack_version,
        "generated_at": time.time(),
    }, indent=2))
    return paths


def load_failed(cfg: MaemiConfig) -> list[dict]:
    """The records the teacher could not answer in the last run (``failed.jsonl``)."""
    path = instructions_dir(cfg) / "failed.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def failure_table(records: list[dict], failed: list[dict]) -> pd.DataFrame:
    """Per split: planned records, failed ones and the failed fraction."""
    rows = []
    for split in ("train", "val", "test"):
        ok = sum(1 for r in records if r["split"] == split)
        bad = sum(1 for r in failed if r["split"] == split)
        if ok or bad:
            rows.append({"split": split, "planned": ok + bad, "failed": bad, "failed_fraction": bad / (ok + bad)})
    return pd.DataFrame(rows, columns=["split", "planned", "failed", "failed_fraction"])


def load_instruction_set(cfg: MaemiConfig) -> list[dict]:
    path = instructions_dir(cfg) / "instructions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no instruction set at {path}: materialize instruction_set first")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def validate_records(records: list[dict]) -> list[str]:
    """Problems with the records (empty list: all good): fields, turns, empty/refused answers."""
    problems = []
    required = ("id", "conversations", "task", "split", "provenance", "image_ids")
    for r in records:
        missing = [k for k in required if k not in r]
        if missing:
            problems.append(f"{r.get('id', '?')}: missing {missing}")
            continue
        if "image" not in r and "images" not in r:
            problems.append(f"{r['id']}: no image")
        conv = r["conversations"]
        if len(conv) < 2 or conv[0].get("from") != "human" or conv[-1].get("from") != "gpt":
            problems.append(f"{r['id']}: conversation is not human -> gpt")
            continue
        n_images = len(r.get("images") or [r.get("image")])
        if conv[0]["value"].count(IMAGE_TOKEN) != n_images:
            problems.append(f"{r['id']}: {n_images} images but {conv[0]['value'].count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens")
        if is_refusal(conv[-1]["value"]):
            problems.append(f"{r['id']}: empty or refused answer")
    return problems


def stable_slice(records: list[dict], limit: Optional[int], group: Callable[[dict], str],
                 weights: Optional[dict[str, int]] = None) -> list[dict]:
    """``records`` in a stable order (sha256 of the id); with ``limit``, the first ``limit`` taken
    round-robin over ``group(record)`` so every group is represented (``weights``: a group takes
    that many records per round, default 1). Adding records elsewhere never reshuffles which ones
    are chosen within a group."""
    chosen = sorted(records, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
    if limit is None or len(chosen) <= limit:
        return chosen
    weights = weights or {}
    groups: dict[str, list[dict]] = {}
    for r in chosen:
        groups.setdefault(group(r), []).append(r)
    out, taken = [], {g: 0 for g in groups}
    while len(out) < limit:
        before = len(out)
        for g in sorted(groups):
            for _ in range(max(0, int(weights.get(g, 1)))):
                if taken[g] < len(groups[g]) and len(out) < limit:
                    out.append(groups[g][taken[g]])
                    taken[g] += 1
        if len(out) == before:      # only groups of weight 0 are left
            break
    return out
