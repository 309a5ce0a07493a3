"""Evaluation throughput of benchmark_tables on this machine.

    .venv/bin/python bench/evaluation_throughput.py [--package .maemi/elpv/model/package] [--records 16]
        [--numerics weight_only_int8|weight_only_int8_bf16|dynamic_int8]

Uses a trained MAEMI package (``make demo`` writes one; with none, the untrained default model
is built) and real ELPV instruction records of the workdir: decoding tokens/s of the model's
batched generator at batch 1 and at the evaluation batch size, for single-image VQA and
5-image few-shot prompts; seconds per test image of the classification table's category-name
likelihoods (zero-shot and few-shot prompts, ``--classification-records`` each, at the
evaluation batch size, visual tokens computed beforehand as the benchmark's memo has them);
and the text-metric scorers' throughput (pairs/s). ``--numerics`` serves the package in other
int8 numerics than its own choice (the same weights).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from maemi_core.config import load_config
from maemi_core.data.manifest import load_manifest
from maemi_core.evaluation.answering import Answerer, DecodeStats, benchmark_records
from maemi_core.evaluation.text_metrics import score_pairs
from maemi_core.teacher.instruction_set import load_instruction_set
from maemi_core.threads import use_threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--package", default=None)
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--classification-records", type=int, default=64)
    ap.add_argument("--parts", default="decoding,likelihoods,metrics", help="which of the three measurements to run")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--numerics", default=None, help="serve the package in these int8 numerics instead of its own")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"decoding", "likelihoods", "metrics"}:
        raise SystemExit(f"--parts {args.parts}: choose from decoding, likelihoods, metrics")
    use_threads(args.threads)          # subnormals flushed before torch starts its threads
    cfg = load_config(args.config)
    package = Path(args.package) if args.package else cfg.workdir_path / "model" / "package"
    if package.is_dir():
        from maemi_core.model.maemi_model import load_package
        model = load_package(package)
        if args.numerics:
            from maemi_core.model.dyqlora_fa import set_inference_kernel
            set_inference_kernel(model, args.numerics)
    else:
        from maemi_core.model.maemi_model import build_model
        from maemi_core.vision.classifiers import vit_dir
        print(f"no package at {package}: timing the untrained model")
        model = build_model(cfg, vit_dir(cfg)).eval()
    records = load_instruction_set(cfg)
    manifest = load_manifest(cfg)
    answerer = Answerer(model, manifest, cfg.evaluation.batch_size)
    numerics = args.numerics or getattr(model, "package_meta", {}).get("inference_kernel") or "weight_only_int8"
    print(f"torch {torch.__version__}, {args.threads} threads, max_new_tokens {cfg.model.max_new_tokens}, "
          f"int8 numerics {numerics}")
    if "decoding" in parts:
        print(f"{'prompts':<22}{'batch':>6}{'records':>9}{'tokens':>8}{'tokens/s':>10}{'s/record':>10}")
    for task in ("vqa", "classify_few_shot") if "decoding" in parts else ():
        recs = benchmark_records(records, task, args.records)
        for batch in (1, cfg.evaluation.batch_size):
            answerer.batch_size = batch
            st = DecodeStats()
            answerer.answer(recs, cfg.model.max_new_tokens, stats=st, desc=f"{task} b{batch}")
            print(f"{task:<22}{batch:>6}{len(recs):>9}{st.tokens:>8}{st.tokens_per_s:>10.1f}{st.seconds / len(recs):>10.2f}")
    class_names = sorted(manifest["label"].unique())
    for task in ("classify_zero_shot", "classify_few_shot") if "likelihoods" in parts else ():
        recs = [r for r in records if r["split"] == "test" and r["task"] == task
                and r.get("length") != "concise"][: args.classification_records]
        answerer.batch_size = cfg.evaluation.batch_size
        answerer.media.ensure(i for r in recs for i in r["image_ids"])
        answerer.category_scores(recs[:1], class_names)                  # one-time costs (merged weights)
        t0 = time.perf_counter()
        answerer.category_scores(recs, class_names)
        dt = time.perf_counter() - t0
        print(f"category likelihoods, {task}: {len(recs)} images at batch {answerer.batch_size}, "
              f"{dt / max(len(recs), 1):.3f} s/image")
    if "metrics" not in parts:
        return
    recs = [r for r in records if r["split"] == "test"][:200]
    preds = [r["conversations"][-1]["value"][::-1] for r in recs]      # a deterministic, partly overlapping text
    score_pairs(preds[:2], preds[:2])                                   # load the metric modules once
    t0 = time.perf_counter()
    score_pairs(preds, [r["conversations"][-1]["value"] for r in recs])
    print(f"text metrics (6 scores per pair): {len(recs) / (time.perf_counter() - t0):.1f} pairs/s")


if __name__ == "__main__":
    main()
