"""Two or more trained packages side by side on the validation split (never test): did a change
of the training recipe help?

    .venv/bin/python bench/compare_packages.py --package before=DIR --package after=DIR
        [--config configs/default.yaml] [--records 32] [--tasks caption,vqa] [--images 0] [--threads 2]
        [--numerics NAME=KERNEL]

``--numerics NAME=KERNEL`` serves package NAME in another int8 numerics than its own choice
(``weight_only_int8``, ``weight_only_int8_bf16``, ``dynamic_int8``): one package given twice,
``--package fp32=DIR --package bf16=DIR --numerics fp32=weight_only_int8 --numerics
bf16=weight_only_int8_bf16``, compares two serving numerics of the same weights. The seconds
each package spends on the category likelihoods and on the greedy answers are printed beside
its scores.

Every package answers the same validation records of the profile's instruction set:

- **classification**: every validation zero-shot image, the detailed question the benchmark
  scores, category likelihoods at the package's deployment rank
  (:func:`maemi_core.model.category_scoring.record_scores`). Reported raw and as the ``fitted``
  matrix scaling judged out of fold (nested cross-validation, as ``maemi_model`` judges it; mean
  of three fold seeds): top-1, balanced accuracy, macro AUC, log-loss, and the one-vs-rest AUC
  of each category.
- **text**: ``--records`` validation records of each of ``--tasks`` (the benchmark's stable
  slice), greedy answers, METEOR against the teacher's answer.

For every package after the first, the paired difference to the first on the same images and
records, with a 95% bootstrap interval: macro AUC and log-loss of the raw and of the
out-of-fold ``fitted`` scores (fold seed 0; images resampled), top-1 of the fitted scores, METEOR
per task (records resampled). A recipe change is
kept when these say so; the test split is not read.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np

from maemi_core.threads import use_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--package", action="append", required=True, help="NAME=DIR (at least two; the first is the baseline)")
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--images", type=int, default=0, help="the first N validation images by record id (0: all)")
    ap.add_argument("--tasks", default="caption,vqa")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numerics", action="append", default=[], help="NAME=KERNEL: serve package NAME in KERNEL")
    args = ap.parse_args()
    packages = [p.split("=", 1) for p in args.package]
    if len(packages) < 2 or any(len(p) != 2 for p in packages):
        ap.error("give at least two packages as --package NAME=DIR")
    numerics = dict(n.split("=", 1) for n in args.numerics)
    if set(numerics) - {name for name, _ in packages}:
        ap.error(f"--numerics names {sorted(set(numerics) - {n for n, _ in packages})}: no --package of that name")

    from maemi_core.config import load_config
    from maemi_core.data.manifest import load_manifest
    from maemi_core.evaluation.answering import Answerer, benchmark_records, reference
    from maemi_core.evaluation.benchmark_tables import paired_difference
    from maemi_core.evaluation.text_metrics import score_pairs
    from maemi_core.model.category_scoring import (fitted_folds, log_softmax, out_of_fold_fitted,
                                                   paired_macro_auc_difference, per_class_auc, record_scores,
                                                   validation_metrics, validation_records)
    from maemi_core.model.generation import DecodingConfig
    from maemi_core.model.dyqlora_fa import set_inference_kernel
    from maemi_core.model.maemi_model import load_package
    from maemi_core.teacher.instruction_set import load_instruction_set
    from maemi_core.training.maemi_training import ImageStore, MediaCache

    use_threads(args.threads)
    cfg = load_config(args.config)
    manifest = load_manifest(cfg)
    records = load_instruction_set(cfg)
    classes = sorted(manifest["label"].unique())
    detailed = validation_records(records, classes)[:args.images or None]
    y = np.array([classes.index(r["label"]) for r in detailed])
    if fitted_folds(y, len(classes)) == 0:
        raise SystemExit(f"categories {dict(zip(classes, np.bincount(y, minlength=len(classes)).tolist()))} in these "
                         "validation images: the fitted scoring needs at least 3 of each; use more --images")
    text = {t: benchmark_records(records, t, args.records, split="val") for t in args.tasks.split(",")}
    print(f"{len(detailed)} validation images {dict(zip(classes, np.bincount(y, minlength=len(classes)).tolist()))}; "
          + ", ".join(f"{len(v)} {t} records" for t, v in text.items()), flush=True)
    stores: dict[int, ImageStore] = {}     # each package reads images at the size it was trained on

    got: dict[str, dict] = {}
    for name, path in packages:
        t0 = time.perf_counter()
        model = load_package(path, cfg.model.lm_cache and str(cfg.resolve(cfg.model.lm_cache)))
        if name in numerics:
            set_inference_kernel(model, numerics[name])
        kernel = numerics.get(name) or model.package_meta.get("inference_kernel") or "weight_only_int8"
        size = model.cfg.image_size
        media = MediaCache(model, stores.setdefault(size, ImageStore.from_manifest(manifest, size)))
        media.ensure([i for r in detailed for i in r["image_ids"]])   # visual tokens first: not in the timings
        t_cls = time.perf_counter()
        raw = record_scores(model, detailed, classes, lambda rs: media.stacked([r["image_ids"] for r in rs]),
                            cfg.evaluation.batch_size)
        t_cls = time.perf_counter() - t_cls
        oof = [out_of_fold_fitted(raw, y, seed) for seed in range(3)]
        answerer = Answerer(model, manifest, cfg.evaluation.batch_size,
                            DecodingConfig(cfg.evaluation.repetition_penalty, cfg.evaluation.no_repeat_ngram_size))
        t_text = time.perf_counter()
        answers = {t: answerer.answer(recs, cfg.model.max_new_tokens, desc=f"{name}: {t}") for t, recs in text.items()}
        t_text = time.perf_counter() - t_text
        meteor = {t: score_pairs(answers[t], [reference(r) for r in recs])["meteor"].to_numpy()
                  for t, recs in text.items()}
        got[name] = {"raw": raw, "oof": oof, "meteor": meteor, "answers": answers}
        per_seed = [validation_metrics(y, o) for o in oof]
        fitted = {k: float(np.mean([m[k] for m in per_seed])) for k in per_seed[0]}
        per_class = dict(zip(classes, np.mean([per_class_auc(y, o) for o in oof], axis=0).tolist()))
        got[name]["summary"] = {"numerics": kernel, "raw": validation_metrics(y, raw), "fitted": fitted,
                                "fitted_per_class_auc": per_class,
                                "meteor": {t: float(v.mean()) for t, v in meteor.items()},
                                "seconds_category_likelihoods": t_cls, "seconds_greedy_answers": t_text}
        s = got[name]["summary"]
        print(f"{name}: raw top-1 {s['raw']['top1']:.3f} AUC {s['raw']['macro_auc']:.3f} log-loss {s['raw']['log_loss']:.3f} | "
              f"fitted (out of fold) top-1 {fitted['top1']:.3f} BA {fitted['balanced_accuracy']:.3f} "
              f"AUC {fitted['macro_auc']:.3f} log-loss {fitted['log_loss']:.3f} | per-category AUC "
              + " ".join(f"{c} {v:.3f}" for c, v in per_class.items()) + " | METEOR "
              + " ".join(f"{t} {v:.3f}" for t, v in s["meteor"].items())
              + f" | {kernel}: category likelihoods {t_cls:.0f} s, greedy answers {t_text:.0f} s"
              f" ({time.perf_counter() - t0:.0f} s in all)", flush=True)
        del model, media, answerer
        gc.collect()

    base_name = packages[0][0]
    base = got[base_name]
    nll = lambda o: -log_softmax(o)[np.arange(len(y)), y]   # noqa: E731
    diffs = {}
    for name, _ in packages[1:]:
        g = got[name]
        d = {"raw_macro_auc": paired_macro_auc_difference(y, g["raw"], base["raw"]),
             "raw_log_loss": paired_difference(nll(g["raw"]), nll(base["raw"])),
             "fitted_macro_auc": paired_macro_auc_difference(y, g["oof"][0], base["oof"][0]),
             "fitted_log_loss": paired_difference(nll(g["oof"][0]), nll(base["oof"][0])),
             "fitted_top1": paired_difference(g["oof"][0].argmax(1) == y, base["oof"][0].argmax(1) == y),
             **{f"meteor_{t}": paired_difference(g["meteor"][t], base["meteor"][t]) for t in text}}
        same = {t: float(np.mean([a == b for a, b in zip(g["answers"][t], base["answers"][t])])) for t in text}
        d["identical_answers"] = same
        diffs[name] = d
        print(f"{name} - {base_name}: identical greedy answers " + ", ".join(f"{t} {v:.0%}" for t, v in same.items()))
        print(f"{name} - {base_name}: " + "; ".join(f"{k} {v['diff']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
                                                  for k, v in d.items() if k != "identical_answers"), flush=True)
    print(json.dumps({"n_images": len(y), "n_text": {t: len(v) for t, v in text.items()},
                      "packages": {n: got[n]["summary"] for n, _ in packages}, "differences": diffs}))


if __name__ == "__main__":
    main()
