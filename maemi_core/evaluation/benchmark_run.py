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
from maemi_core.vision.classification_metrics import confusion_matrix_figure
from maemi_core.evaluation.external_baselines import ask_baseline
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


def run_benchmark(cfg: MaemiConfig, manifest: pd.DataFrame, records: list[dict], package_dir: str | Path,
                  log: Callable[[str], None] = lambda m: None, model_label: str = "",
                  out_dir: Optional[Path] = None) -> BenchmarkResult:
    from maemi_core.model.generation import DecodingConfig
    from maemi_core.model.maemi_model import load_package

    t_start = time.perf_counter()
    ev = cfg.evaluation
    out = out_dir or reports_dir(cfg)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    model = load_package(package_dir, cfg.model.lm_cache and str(cfg.resolve(cfg.model.lm_cache)))
    decoding = DecodingConfig(ev.repetition_penalty, ev.no_repeat_ngram_size)
    answerer = Answerer(model, manifest, ev.batch_size, decoding)
    crop = {iid: c for iid, (_, c) in answerer.images.paths.items()}
    max_new = cfg.model.max_new_tokens
    methods = [MAEMI] + ([GATES_CLOSED, BASE_LM] if ev.no_vision_baseline else [])
    stats = DecodeStats()
    tables: dict[str, pd.DataFrame] = {}
    paths: dict[str, Path] = {}
    unavailable_all: dict[str, str] = {}
    samples_by_table: dict[str, pd.DataFrame] = {}
    diffs: list[pd.DataFrame] = []
    by_length: list[pd.DataFrame] = []
    source = f" Model: {model_label}." if model_label else ""
    numerics = model.package_meta.get("inference_kernel", "weight_only_int8")
    decoding_note = (f" Greedy decoding, repetition penalty {decoding.repetition_penalty}, no repeated "
                     f"{decoding.no_repeat_ngram_size}-grams, the same for every method; int8 numerics: {numerics}.")
    used: list[dict] = []          # every record any table uses: their hash says "same records"

    # 1-3. text tables ---------------------------------------------------------------------------
    for name, (task, paper_table, title) in TEXT_TABLES.items():
        group_task = task in ("intra_dissimilar", "inter_similar", "heterogeneity")
        limit = ev.max_group_records_per_task if group_task and ev.max_group_records_per_task else ev.max_records_per_task
        recs = benchmark_records(records, task, limit)
        if not recs:
            log(f"{name}: no test records for task {task}; table skipped")
            continue
        used += recs
        answers = {meth: answerer.answer(recs, max_new, desc=f"{name}: {meth}", method=meth,
                                         stats=stats if meth == MAEMI else None) for meth in methods}
        unavailable: dict[str, str] = {}
        failed: dict[str, int] = {}
        for ep in ev.baselines:
            got = ask_baseline(cfg, ep, recs, crop)
            if got.unavailable:
                unavailable[ep.name] = got.unavailable
                unavailable_all[ep.name] = got.unavailable
                log(f"baseline {ep.name} unavailable: {got.unavailable}")
                continue
            failed[ep.name] = got.failed
            answers[ep.name] = [got.answers.get(r["id"], "") for r in recs]   # a failed request scores as empty
        samples = text_samples(recs, answers)
        samples.to_csv(out / "samples" / f"{name}.csv", index=False)
        samples_by_table[name] = samples
        table = text_table(samples, list(answers), unavailable)
        table["failed_requests"] = [failed.get(m, 0) for m in table["method"]]
        tables[name] = table
        diffs.append(paired_differences(name, samples, MAEMI, [m for m in answers if m != MAEMI]))
        intro = (f"Paper {paper_table}. {len(recs)} test records of task `{task}` (a stable hash slice), the same for "
                 f"every method; mean [95% bootstrap interval] over records. `maemi_gates_closed`: the tuned LM "
                 f"with every cross-attention gate closed (no image); `base_lm`: the LM as it ships.{decoding_note} "
                 f"Per-sample answers and scores: `samples/{name}.csv`.{source}")
        paths |= _write(table, markdown_table(table, f"{title} ({cfg.dataset.name})", intro), out / name)
        log(f"{name}: " + ", ".join(f"{r['method']} METEOR {r['meteor']:.3f} [{r['meteor_ci_low']:.3f}, "
                                    f"{r['meteor_ci_high']:.3f}]" for _, r in table.iterrows() if r["status"] == "ok"))
        if samples["length"].notna().any():
            by_length.append(length_table(name, samples))
        if name == "vqa":
            fam = family_table(samples)
            tables["vqa_by_family"] = fam
            paths |= _write(fam, markdown_table(fam, f"Open-ended VQA by question family ({cfg.dataset.name})",
                                                "Table 3 broken down by the prompt pack's question families."),
                            out / "vqa_by_family")

    if by_length:
        bl = pd.concat(by_length, ignore_index=True)
        tables["by_length"] = bl
        paths |= _write(bl, markdown_table(bl, f"Text tables by answer length ({cfg.dataset.name})",
                                           "Paper A.7: the same questions asked for a concise and a detailed answer "
                                           "(the length is part of the student prompt)."), out / "by_length")

    # 4. classification: every model on the same test images ------------------------------------------
    from maemi_core.model.category_scoring import SCORINGS, balanced_weights, package_scoring

    class_names = sorted(manifest["label"].unique())
    scoring = package_scoring(model)
    scores_path = stage_dir(cfg, "vision") / "test_scores.parquet"
    vs = pd.read_parquet(scores_path) if scores_path.is_file() else None
    image_ids = classification_images(records, vs, ev.classification_max_images)
    cls_rows, per_class_frames, figures = [], [], {}
    hits: dict[str, np.ndarray] = {}
    weights = np.zeros(0)
    if image_ids:
        wanted = set(image_ids)
        for method, task in CLASSIFICATION_TASKS.items():
            by_image = {r["image_ids"][-1]: r for r in records if r["split"] == "test" and r["task"] == task
                        and r.get("length") != "concise" and r["image_ids"][-1] in wanted}
            if not by_image:
                continue
            recs = [by_image[i] for i in image_ids]
            used += recs
            labels = [r["label"] for r in recs]
            variants = [(method, MAEMI)] + ([(f"{method.removeprefix('maemi_')}:{m}", m) for m in methods[1:]]
                                            if task == "classify_zero_shot" else [])
            for row_name, meth in variants:
                raw = answerer.category_scores(recs, class_names, meth)
                everyway = answerer.scorings(recs, class_names, meth, raw,
                                             calibrated=scoring == "calibrated" or (meth == MAEMI and
                                                                                    task == "classify_zero_shot"))
                sc = everyway[scoring]
                if meth == MAEMI and task == "classify_zero_shot":     # every scoring, beside the model's own
                    for name in SCORINGS:
                        summary, _, _ = likelihood_classification(f"{method}[{name}]", [r["label"] for r in recs],
                                                                  everyway[name], class_names)
                        cls_rows.append(summary)
                generated = gen_recs = None
                if meth == MAEMI:    # the generated answer's category, on a slice: what `maemi ask` would say
                    gen_recs = benchmark_records(recs, task, ev.max_records_per_task)
                    got = answerer.answer(gen_recs, ev.classification_max_new_tokens, desc=f"classification: {method}",
                                          stats=stats)
                    generated = [parse_category(a, class_names) for a in got]
                    pd.DataFrame({"method": method, "record_id": [r["id"] for r in gen_recs],
                                  "image_id": [r["image_ids"][-1] for r in gen_recs],
                                  "label": [r["label"] for r in gen_recs], "answer": got, "parsed": generated}
                                 ).to_csv(out / "samples" / f"classification_{method}_generated.csv", index=False)
                summary, per_class, y_pred = likelihood_classification(
                    row_name, labels, sc, class_names, generated, None if gen_recs is None else [r["label"] for r in gen_recs])
                cls_rows.append(summary)
                per_class_frames.append(per_class)
                hits[row_name] = (y_pred == np.array([class_names.index(x) for x in labels])).astype(float)
                pd.DataFrame({"method": row_name, "record_id": [r["id"] for r in recs], "image_id": image_ids,
                              "label": labels, "predicted": [class_names[i] for i in y_pred],
                              **{f"loglik_{c}": sc[:, j] for j, c in enumerate(class_names)}}
                             ).to_csv(out / "samples" / f"classification_{row_name.replace(':', '_')}.csv", index=False)
                if meth == MAEMI:
                    y = np.array([class_names.index(x) for x in labels])
                    figures[f"confusion_{method}"] = confusion_matrix_figure(
                        y, y_pred, class_names, f"{method} (top-1 {summary['top1']:.3f}, {len(y)} images)",
                        out / "figures" / f"confusion_{method}.png")
        if vs is not None:
            for model_name, group in vs.groupby("model", sort=False):
                g = group.set_index("image_id").reindex(image_ids)
                sc = np.stack(g["scores"].to_numpy())
                labels = list(g["label"])
                summary, per_class, y_pred = likelihood_classification(model_name, labels, sc, class_names,
                                                                       log_likelihoods=False)
                cls_rows.append(summary)
                per_class_frames.append(per_class)
                hits[model_name] = (y_pred == np.array([class_names.index(x) for x in labels])).astype(float)
        label_of = _labels_of(records, image_ids)
        # Always the most frequent train category: what a model that ignores the image at best scores.
        train_labels = manifest.loc[manifest["split"] == "train", "label"]
        if len(train_labels):
            majority = train_labels.value_counts().sort_index().idxmax()
            labels = list(label_of.values())
            if labels:
                onehot = np.zeros((len(labels), len(class_names)))
                onehot[:, class_names.index(majority)] = 1.0
                summary, per_class, y_pred = likelihood_classification("majority", labels, onehot, class_names,
                                                                       log_likelihoods=False)
                cls_rows.append(summary)
                per_class_frames.append(per_class)
                hits["majority"] = (y_pred == np.array([class_names.index(x) for x in labels])).astype(float)
        y_all = np.array([class_names.index(x) for x in label_of.values()])
        weights = balanced_weights(y_all) if len(y_all) else np.zeros(0)
    if cls_rows:
        cls = pd.DataFrame(cls_rows)[CLASSIFICATION_COLUMNS]
        tables["classification"] = cls
        intro = (f"Paper Table 7. Every row on the same {len(image_ids)} test images, `n_images`. MAEMI rows: the "
                 "category whose name the model finds most likely as the answer (log-likelihood of each name after "
                 "the prompt; top-k orders all names), with a 95% bootstrap interval for top-1. `generated_top1`: the "
                 "category parsed from the generated answer on a stable slice of `n_generated` of those images (an "
                 "answer without a category counts as wrong, column `unparsed`). `zero_shot:maemi_gates_closed` and "
                 "`zero_shot:base_lm`: the same scoring without the image / without tuning. "
                 f"Category scores: `{scoring}` (chosen on validation images after training; "
                 "`maemi_zero_shot[raw|mean|calibrated]`: each scoring of the same likelihoods, see "
                 "maemi_core/model/category_scoring.py). `majority`: always the most frequent train category. "
                 "`balanced_accuracy`: mean recall over the categories; `macro_auc`: one-vs-rest ROC AUC of "
                 "the normalised category scores with a 95% bootstrap interval (0.5: the image is not used). "
                 f"Vision rows: `vit_classifier`'s models on the same images.{source}")
        paths |= _write(cls, markdown_table(cls, f"Classification ({cfg.dataset.name})", intro), out / "classification")
        pc = pd.concat(per_class_frames, ignore_index=True).rename(columns={"model": "method"})
        tables["per_class"] = pc
        paths |= _write(pc, f"# Per-class precision / recall / F1 ({cfg.dataset.name})\n\nPaper Table 9; the same "
                        "images as `classification.md`.\n\n" + pc.to_markdown(index=False, floatfmt=".4f") + "\n",
                        out / "per_class")
        if "maemi_zero_shot" in hits:
            rows = []
            for other in [k for k in hits if k != "maemi_zero_shot"]:
                d = paired_difference(hits["maemi_zero_shot"], hits[other])
                rows.append({"table": "classification", "comparison": f"maemi_zero_shot - {other}", "metric": "top1",
                             **d, "excludes_zero": bool(d["ci_low"] > 0 or d["ci_high"] < 0)})
            diffs.append(pd.DataFrame(rows))

    if diffs:
        pdiff = pd.concat([d for d in diffs if len(d)], ignore_index=True) if any(len(d) for d in diffs) else pd.DataFrame()
        if len(pdiff):
            tables["paired_differences"] = pdiff
            paths |= _write(pdiff, f"# Paired differences ({cfg.dataset.name})\n\nMAEMI minus each other method on "
                            "the same records (text) or images (classification top-1), mean and 95% bootstrap interval "
                            "over records; `excludes_zero`: a difference the benchmark can see.\n\n"
                            + pdiff.to_markdown(index=False, floatfmt=".4f") + "\n", out / "paired_differences")

    # 5. qualitative -------------------------------------------------------------------------------
    pool = [s[s["method"] == MAEMI] for n, s in samples_by_table.items() if n in ("captioning", "vqa")]
    pool_df = pd.concat(pool, ignore_index=True) if pool else pd.DataFrame()
    if len(pool_df) and ev.qualitative_samples > 0:
        qual_rows = []
        pool_df = pool_df.assign(_k=pool_df["record_id"].map(stable_key)).sort_values("_k").head(ev.qualitative_samples)
        for _, s in pool_df.iterrows():
            iid = s["image_ids"].split(",")[-1]
            thumb = _thumbnail(answerer.images.paths[iid][0], crop.get(iid, 0), out / "qualitative" / f"{iid[:16]}.png")
            qual_rows.append({"record_id": s["record_id"], "thumbnail": str(thumb.relative_to(out)),
                              "question": s["question"].replace(IMAGE_TOKEN, "").strip(), "teacher_answer": s["reference"],
                              "maemi_answer": s["answer"], "bleu2": s["bleu2"], "rougeL": s["rougeL"], "meteor": s["meteor"]})
        qual = pd.DataFrame(qual_rows)
        tables["qualitative"] = qual
        shown = qual.assign(thumbnail=[f"![{r}]({t})" for r, t in zip(qual["record_id"], qual["thumbnail"])])
        for c in ("question", "teacher_answer", "maemi_answer"):
            shown[c] = shown[c].str.replace("\n", " ").str.replace("|", "/")
        paths |= _write(qual, f"# Qualitative results ({cfg.dataset.name})\n\nPaper Table 10: the image, the question, "
                        "the teacher's answer, MAEMI's answer and per-sample BLEU-2 / ROUGE-L / METEOR.\n\n"
                        + shown.drop(columns=["record_id"]).to_markdown(index=False, floatfmt=".3f") + "\n",
                        out / "qualitative")

    # 6. deploy-any-rank ---------------------------------------------------------------------------
    m = cfg.model
    ranks = ev.rank_sweep or sorted({m.r_min, (m.r_min + m.r_max) // 2, m.r_max})
    sweep_recs = benchmark_records(records, "vqa", ev.rank_sweep_records)
    if sweep_recs:
        sweep_rows = []
        refs = [reference(r) for r in sweep_recs]
        for rank in ranks:
            st = DecodeStats()
            got = answerer.answer(sweep_recs, max_new, rank=rank, desc=f"rank sweep: r={rank}", stats=st)
            sc = score_pairs(got, refs)
            sc.assign(rank=rank, record_id=[r["id"] for r in sweep_recs], answer=got).to_csv(
                out / "samples" / f"rank_sweep_r{rank}.csv", index=False)
            sweep_rows.append({"method": f"maemi@r{rank}", "rank": rank, "n": len(sweep_recs), **mean_std(sc),
                               "tokens_per_s": st.tokens_per_s})
        sweep = pd.DataFrame(sweep_rows)
        tables["rank_sweep"] = sweep
        shown = sweep.copy()
        paths |= _write(sweep, f"# Deploy-any-rank ({cfg.dataset.name})\n\nOne trained DyQLoRA-FA adapter evaluated "
                        f"at ranks {ranks} without retraining, on {len(sweep_recs)} open-ended VQA test records (mean and "
                        "std over records).\n\n" + shown.to_markdown(index=False, floatfmt=".4f") + "\n", out / "rank_sweep")

    if any(n in tables for n in TEXT_TABLES):
        figures["text_metrics"] = text_metrics_figure(tables, out / "figures" / "text_metrics.png")
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
    # Per-record scores of the key metrics, for MAEMI and the untuned LM: what promotion compares
    # paired (maemi_core/registry/model_promotion.py). Classification records are test images.
    score_rows = []
    for name, samples in samples_by_table.items():
        if samples.empty or "record_id" not in samples:
            continue
        for method in (MAEMI, BASE_LM, GATES_CLOSED):
            s = samples[samples["method"] == method]
            for m in METRICS:
                score_rows.append(pd.DataFrame({"method": method, "metric": f"{name}.{m}",
                                                "record_id": s["record_id"].astype(str), "score": s[m].astype(float)}))
    for row_name, method in (("maemi_zero_shot", MAEMI), ("maemi_few_shot", MAEMI), ("zero_shot:base_lm", BASE_LM),
                             ("zero_shot:maemi_gates_closed", GATES_CLOSED), ("majority", "majority")):
        if row_name in hits:
            metric = "classification.few_shot_top1" if row_name == "maemi_few_shot" else "classification.zero_shot_top1"
            score_rows.append(pd.DataFrame({"method": method, "metric": metric, "record_id": list(image_ids),
                                            "score": hits[row_name]}))
            if row_name != "maemi_few_shot" and len(weights) == len(hits[row_name]):
                # per-image hit x weight: its mean over the images is the balanced accuracy (paired comparisons)
                score_rows.append(pd.DataFrame({"method": method, "metric": "classification.zero_shot_balanced_accuracy",
                                                "record_id": list(image_ids), "score": hits[row_name] * weights}))
    if score_rows:
        pd.concat(score_rows, ignore_index=True).to_csv(out / "samples" / "key_scores.csv", index=False)
    records_hash = stable_key("\n".join(sorted(f"{r['id']}\t{reference(r)}" for r in used)))
    from maemi_core.teacher.instruction_set import load_failed

    failed_test = [f for f in load_failed(cfg) if f["split"] == "test"]
    unusable = {"count": len(failed_test), "by_task": pd.Series([f["task"] for f in failed_test], dtype=str).value_counts().to_dict(),
                "errors": pd.Series([f["error"][:120] for f in failed_test], dtype=str).value_counts().head(5).to_dict()}
    if failed_test:
        log(f"{len(failed_test)} test records could not be used: the teacher failed on them (see failed.jsonl)")
    result = BenchmarkResult(tables, paths, key, figures, unavailable_all, stats.tokens_per_s,
                             time.perf_counter() - t_start, records_hash, evaluation_hash(cfg, records_hash))
    (out / "benchmark.json").write_text(json.dumps({
        "key_metrics": key, "model": model_label, "records_hash": records_hash,
        "evaluation_hash": result.evaluation_hash, "unavailable": unavailable_all,
        "evaluation_tokens_per_s": result.evaluation_tokens_per_s, "seconds": result.seconds,
        "records_per_task": ev.max_records_per_task, "classification_images": len(image_ids),
        "inference_numerics": numerics, "category_scoring": scoring,
        "test_records_the_teacher_could_not_answer": unusable}, indent=2, default=float))
    paths["benchmark_json"] = out / "benchmark.json"
    log(f"benchmark done in {result.seconds:.0f} s; maemi decoding {result.evaluation_tokens_per_s:.1f} tokens/s")
    return result
