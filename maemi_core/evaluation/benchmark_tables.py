"""The paper's evaluation (Tables 1, 3-7, 9, 10 and the deploy-any-rank claim of A.1) on the
held-out test split.

Every number traces back to records on disk: the test records are a stable hash slice of the
instruction set's test split (``evaluation.max_records_per_task``), every method answers the
same records, and the per-sample answers and scores are written to ``reports/samples/`` next
to the tables. Answers come from the model's own batched decoder
(:func:`maemi_core.model.generation.generate_answers`), so what is measured is what serves.

Methods in the text tables: ``maemi`` (the registered package at its full rank), ``base_lm``
(the same int8 LM with every gate closed and every adapter zeroed: no vision, no tuning; the
honest lower bound) and each OpenAI-compatible endpoint in ``evaluation.baselines``
(reported as unavailable, not as zero, when it cannot be reached).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from maemi_core.config import MaemiConfig
from maemi_core.evaluation.category_parser import parse_category
from maemi_core.evaluation.classification_metrics import (
    _save, classification_summary, confusion_matrix_figure, per_class_table,
)
from maemi_core.evaluation.external_baselines import ask_baseline
from maemi_core.evaluation.text_metrics import METRICS, format_mean_std, mean_std, score_pairs
from maemi_core.teacher.instruction_set import stable_slice

# table name -> (instruction task, paper table, title)
TEXT_TABLES = {
    "captioning": ("caption", "Table 1", "Image captioning"),
    "vqa": ("vqa", "Table 3", "Open-ended VQA"),
    "vqa_intra_dissimilar": ("intra_dissimilar", "Table 4", "VQA on intra-class dissimilar groups"),
    "vqa_inter_similar": ("inter_similar", "Table 5", "VQA on inter-class similar groups"),
    "vqa_heterogeneity": ("heterogeneity", "Table 6", "VQA on spatial heterogeneity"),
}
CLASSIFICATION_TASKS = {"maemi_zero_shot": "classify_zero_shot", "maemi_few_shot": "classify_few_shot"}
IMAGE_TOKEN = "<image>"


def reports_dir(cfg: MaemiConfig) -> Path:
    return cfg.workdir_path / "reports"


def _stable(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def benchmark_records(records: list[dict], task: str, limit: Optional[int]) -> list[dict]:
    """The test records of ``task`` that every method answers: a stable slice by id hash; for
    VQA round-robin over question families so each family is represented."""
    return stable_slice([r for r in records if r["split"] == "test" and r["task"] == task], limit,
                        lambda r: str(r.get("family") or ""))


def _question(r: dict) -> str:
    return r["conversations"][0]["value"]


def _reference(r: dict) -> str:
    return r["conversations"][-1]["value"]


@dataclass
class DecodeStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


class Answerer:
    """Batched answers of one loaded MAEMI package for instruction records."""

    def __init__(self, model, manifest: pd.DataFrame, batch_size: int):
        from maemi_core.training.maemi_training import ImageStore

        self.model, self.batch_size = model, batch_size
        self.images = ImageStore.from_manifest(manifest, model.cfg.image_size)

    def arrays(self, r: dict) -> list[np.ndarray]:
        return [self.images.get(i) for i in r["image_ids"]]

    def answer(self, records: list[dict], max_new_tokens: int, rank: Optional[int] = None,
               desc: str = "answering", stats: Optional[DecodeStats] = None) -> list[str]:
        from maemi_core.model.generation import generate_answers

        # Similar prompt lengths decode together (less padding); answers go back in input order.
        order = sorted(range(len(records)), key=lambda i: (len(records[i]["image_ids"]), len(_question(records[i]))))
        answers: dict[int, str] = {}
        bar = tqdm(total=len(records), desc=desc, unit="rec", mininterval=2)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            t0 = time.perf_counter()
            counts: list[int] = []
            got = generate_answers(self.model, [_question(records[i]) for i in idx], [self.arrays(records[i]) for i in idx],
                                   max_new_tokens=max_new_tokens, rank=rank, token_counts=counts)
            if stats is not None:
                stats.seconds += time.perf_counter() - t0
                stats.tokens += sum(counts)
            answers.update(zip(idx, got))
            bar.update(len(idx))
        bar.close()
        return [answers[i] for i in range(len(records))]


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


# --- table builders (pure: records + answers in, DataFrames out) ----------------------------------

def text_samples(records: list[dict], answers: dict[str, list[str]]) -> pd.DataFrame:
    """Per-sample scores of every method on the same records."""
    frames = []
    refs = [_reference(r) for r in records]
    for method, got in answers.items():
        scores = score_pairs(got, refs)
        frames.append(pd.DataFrame({
            "method": method, "record_id": [r["id"] for r in records], "family": [r.get("family") for r in records],
            "image_ids": [",".join(r["image_ids"]) for r in records], "question": [_question(r) for r in records],
            "reference": refs, "answer": got}).join(scores))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def text_table(samples: pd.DataFrame, methods: list[str], unavailable: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per method: mean and std of each metric over its samples."""
    rows = []
    for m in methods:
        s = samples[samples["method"] == m] if len(samples) else samples
        rows.append({"method": m, "n": int(len(s)), **mean_std(s), "status": "ok"})
    for m, why in (unavailable or {}).items():
        rows.append({"method": m, "n": 0, **{k: float("nan") for k in METRICS}, **{f"{k}_std": float("nan") for k in METRICS},
                     "status": f"unavailable: {why}"})
    cols = ["method", "n", *[c for k in METRICS for c in (k, f"{k}_std")], "status"]
    return pd.DataFrame(rows, columns=cols)


