"""Evaluation throughput of benchmark_tables on this machine.

    .venv/bin/python bench/evaluation_throughput.py [--package .maemi/elpv/model/package] [--records 16]

Uses a trained MAEMI package (``make demo`` writes one; with none, the untrained default model
is built) and real ELPV instruction records of the workdir: decoding tokens/s of the model's
batched generator at batch 1 and at the evaluation batch size, for single-image VQA and
5-image few-shot prompts, and the text-metric scorers' throughput (pairs/s).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--package", default=None)
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    package = Path(args.package) if args.package else cfg.workdir_path / "model" / "package"
    if package.is_dir():
        from maemi_core.model.maemi_model import load_package
        model = load_package(package)
    else:
        from maemi_core.model.maemi_model import build_model
        print(f"no package at {package}: timing the untrained model")
        model = build_model(cfg).eval()
    records = load_instruction_set(cfg)
    answerer = Answerer(model, load_manifest(cfg), cfg.evaluation.batch_size)
    print(f"torch {torch.__version__}, {args.threads} threads, max_new_tokens {cfg.model.max_new_tokens}")
    print(f"{'prompts':<22}{'batch':>6}{'records':>9}{'tokens':>8}{'tokens/s':>10}{'s/record':>10}")
    for task in ("vqa", "classify_few_shot"):
        recs = benchmark_records(records, task, args.records)
        for batch in (1, cfg.evaluation.batch_size):
            answerer.batch_size = batch
            st = DecodeStats()
            answerer.answer(recs, cfg.model.max_new_tokens, stats=st, desc=f"{task} b{batch}")
            print(f"{task:<22}{batch:>6}{len(recs):>9}{st.tokens:>8}{st.tokens_per_s:>10.1f}{st.seconds / len(recs):>10.2f}")
    recs = [r for r in records if r["split"] == "test"][:200]
    preds = [r["conversations"][-1]["value"][::-1] for r in recs]      # a deterministic, partly overlapping text
    score_pairs(preds[:2], preds[:2])                                   # load the metric modules once
    t0 = time.perf_counter()
    score_pairs(preds, [r["conversations"][-1]["value"] for r in recs])
    print(f"text metrics (6 scores per pair): {len(recs) / (time.perf_counter() - t0):.1f} pairs/s")


if __name__ == "__main__":
    main()
