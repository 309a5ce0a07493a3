"""The ``benchmark_tables`` step: every table of the paper's evaluation for one registered model,
written to ``reports/``, logged to MLflow and tagged on the model version.

Every number traces back to records on disk: the text tables use a stable hash slice of each
task's test records (``evaluation.max_records_per_task``) that every method answers; the
classification table scores every test image (``evaluation.classification_max_images``) with
every model on the same images. Per-sample answers and scores go to ``reports/samples/``.
Answers come from the model's own batched decoder, so what is measured is what serves.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from maemi_core.config import MaemiConfig
from maemi_core.evaluation.answering import (
    BASE_LM, GATES_CLOSED, MAEMI, Answerer, DecodeStats, benchmark_records, reference, stable_key,
)
from maemi_core.evaluation.benchmark_tables import (
    CLASSIFICATION_COLUMNS, CLASSIFICATION_TASKS, IMAGE_TOKEN, TEXT_TABLES, _thumbnail, _write, family_table,
    length_table, likelihood_classification, markdown_table, paired_difference, paired_differences, text_metrics_figure,
    text_samples, text_table,
)
from maemi_core.evaluation.category_parser import parse_category
from maemi_core.model.category_scoring import FEW_SHOT, package_scoring
from maemi_core.vision.classification_metrics import confusion_matrix_figure
from maemi_core.evaluation.external_baselines import ask_baseline
from maemi_core.evaluation.measurement_agreement import TOLERANCE as MEASUREMENT_TOLERANCE, agreement_table
from maemi_core.evaluation.text_metrics import METRICS, mean_std, score_pairs
from maemi_core.teacher.instruction_set import stable_slice
from maemi_core.run_isolation import stage_dir

ASSET = "benchmark_tables"


def reports_dir(cfg: MaemiConfig) -> Path:
    return stage_dir(cfg, "reports")


@dataclass
class BenchmarkResult:
    tables: dict[str, pd.DataFrame]
    paths: dict[str, Path]
    key_metrics: dict[str, float]
    figures: dict[str, Path] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    evaluation_tokens_per_s: float = float("nan")
    seconds: float = 0.0
    records_hash: str = ""
    evaluation_hash: str = ""


def classification_images(records: list[dict], vision_scores: Optional[pd.DataFrame], limit: Optional[int]) -> list[str]:
    """The test images every row of the classification table is scored on: those with a zero-shot
    record, a few-shot record (when the set has any) and a score from every vision model."""
    by_task = {task: {r["image_ids"][-1] for r in records if r["split"] == "test" and r["task"] == task
                      and r.get("length") != "concise"} for task in CLASSIFICATION_TASKS.values()}
    ids = by_task["classify_zero_shot"]
    if by_task["classify_few_shot"]:
        ids &= by_task["classify_few_shot"]
    if vision_scores is not None and len(vision_scores):
        for _, g in vision_scores.groupby("model"):
            ids &= set(g["image_id"])
    chosen = stable_slice([{"id": i} for i in sorted(ids)], limit, lambda r: "")
    return [r["id"] for r in chosen]


def evaluation_hash(cfg: MaemiConfig, records_hash: str) -> str:
    """What two versions' scores must share to be compared: the records and their references,
    the decoding and scoring settings of the benchmark, and the code that computes the scores
    (the benchmark's import closure, metrics included). Promotion re-evaluates a champion whose
    stored hash differs."""
    from maemi_core.code_version import code_version

    ev = cfg.evaluation
    settings = {"records": records_hash, "code": code_version("benchmark_tables"),
                "repetition_penalty": ev.repetition_penalty, "no_repeat_ngram_size": ev.no_repeat_ngram_size,
                "max_new_tokens": cfg.model.max_new_tokens,
                "classification_max_new_tokens": ev.classification_max_new_tokens,
                "category_scoring": ev.category_scoring, "no_vision_baseline": ev.no_vision_baseline}
    return stable_key(json.dumps(settings, sort_keys=True))


def _labels_of(records: list[dict], image_ids: list[str]) -> dict[str, str]:
    """The label of each image, from its zero-shot test record, in ``image_ids`` order."""
    by_image = {r["image_ids"][-1]: r["label"] for r in records if r["split"] == "test"
                and r["task"] == "classify_zero_shot" and r.get("label") is not None}
    return {i: by_image[i] for i in image_ids if i in by_image}


@dataclass
class _Run:
    """What the steps of one benchmark share: the model's answerer, the methods compared, and
    what each step adds (tables, files, per-record scores, the records used)."""
    cfg: MaemiConfig
    manifest: pd.DataFrame
    records: list[dict]
    out: Path
    answerer: Answerer
    methods: list[str]
    log: Callable[[str], None]
    source: str                     # " Model: <label>." for the tables' introductions
    decoding_note: str
    stats: DecodeStats = field(default_factory=DecodeStats)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    samples_by_table: dict[str, pd.DataFrame] = field(default_factory=dict)
    diffs: list[pd.DataFrame] = field(default_factory=list)
    used: list[dict] = field(default_factory=list)          # every record any table uses: their hash says "same records"
    hits: dict[str, np.ndarray] = field(default_factory=dict)   # per-image top-1 hit of each classification row
    image_ids: list[str] = field(default_factory=list)      # the classification images
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))   # per-image balanced-accuracy weights

    @property
    def crop(self) -> dict[str, int]:
        return {iid: c for iid, (_, c) in self.answerer.images.paths.items()}


def run_benchmark(cfg: MaemiConfig, manifest: pd.DataFrame, records: list[dict], package_dir: str | Path,
                  log: Callable[[str], None] = lambda m: None, model_label: str = "",
                  out_dir: Optional[Path] = None) -> BenchmarkResult:
    """Every table for the model in ``package_dir``, written to ``out_dir`` (default ``reports/``)."""
    from maemi_core.model.generation import DecodingConfig
    from maemi_core.model.maemi_model import load_package

    t_start = time.perf_counter()
    ev = cfg.evaluation
    out = out_dir or reports_dir(cfg)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    model = load_package(package_dir, cfg.model.lm_cache and str(cfg.resolve(cfg.model.lm_cache)))
    decoding = DecodingConfig(ev.repetition_penalty, ev.no_repeat_ngram_size)
    numerics = model.package_meta.get("inference_kernel", "weight_only_int8")
    run = _Run(cfg, manifest, records, out, Answerer(model, manifest, ev.batch_size, decoding),
               [MAEMI] + ([GATES_CLOSED, BASE_LM] if ev.no_vision_baseline else []), log,
               source=f" Model: {model_label}." if model_label else "",
               decoding_note=(f" Greedy decoding, repetition penalty {decoding.repetition_penalty}, no repeated "
                              f"{decoding.no_repeat_ngram_size}-grams, the same for every method; int8 numerics: "
                              f"{numerics}."))
    _text_tables(run)
    _measurement_table(run)
    scoring = _classification_table(run)
    _paired_differences_table(run)
    _qualitative_table(run)
    _rank_sweep_table(run)
    if any(n in run.tables for n in TEXT_TABLES):
        run.figures["text_metrics"] = text_metrics_figure(run.tables, out / "figures" / "text_metrics.png")
    key = key_metrics(run.tables)
    _write_key_scores(run)
    records_hash = stable_key("\n".join(sorted(f"{r['id']}\t{reference(r)}" for r in run.used)))
    result = BenchmarkResult(run.tables, run.paths, key, run.figures, run.unavailable, run.stats.tokens_per_s,
                             time.perf_counter() - t_start, records_hash, evaluation_hash(cfg, records_hash))
    (out / "benchmark.json").write_text(json.dumps({
        "key_metrics": key, "model": model_label, "records_hash": records_hash,
        "evaluation_hash": result.evaluation_hash, "unavailable": run.unavailable,
        "evaluation_tokens_per_s": result.evaluation_tokens_per_s, "seconds": result.seconds,
        "records_per_task": ev.max_records_per_task, "classification_images": len(run.image_ids),
        "inference_numerics": numerics, "category_scoring": scoring,
        "few_shot_category_scoring": package_scoring(model, FEW_SHOT),
        "test_records_the_teacher_could_not_answer": _unusable_test_records(cfg, log)}, indent=2, default=float))
    result.paths["benchmark_json"] = out / "benchmark.json"
    log(f"benchmark done in {result.seconds:.0f} s; maemi decoding {result.evaluation_tokens_per_s:.1f} tokens/s")
    return result


# 1-3. text tables (paper Tables 2-6) ---------------------------------------------------------------

def _text_tables(run: _Run) -> None:
    cfg, ev, out = run.cfg, run.cfg.evaluation, run.out
    max_new = cfg.model.max_new_tokens
    by_length: list[pd.DataFrame] = []
    for name, (task, paper_table, title) in TEXT_TABLES.items():
        group_task = task in ("intra_dissimilar", "inter_similar", "heterogeneity")
        limit = ev.max_group_records_per_task if group_task and ev.max_group_records_per_task else ev.max_records_per_task
        recs = benchmark_records(run.records, task, limit)
        if not recs:
            run.log(f"{name}: no test records for task {task}; table skipped")
            continue
        run.used += recs
        answers = {meth: run.answerer.answer(recs, max_new, desc=f"{name}: {meth}", method=meth,
                                             stats=run.stats if meth == MAEMI else None) for meth in run.methods}
        unavailable: dict[str, str] = {}
        failed: dict[str, int] = {}
        crop = run.crop
        for ep in ev.baselines:
            got = ask_baseline(cfg, ep, recs, crop)
            if got.unavailable:
                unavailable[ep.name] = got.unavailable
                run.unavailable[ep.name] = got.unavailable
                run.log(f"baseline {ep.name} unavailable: {got.unavailable}")
                continue
            failed[ep.name] = got.failed
            answers[ep.name] = [got.answers.get(r["id"], "") for r in recs]   # a failed request scores as empty
        samples = text_samples(recs, answers)
        samples.to_csv(out / "samples" / f"{name}.csv", index=False)
        run.samples_by_table[name] = samples
        table = text_table(samples, list(answers), unavailable)
        table["failed_requests"] = [failed.get(m, 0) for m in table["method"]]
        run.tables[name] = table
        run.diffs.append(paired_differences(name, samples, MAEMI, [m for m in answers if m != MAEMI]))
        intro = (f"Paper {paper_table}. {len(recs)} test records of task `{task}` (a stable hash slice), the same for "
                 f"every method; mean [95% bootstrap interval] over records. `maemi_gates_closed`: the tuned LM "
                 f"with every cross-attention gate closed (no image); `base_lm`: the LM as it ships.{run.decoding_note} "
                 f"Per-sample answers and scores: `samples/{name}.csv`.{run.source}")
        run.paths |= _write(table, markdown_table(table, f"{title} ({cfg.dataset.name})", intro), out / name)
        run.log(f"{name}: " + ", ".join(f"{r['method']} METEOR {r['meteor']:.3f} [{r['meteor_ci_low']:.3f}, "
                                        f"{r['meteor_ci_high']:.3f}]" for _, r in table.iterrows() if r["status"] == "ok"))
        if samples["length"].notna().any():
            by_length.append(length_table(name, samples))
        if name == "vqa":
            fam = family_table(samples)
            run.tables["vqa_by_family"] = fam
            run.paths |= _write(fam, markdown_table(fam, f"Open-ended VQA by question family ({cfg.dataset.name})",
                                                    "Table 3 broken down by the prompt pack's question families."),
                                out / "vqa_by_family")
    if by_length:
        bl = pd.concat(by_length, ignore_index=True)
        run.tables["by_length"] = bl
        run.paths |= _write(bl, markdown_table(bl, f"Text tables by answer length ({cfg.dataset.name})",
                                               "Paper A.7: the same questions asked for a concise and a detailed answer "
                                               "(the length is part of the student prompt)."), out / "by_length")


def _measurement_table(run: _Run) -> None:
    """Whether the answers state the teacher's measured numbers (fibre diameter, coverage, beads...)
    within 20%: METEOR does not see a wrong number. Absent when no reference states one."""
    table, per_record = agreement_table(run.samples_by_table, MEASUREMENT_TOLERANCE)
    if not len(table):
        return
    per_record.to_csv(run.out / "samples" / "measurements.csv", index=False)
    run.tables["measurements"] = table
    intro = (f"Records of the text tables whose reference (the teacher's answer) states a measured quantity; "
             f"`within_tolerance`: the answer states it within {MEASUREMENT_TOLERANCE:.0%} of the reference's "
             f"value (an answer that states no value is a miss), with its 95% bootstrap interval; `stated`: the "
             f"share of answers that state a value at all. Per record: `samples/measurements.csv`.{run.source}")
    run.paths |= _write(table, markdown_table(table, f"Measured quantities in the answers ({run.cfg.dataset.name})",
                                              intro), run.out / "measurements")
    for _, r in table[table["quantity"] == "fibre_diameter"].iterrows():
        run.log(f"{r['table']} {r['method']}: fibre diameter within {MEASUREMENT_TOLERANCE:.0%} on "
                f"{r['within_tolerance']:.2f} of {r['n']} records")


# 4. classification: every model on the same test images (paper Tables 7 and 9) ----------------------

def _classification_table(run: _Run) -> str:
    """The classification rows (MAEMI's, the vision models', ``majority``); returns the category
    scoring the package uses."""
    from maemi_core.model.category_scoring import balanced_weights

    cfg, out = run.cfg, run.out
    class_names = sorted(run.manifest["label"].unique())
    scoring = package_scoring(run.answerer.model)
    few_shot = package_scoring(run.answerer.model, FEW_SHOT)
    scores_path = stage_dir(cfg, "vision") / "test_scores.parquet"
    vs = pd.read_parquet(scores_path) if scores_path.is_file() else None
    run.image_ids = classification_images(run.records, vs, cfg.evaluation.classification_max_images)
    if not run.image_ids:
        return scoring
    rows, per_class = _maemi_rows(run, class_names, scoring, few_shot)
    if vs is not None:
        for model_name, group in vs.groupby("model", sort=False):
            g = group.set_index("image_id").reindex(run.image_ids)
            _add_row(run, rows, per_class, model_name, list(g["label"]), np.stack(g["scores"].to_numpy()),
                     class_names, log_likelihoods=False)
    label_of = _labels_of(run.records, run.image_ids)
    # Always the most frequent train category: what a model that ignores the image at best scores.
    train_labels = run.manifest.loc[run.manifest["split"] == "train", "label"]
    labels = list(label_of.values())
    if len(train_labels) and labels:
        majority = train_labels.value_counts().sort_index().idxmax()
        onehot = np.zeros((len(labels), len(class_names)))
        onehot[:, class_names.index(majority)] = 1.0
        _add_row(run, rows, per_class, "majority", labels, onehot, class_names, log_likelihoods=False)
    y_all = np.array([class_names.index(x) for x in labels])
    run.weights = balanced_weights(y_all) if len(y_all) else np.zeros(0)
    if not rows:
        return scoring
    cls = pd.DataFrame(rows)[CLASSIFICATION_COLUMNS]
    run.tables["classification"] = cls
    intro = (f"Paper Table 7. Every row on the same {len(run.image_ids)} test images, `n_images`. MAEMI rows: the "
             "category whose name the model finds most likely as the answer (log-likelihood of each name after "
             "the prompt; top-k orders all names), with a 95% bootstrap interval for top-1. `generated_top1`: the "
             "category parsed from the generated answer on a stable slice of `n_generated` of those images (an "
             "answer without a category counts as wrong, column `unparsed`). `zero_shot:maemi_gates_closed` and "
             "`zero_shot:base_lm`: the same scoring without the image / without tuning. "
             f"Category scores: zero-shot `{scoring}`, few-shot `{few_shot}` (each chosen on its own validation "
             "prompts after training, `fitted` fitted on them; "
             "`maemi_zero_shot[raw|mean|calibrated|fitted|head]`: each scoring of the same likelihoods, see "
             "maemi_core/model/category_scoring.py). `majority`: always the most frequent train category. "
             "`balanced_accuracy`: mean recall over the categories; `macro_auc`: one-vs-rest ROC AUC of "
             "the normalised category scores with a 95% bootstrap interval (0.5: the image is not used). "
             f"Vision rows: `vit_classifier`'s models on the same images.{run.source}")
    run.paths |= _write(cls, markdown_table(cls, f"Classification ({cfg.dataset.name})", intro), out / "classification")
    pc = pd.concat(per_class, ignore_index=True).rename(columns={"model": "method"})
    run.tables["per_class"] = pc
    run.paths |= _write(pc, f"# Per-class precision / recall / F1 ({cfg.dataset.name})\n\nPaper Table 9; the same "
                        "images as `classification.md`.\n\n" + pc.to_markdown(index=False, floatfmt=".4f") + "\n",
                        out / "per_class")
    if "maemi_zero_shot" in run.hits:
        diff_rows = []
        for other in [k for k in run.hits if k != "maemi_zero_shot"]:
            d = paired_difference(run.hits["maemi_zero_shot"], run.hits[other])
            diff_rows.append({"table": "classification", "comparison": f"maemi_zero_shot - {other}", "metric": "top1",
                              **d, "excludes_zero": bool(d["ci_low"] > 0 or d["ci_high"] < 0)})
        run.diffs.append(pd.DataFrame(diff_rows))
    return scoring


def _add_row(run: _Run, rows: list, per_class_frames: list, row_name: str, labels: list[str], scores: np.ndarray,
             class_names: list[str], generated=None, generated_labels=None, log_likelihoods: bool = True) -> np.ndarray:
    """One classification row from per-image category scores; returns its predictions."""
    summary, per_class, y_pred = likelihood_classification(row_name, labels, scores, class_names, generated,
                                                           generated_labels, log_likelihoods=log_likelihoods)
    rows.append(summary)
    per_class_frames.append(per_class)
    run.hits[row_name] = (y_pred == np.array([class_names.index(x) for x in labels])).astype(float)
    return y_pred


def _maemi_rows(run: _Run, class_names: list[str], scoring: str, few_shot_scoring: str) -> tuple[list, list]:
    """MAEMI's zero- and few-shot rows (and the zero-shot rows without the image / without
    tuning): category likelihoods on every image, the generated answer's category on a slice.
    ``scoring`` / ``few_shot_scoring``: the package's category scoring of each prompt
    (:func:`maemi_core.model.category_scoring.package_scoring`)."""
    from maemi_core.model.category_scoring import SCORINGS

    ev, out, answerer = run.cfg.evaluation, run.out, run.answerer
    rows: list = []
    per_class: list = []
    wanted = set(run.image_ids)
    for method, task in CLASSIFICATION_TASKS.items():
        by_image = {r["image_ids"][-1]: r for r in run.records if r["split"] == "test" and r["task"] == task
                    and r.get("length") != "concise" and r["image_ids"][-1] in wanted}
        if not by_image:
            continue
        recs = [by_image[i] for i in run.image_ids]
        run.used += recs
        labels = [r["label"] for r in recs]
        variants = [(method, MAEMI)] + ([(f"{method.removeprefix('maemi_')}:{m}", m) for m in run.methods[1:]]
                                        if task == "classify_zero_shot" else [])
        for row_name, meth in variants:
            own = few_shot_scoring if task == "classify_few_shot" else scoring
            raw, hidden = answerer.category_scores(recs, class_names, meth, return_hidden=True)
            everyway = answerer.scorings(recs, class_names, meth, raw,
                                         calibrated=own == "calibrated" or (meth == MAEMI and
                                                                            task == "classify_zero_shot"),
                                         task=task, hidden=hidden)
            sc = everyway[own]
            if meth == MAEMI and task == "classify_zero_shot":     # every scoring, beside the model's own
                for name in (n for n in SCORINGS if n in everyway):
                    summary, _, _ = likelihood_classification(f"{method}[{name}]", labels, everyway[name], class_names)
                    rows.append(summary)
            generated = gen_recs = None
            if meth == MAEMI:    # the generated answer's category, on a slice: what `maemi ask` would say
                gen_recs = benchmark_records(recs, task, ev.max_records_per_task)
                got = answerer.answer(gen_recs, ev.classification_max_new_tokens, desc=f"classification: {method}",
                                      stats=run.stats)
                generated = [parse_category(a, class_names) for a in got]
                pd.DataFrame({"method": method, "record_id": [r["id"] for r in gen_recs],
                              "image_id": [r["image_ids"][-1] for r in gen_recs],
                              "label": [r["label"] for r in gen_recs], "answer": got, "parsed": generated}
                             ).to_csv(out / "samples" / f"classification_{method}_generated.csv", index=False)
            y_pred = _add_row(run, rows, per_class, row_name, labels, sc, class_names, generated,
                              None if gen_recs is None else [r["label"] for r in gen_recs])
            pd.DataFrame({"method": row_name, "record_id": [r["id"] for r in recs], "image_id": run.image_ids,
                          "label": labels, "predicted": [class_names[i] for i in y_pred],
                          **{f"loglik_{c}": sc[:, j] for j, c in enumerate(class_names)}}
                         ).to_csv(out / "samples" / f"classification_{row_name.replace(':', '_')}.csv", index=False)
            if meth == MAEMI:
                y = np.array([class_names.index(x) for x in labels])
                top1 = rows[-1]["top1"]
                run.figures[f"confusion_{method}"] = confusion_matrix_figure(
                    y, y_pred, class_names, f"{method} (top-1 {top1:.3f}, {len(y)} images)",
                    out / "figures" / f"confusion_{method}.png")
    return rows, per_class


def _paired_differences_table(run: _Run) -> None:
    parts = [d for d in run.diffs if len(d)]
    if not parts:
        return
    pdiff = pd.concat(parts, ignore_index=True)
    run.tables["paired_differences"] = pdiff
    run.paths |= _write(pdiff, f"# Paired differences ({run.cfg.dataset.name})\n\nMAEMI minus each other method on "
                        "the same records (text) or images (classification top-1), mean and 95% bootstrap interval "
                        "over records; `excludes_zero`: a difference the benchmark can see.\n\n"
                        + pdiff.to_markdown(index=False, floatfmt=".4f") + "\n", run.out / "paired_differences")


# 5. qualitative (paper Table 10) --------------------------------------------------------------------

def _qualitative_table(run: _Run) -> None:
    ev, out = run.cfg.evaluation, run.out
    pool = [s[s["method"] == MAEMI] for n, s in run.samples_by_table.items() if n in ("captioning", "vqa")]
    pool_df = pd.concat(pool, ignore_index=True) if pool else pd.DataFrame()
    if not len(pool_df) or ev.qualitative_samples <= 0:
        return
    crop = run.crop
    qual_rows = []
    pool_df = pool_df.assign(_k=pool_df["record_id"].map(stable_key)).sort_values("_k").head(ev.qualitative_samples)
    for _, s in pool_df.iterrows():
        iid = s["image_ids"].split(",")[-1]
        thumb = _thumbnail(run.answerer.images.paths[iid][0], crop.get(iid, 0), out / "qualitative" / f"{iid[:16]}.png")
        qual_rows.append({"record_id": s["record_id"], "thumbnail": str(thumb.relative_to(out)),
                          "question": s["question"].replace(IMAGE_TOKEN, "").strip(), "teacher_answer": s["reference"],
                          "maemi_answer": s["answer"], "bleu2": s["bleu2"], "rougeL": s["rougeL"], "meteor": s["meteor"]})
    qual = pd.DataFrame(qual_rows)
    run.tables["qualitative"] = qual
    shown = qual.assign(thumbnail=[f"![{r}]({t})" for r, t in zip(qual["record_id"], qual["thumbnail"])])
    for c in ("question", "teacher_answer", "maemi_answer"):
        shown[c] = shown[c].str.replace("\n", " ").str.replace("|", "/")
    run.paths |= _write(qual, f"# Qualitative results ({run.cfg.dataset.name})\n\nPaper Table 10: the image, the "
                        "question, the teacher's answer, MAEMI's answer and per-sample BLEU-2 / ROUGE-L / METEOR.\n\n"
                        + shown.drop(columns=["record_id"]).to_markdown(index=False, floatfmt=".3f") + "\n",
                        out / "qualitative")


# 6. deploy-any-rank -----------------------------------------------------------------------------

def _rank_sweep_table(run: _Run) -> None:
    m, ev, out = run.cfg.model, run.cfg.evaluation, run.out
    ranks = ev.rank_sweep or sorted({m.r_min, (m.r_min + m.r_max) // 2, m.r_max})
    sweep_recs = benchmark_records(run.records, "vqa", ev.rank_sweep_records)
    if not sweep_recs:
        return
    sweep_rows = []
    refs = [reference(r) for r in sweep_recs]
    for rank in ranks:
        st = DecodeStats()
        got = run.answerer.answer(sweep_recs, m.max_new_tokens, rank=rank, desc=f"rank sweep: r={rank}", stats=st)
        sc = score_pairs(got, refs)
        sc.assign(rank=rank, record_id=[r["id"] for r in sweep_recs], answer=got).to_csv(
            out / "samples" / f"rank_sweep_r{rank}.csv", index=False)
        sweep_rows.append({"method": f"maemi@r{rank}", "rank": rank, "n": len(sweep_recs), **mean_std(sc),
                           "tokens_per_s": st.tokens_per_s})
    sweep = pd.DataFrame(sweep_rows)
    run.tables["rank_sweep"] = sweep
    run.paths |= _write(sweep, f"# Deploy-any-rank ({run.cfg.dataset.name})\n\nOne trained DyQLoRA-FA adapter "
                        f"evaluated at ranks {ranks} without retraining, on {len(sweep_recs)} open-ended VQA test records "
                        "(mean and std over records).\n\n" + sweep.to_markdown(index=False, floatfmt=".4f") + "\n",
                        out / "rank_sweep")


# what promotion reads -------------------------------------------------------------------------------

def key_metrics(tables: dict[str, pd.DataFrame]) -> dict[str, float]:
    """The numbers a version is tagged with and promotion compares, from the tables."""
    key = {}
    for name in TEXT_TABLES:
        t = tables.get(name)
        if t is not None and (t["method"] == MAEMI).any():
            row = t[t["method"] == MAEMI].iloc[0]
            key |= {f"{name}.{k}": float(row[k]) for k in METRICS}
    if "classification" in tables:
        c = tables["classification"].set_index("method")
        for method in CLASSIFICATION_TASKS:
            if method in c.index:
                key[f"classification.{method.removeprefix('maemi_')}_top1"] = float(c.loc[method, "top1"])
        if "zero_shot:base_lm" in c.index:
            key["classification.base_lm_zero_shot_top1"] = float(c.loc["zero_shot:base_lm", "top1"])
        if "maemi_zero_shot" in c.index:
            for col in ("balanced_accuracy", "macro_auc", "macro_auc_ci_low", "macro_auc_ci_high"):
                key[f"classification.zero_shot_{col}"] = float(c.loc["maemi_zero_shot", col])
        if "majority" in c.index:
            key["classification.majority_top1"] = float(c.loc["majority", "top1"])
            key["classification.majority_balanced_accuracy"] = float(c.loc["majority", "balanced_accuracy"])
    if "vqa" in tables and (tables["vqa"]["method"] == BASE_LM).any():
        key["vqa.base_lm_meteor"] = float(tables["vqa"].set_index("method").loc[BASE_LM, "meteor"])
    return key


def _write_key_scores(run: _Run) -> None:
    """Per-record scores of the key metrics, for MAEMI and the methods it must beat: what promotion
    compares paired (maemi_core/registry/model_promotion.py). Classification records are test images."""
    score_rows = []
    for name, samples in run.samples_by_table.items():
        if samples.empty or "record_id" not in samples:
            continue
        for method in (MAEMI, BASE_LM, GATES_CLOSED):
            s = samples[samples["method"] == method]
            for m in METRICS:
                score_rows.append(pd.DataFrame({"method": method, "metric": f"{name}.{m}",
                                                "record_id": s["record_id"].astype(str), "score": s[m].astype(float)}))
    for row_name, method in (("maemi_zero_shot", MAEMI), ("maemi_few_shot", MAEMI), ("zero_shot:base_lm", BASE_LM),
                             ("zero_shot:maemi_gates_closed", GATES_CLOSED), ("majority", "majority")):
        if row_name in run.hits:
            hits = run.hits[row_name]
            metric = "classification.few_shot_top1" if row_name == "maemi_few_shot" else "classification.zero_shot_top1"
            score_rows.append(pd.DataFrame({"method": method, "metric": metric, "record_id": list(run.image_ids),
                                            "score": hits}))
            if row_name != "maemi_few_shot" and len(run.weights) == len(hits):
                # per-image hit x weight: its mean over the images is the balanced accuracy (paired comparisons)
                score_rows.append(pd.DataFrame({"method": method, "metric": "classification.zero_shot_balanced_accuracy",
                                                "record_id": list(run.image_ids), "score": hits * run.weights}))
    if score_rows:
        pd.concat(score_rows, ignore_index=True).to_csv(run.out / "samples" / "key_scores.csv", index=False)


def _unusable_test_records(cfg: MaemiConfig, log: Callable[[str], None]) -> dict:
    """Test records the teacher failed on (they are in no table): how many, by task, which errors."""
    from maemi_core.teacher.instruction_set import load_failed

    failed_test = [f for f in load_failed(cfg) if f["split"] == "test"]
    if failed_test:
        log(f"{len(failed_test)} test records could not be used: the teacher failed on them (see failed.jsonl)")
    return {"count": len(failed_test), "by_task": pd.Series([f["task"] for f in failed_test], dtype=str).value_counts().to_dict(),
            "errors": pd.Series([f["error"][:120] for f in failed_test], dtype=str).value_counts().head(5).to_dict()}