def family_table(samples: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (method, family), s in samples.groupby(["method", "family"], sort=True):
        rows.append({"method": method, "family": family, "n": int(len(s)), **mean_std(s)})
    return pd.DataFrame(rows)


def classification_rows(name: str, labels: list[str], predicted: list[Optional[str]], ranking_scores: np.ndarray,
                        class_names: list[str]) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Summary row and per-class table for parsed answers. ``ranking_scores`` (n, C) orders the
    other categories after the parsed one for top-k; an unparsed answer is wrong at every k."""
    from sklearn.metrics import f1_score

    index = {c: i for i, c in enumerate(class_names)}
    y = np.array([index[lab] for lab in labels], dtype=int)
    y_pred = np.array([index[p] if p is not None else -1 for p in predicted], dtype=int)
    k = min(5, len(class_names))
    hits = []
    for i in range(len(y)):
        if y_pred[i] < 0:
            hits.append(False)
            continue
        others = [c for c in np.argsort(-np.asarray(ranking_scores[i], dtype=float), kind="stable") if c != y_pred[i]]
        hits.append(y[i] in ([y_pred[i]] + others)[:k])
    labels_idx = np.arange(len(class_names))
    summary = {
        "model": name,
        "top1": float((y_pred == y).mean()) if len(y) else float("nan"),
        "top5": float(np.mean(hits)) if len(y) else float("nan"),
        "top5_k": k,
        "macro_f1": float(f1_score(y, y_pred, labels=labels_idx, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y, y_pred, labels=labels_idx, average="weighted", zero_division=0)),
        "n_test": int(len(y)),
        "unparsed": int((y_pred < 0).sum()),
    }
    return summary, per_class_table(name, y, y_pred, class_names), y_pred


def markdown_table(df: pd.DataFrame, title: str, intro: str) -> str:
    shown = df.copy()
    for m in METRICS:
        if m in shown:
            shown[m] = [format_mean_std(r, m) for _, r in df.iterrows()]
            shown = shown.drop(columns=[f"{m}_std"])
    return f"# {title}\n\n{intro}\n\n" + shown.to_markdown(index=False, floatfmt=".4f") + "\n"


def _write(df: pd.DataFrame, md: str, base: Path) -> dict[str, Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(base.with_suffix(".csv"), index=False)
    base.with_suffix(".md").write_text(md)
    return {f"{base.name}_csv": base.with_suffix(".csv"), f"{base.name}_md": base.with_suffix(".md")}


def text_metrics_figure(tables: dict[str, pd.DataFrame], path: Path) -> Path:
    import matplotlib.pyplot as plt

    names = [n for n in TEXT_TABLES if n in tables]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        t = tables[name][tables[name]["status"] == "ok"]
        x = np.arange(len(METRICS))
        width = 0.8 / max(1, len(t))
        for j, (_, row) in enumerate(t.iterrows()):
            ax.bar(x + j * width, [row[m] for m in METRICS], width, yerr=[row[f"{m}_std"] for m in METRICS],
                   label=row["method"], capsize=2)
        ax.set_xticks(x + 0.4 - width / 2, METRICS, rotation=60, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Text metrics on the test records (mean ± std)")
    return _save(fig, path)


def _thumbnail(path: str, crop: int, out: Path, size: int = 96) -> Path:
    from PIL import Image

    from maemi_core.data.image_io import load_rgb_uint8

    arr = load_rgb_uint8(path)
    if crop:
        arr = arr[: arr.shape[0] - crop]
    im = Image.fromarray(arr)
    im.thumbnail((size, size))
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    return out


# --- the benchmark ----------------------------------------------------------------------------

def run_benchmark(cfg: MaemiConfig, manifest: pd.DataFrame, records: list[dict], package_dir: str | Path,
                  log: Callable[[str], None] = lambda m: None, model_label: str = "",
                  out_dir: Optional[Path] = None) -> BenchmarkResult:
    from maemi_core.model.generation import candidate_log_likelihoods
    from maemi_core.model.maemi_model import load_package

    t_start = time.perf_counter()
    ev = cfg.evaluation
    out = out_dir or reports_dir(cfg)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    model = load_package(package_dir, cfg.model.lm_cache and str(cfg.resolve(cfg.model.lm_cache)))
    answerer = Answerer(model, manifest, ev.batch_size)
    crop = {iid: c for iid, (_, c) in answerer.images.paths.items()}
    max_new = cfg.model.max_new_tokens
    stats = DecodeStats()
    tables: dict[str, pd.DataFrame] = {}
    paths: dict[str, Path] = {}
    unavailable_all: dict[str, str] = {}
    samples_by_table: dict[str, pd.DataFrame] = {}
    source = f" Model: {model_label}." if model_label else ""
    used: list[dict] = []          # every record any table uses: their hash says "same records"

    # 1-3. text tables ---------------------------------------------------------------------------
    for name, (task, paper_table, title) in TEXT_TABLES.items():
        recs = benchmark_records(records, task, ev.max_records_per_task)
        if not recs:
            log(f"{name}: no test records for task {task}; table skipped")
            continue
        used += recs
        answers = {"maemi": answerer.answer(recs, max_new, desc=f"{name}: maemi", stats=stats)}
        if ev.no_vision_baseline:
            with model.base_lm_only():
                answers["base_lm"] = answerer.answer(recs, max_new, desc=f"{name}: base_lm")
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
        intro = (f"Paper {paper_table}. {len(recs)} test records of task `{task}` (a stable hash slice), the same for "
                 f"every method; mean ± standard deviation over samples. Per-sample answers and scores: "
                 f"`samples/{name}.csv`.{source}")
        paths |= _write(table, markdown_table(table, f"{title} ({cfg.dataset.name})", intro), out / name)
        log(f"{name}: " + ", ".join(f"{r['method']} METEOR {r['meteor']:.3f}" for _, r in table.iterrows()
                                    if r["status"] == "ok"))
        if name == "vqa":
            fam = family_table(samples)
            tables["vqa_by_family"] = fam
            paths |= _write(fam, markdown_table(fam, f"Open-ended VQA by question family ({cfg.dataset.name})",
                                                "Table 3 broken down by the prompt pack's question families."),
                            out / "vqa_by_family")

    # 4. classification ----------------------------------------------------------------------------
    class_names = sorted(manifest["label"].unique())
    cls_rows, per_class_frames, figures = [], [], {}
    query_ids: list[str] = []
    for method, task in CLASSIFICATION_TASKS.items():
        recs = benchmark_records(records, task, ev.max_records_per_task)
        if not recs:
            continue
        used += recs
        got = answerer.answer(recs, ev.classification_max_new_tokens, desc=f"classification: {method}", stats=stats)
        predicted = [parse_category(a, class_names) for a in got]
        ll = candidate_log_likelihoods(model, [_question(r) for r in recs], [answerer.arrays(r) for r in recs],
                                       class_names)
        summary, per_class, y_pred = classification_rows(method, [r["label"] for r in recs], predicted, ll, class_names)
        cls_rows.append(summary)
        per_class_frames.append(per_class)
        pd.DataFrame({"method": method, "record_id": [r["id"] for r in recs], "image_id": [r["image_ids"][-1] for r in recs],
                      "label": [r["label"] for r in recs], "answer": got, "parsed": predicted}
                     ).to_csv(out / "samples" / f"classification_{method}.csv", index=False)
        y = np.array([class_names.index(r["label"]) for r in recs])
        figures[f"confusion_{method}"] = confusion_matrix_figure(
            y, y_pred, class_names, f"{method} (top-1 {summary['top1']:.3f}, {summary['unparsed']} unparsed)",
            out / "figures" / f"confusion_{method}.png")
        query_ids = query_ids or [r["image_ids"][-1] for r in recs]
    scores_path = cfg.workdir_path / "vision" / "test_scores.parquet"
    if scores_path.is_file() and query_ids:
        vs = pd.read_parquet(scores_path)
        for model_name, group in vs.groupby("model", sort=False):
            g = group.set_index("image_id").reindex(query_ids).dropna(subset=["label"])
            if g.empty:
                continue
            y = np.array([class_names.index(lab) for lab in g["label"]])
            sc = np.stack(g["scores"].to_numpy())
            summary = classification_summary(model_name, y, sc, class_names)
            cls_rows.append(summary | {"unparsed": 0})
            per_class_frames.append(per_class_table(model_name, y, sc.argmax(1), class_names))
    if cls_rows:
        cls = pd.DataFrame(cls_rows).rename(columns={"model": "method"})
        cls = cls[["method", "top1", "top5", "top5_k", "macro_f1", "weighted_f1", "n_test", "unparsed"]]
        tables["classification"] = cls
        intro = (f"Paper Table 7. Every row on the same {len(query_ids)} test images (the query images of the "
                 "classification records). MAEMI rows: the category parsed from the generated answer (an answer "
                 "without a category counts as wrong, column `unparsed`); top-k orders the remaining categories by "
                 "the model's likelihood of each name as the answer. Baselines: `vit_classifier`'s models; their "
                 f"figures on the whole test split are in `vision/classification.md`.{source}")
        paths |= _write(cls, f"# Classification ({cfg.dataset.name})\n\n{intro}\n\n"
                        + cls.to_markdown(index=False, floatfmt=".4f") + "\n", out / "classification")
        pc = pd.concat(per_class_frames, ignore_index=True).rename(columns={"model": "method"})
        tables["per_class"] = pc
        paths |= _write(pc, f"# Per-class precision / recall / F1 ({cfg.dataset.name})\n\nPaper Table 9; the same "
                        "records as `classification.md`.\n\n" + pc.to_markdown(index=False, floatfmt=".4f") + "\n",
                        out / "per_class")

    # 5. qualitative -------------------------------------------------------------------------------
    qual_rows = []
    pool = [s[s["method"] == "maemi"] for n, s in samples_by_table.items() if n in ("captioning", "vqa")]
    pool_df = pd.concat(pool, ignore_index=True) if pool else pd.DataFrame()
    if len(pool_df):
        pool_df = pool_df.assign(_k=pool_df["record_id"].map(_stable)).sort_values("_k").head(ev.qualitative_samples)
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
    sweep_rows = []
    if sweep_recs:
        refs = [_reference(r) for r in sweep_recs]
        for rank in ranks:
            st = DecodeStats()
            got = answerer.answer(sweep_recs, max_new, rank=rank, desc=f"rank sweep: r={rank}", stats=st)
            sc = score_pairs(got, refs)
            sc.assign(rank=rank, record_id=[r["id"] for r in sweep_recs], answer=got).to_csv(
                out / "samples" / f"rank_sweep_r{rank}.csv", index=False)
            sweep_rows.append({"method": f"maemi@r{rank}", "rank": rank, "n": len(sweep_recs), **mean_std(sc),
                               "tokens_per_s": st.tokens_per_s})
        from maemi_core.model.dyqlora_fa import set_deploy_rank

        set_deploy_rank(model, m.r_max)
        sweep = pd.DataFrame(sweep_rows)
        tables["rank_sweep"] = sweep
        paths |= _write(sweep, markdown_table(sweep, f"Deploy-any-rank ({cfg.dataset.name})",
                                              f"One trained DyQLoRA-FA adapter evaluated at ranks {ranks} without "
                                              f"retraining, on {len(sweep_recs)} open-ended VQA test records."),
                        out / "rank_sweep")

    if any(n in tables for n in TEXT_TABLES):
        figures["text_metrics"] = text_metrics_figure(tables, out / "figures" / "text_metrics.png")
    key = {}
    for name in TEXT_TABLES:
        t = tables.get(name)
        if t is not None and (t["method"] == "maemi").any():
            row = t[t["method"] == "maemi"].iloc[0]
            key |= {f"{name}.{k}": float(row[k]) for k in METRICS}
    if "classification" in tables:
        c = tables["classification"].set_index("method")
        for method in CLASSIFICATION_TASKS:
            if method in c.index:
                key[f"classification.{method.removeprefix('maemi_')}_top1"] = float(c.loc[method, "top1"])
    records_hash = _stable("\n".join(sorted(f"{r['id']}\t{_reference(r)}" for r in used)))
    result = BenchmarkResult(tables, paths, key, figures, unavailable_all, stats.tokens_per_s,
                             time.perf_counter() - t_start, records_hash)
    (out / "benchmark.json").write_text(json.dumps({
        "key_metrics": key, "model": model_label, "records_hash": records_hash, "unavailable": unavailable_all,
        "evaluation_tokens_per_s": result.evaluation_tokens_per_s, "seconds": result.seconds,
        "records_per_task": ev.max_records_per_task}, indent=2, default=float))
    paths["benchmark_json"] = out / "benchmark.json"
    log(f"benchmark done in {result.seconds:.0f} s; maemi decoding {result.evaluation_tokens_per_s:.1f} tokens/s")
    return result


ASSET = "benchmark_tables"


def benchmark_registered_model(cfg: MaemiConfig, manifest: pd.DataFrame, records: list[dict], tracker=None,
                               log: Callable[[str], None] = lambda m: None, alias: str = "challenger",
                               out_dir: Optional[Path] = None) -> dict:
    """Evaluate ``models:/maemi-<dataset>@<alias>`` (the exact registered artifact) and record
    the result: one MLflow run with the key metrics and every report, and the key metrics as
    ``benchmark.*`` tags on the model version (what promotion compares). Without tracking, the
    package that ``maemi_model`` last wrote is evaluated."""
    if tracker is None:
        result = run_benchmark(cfg, manifest, records, cfg.workdir_path / "model" / "package", log, "local package")
        return {"result": result, "version": None, "registered_model": None, "mlflow_run_id": None}
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    from maemi_core.registry.model_registry import download_package, registered_model_name

    name = registered_model_name(cfg.dataset.name)
    with tracker.run(ASSET if alias == "challenger" else f"{ASSET}-{alias}") as active, \
            tempfile.TemporaryDirectory() as tmp:
        package, version = download_package(name, alias, tmp)
        log(f"evaluating {name} version {version} (@{alias})")
        result = run_benchmark(cfg, manifest, records, package, log, f"{name} version {version} (@{alias})", out_dir)
        mlflow.log_params({"registered_model": name, "model_version": version, "alias": alias,
                           "records_per_task": cfg.evaluation.max_records_per_task,
                           "baselines": ",".join(b.name for b in cfg.evaluation.baselines) or "none"})
        mlflow.log_metrics({k.replace(".", "/"): v for k, v in result.key_metrics.items() if np.isfinite(v)}
                           | {"evaluation_tokens_per_s": result.evaluation_tokens_per_s})
        mlflow.log_artifacts(str(out_dir or reports_dir(cfg)), artifact_path="reports")
        client = MlflowClient()
        for k, v in result.key_metrics.items():
            client.set_model_version_tag(name, version, f"benchmark.{k}", f"{v:.6f}")
        client.set_model_version_tag(name, version, "benchmark.mlflow_run_id", active.info.run_id)
        client.set_model_version_tag(name, version, "benchmark.records_hash", result.records_hash)
        client.set_model_version_tag(name, version, "benchmark.records_per_task",
                                     str(cfg.evaluation.max_records_per_task))
        return {"result": result, "version": version, "registered_model": name, "mlflow_run_id": active.info.run_id}
