"""How a trained package's category scores are best read, measured on validation images only.

    .venv/bin/python bench/category_scoring.py [--config configs/default.yaml] [--package DIR]
        [--images 0] [--threads 2] [--task classify_zero_shot] [--head [--train-images 0]]

For every validation zero-shot image (``--task classify_few_shot``: every validation few-shot
prompt, demonstrations first; ``--images N``: the first N by record id; 0: all) this
scores the category names (:func:`maemi_core.model.category_scoring.record_scores`) under
several readouts of the same package:

- ``trained``: the detailed classification question the package answers (what the benchmark
  scores), at the package's deployment rank;
- ``concise``: the same image with the concise question;
- ``hflip`` / ``vflip``: the image mirrored (test-time augmentation candidates);
- ``rank<r>``: the adapters merged at DyQLoRA-FA rank r_min and at the middle rank;
- ``ensemble:*``: the mean log-softmax of several of these.

and prints, per readout, top-1, balanced accuracy, macro AUC and log-loss of the raw scores, and
of the ``fitted`` matrix scaling judged out of fold (nested cross-validation, as
``maemi_model`` judges it; mean of three fold seeds). ``--head``: only ``trained``, beside the
``head`` scoring (a logistic regression on the answer-position hidden state, fitted on the train
prompts, ``--train-images N``: the first N; read on the validation prompts, and on the train
prompts it was fitted on, to show the gap). Nothing here touches test images. A readout
earns a place in the pipeline only if it beats ``trained`` here.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from maemi_core.threads import use_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--package", default=None)
    ap.add_argument("--images", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task", choices=["classify_zero_shot", "classify_few_shot"], default="classify_zero_shot")
    ap.add_argument("--head", action="store_true",
                    help="only the trained question, read raw, fitted and by the head scoring (fitted on "
                         "the train prompts' hidden states, judged on the validation prompts)")
    ap.add_argument("--train-images", type=int, default=0, help="--head: fit on the first N train prompts (0: all)")
    args = ap.parse_args()

    from maemi_core.config import load_config
    from maemi_core.data.transforms import view_id
    from maemi_core.data.manifest import load_manifest
    from maemi_core.model.category_scoring import (apply_head, fit_head, fitted_folds, log_softmax,
                                                   out_of_fold_fitted, record_scores, train_records,
                                                   validation_metrics, validation_records)
    from maemi_core.model.maemi_model import load_package
    from maemi_core.teacher.instruction_set import load_instruction_set
    from maemi_core.training.maemi_training import ImageStore, MediaCache

    use_threads(args.threads)
    cfg = load_config(args.config)
    manifest = load_manifest(cfg)
    records = load_instruction_set(cfg)
    model = load_package(args.package or str(cfg.workdir_path / "model" / "package"),
                         cfg.model.lm_cache and str(cfg.resolve(cfg.model.lm_cache)))
    classes = sorted(manifest["label"].unique())
    detailed = validation_records(records, classes, args.task)[:args.images or None]
    concise = {r["image_ids"][-1]: r for r in records if r["split"] == "val" and r["task"] == args.task
               and r.get("length") == "concise"}
    y = y_true = np.array([classes.index(r["label"]) for r in detailed])
    print(f"{len(detailed)} validation {args.task} prompts; categories "
          f"{dict(zip(classes, np.bincount(y, minlength=len(classes)).tolist()))}")

    def mirrored(recs: list[dict], view: str) -> list[dict]:     # every image of each prompt, in that view
        return [{**r, "image_ids": [view_id(i, view) for i in r["image_ids"]]} for r in recs]

    base = ImageStore.from_manifest(manifest, cfg.vision.image_size)

    def scores(recs, store, rank=None) -> np.ndarray:
        media = MediaCache(model, store)
        return record_scores(model, recs, classes, lambda rs: media.stacked([r["image_ids"] for r in rs]),
                             cfg.evaluation.batch_size, rank)

    mid = (cfg.model.r_min + cfg.model.r_max) // 2
    readouts: dict[str, np.ndarray] = {}
    if args.head:
        media = MediaCache(model, base)
        media_of = lambda rs: media.stacked([r["image_ids"] for r in rs])   # noqa: E731
        train = train_records(records, classes, args.task)[:args.train_images or None]
        y_train = np.array([classes.index(r["label"]) for r in train])
        t0 = time.perf_counter()
        readouts["trained"], h_val = record_scores(model, detailed, classes, media_of, cfg.evaluation.batch_size,
                                                   return_hidden=True)
        print(f"  scored {len(detailed)} validation prompts in {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        raw_train, h_train = record_scores(model, train, classes, media_of, cfg.evaluation.batch_size,
                                           return_hidden=True)
        print(f"  scored {len(train)} train prompts in {time.perf_counter() - t0:.0f} s "
              f"(train raw AUC {validation_metrics(y_train, raw_train)['macro_auc']:.3f})", flush=True)
        t0 = time.perf_counter()
        head = fit_head(h_train, y_train, len(classes))
        print(f"  head fitted in {time.perf_counter() - t0:.0f} s, C {head['C']}", flush=True)
        readouts["head"] = apply_head(h_val, head)
        readouts["head:train-fit-on-train"] = apply_head(h_train, head)
        y_all = {"head:train-fit-on-train": y_train}
    else:
        y_all = {}
    plan = [] if args.head else [("trained", lambda: scores(detailed, base)),
            ("concise", lambda: scores([concise[r["image_ids"][-1]] for r in detailed], base)),
            ("hflip", lambda: scores(mirrored(detailed, "hflip"), base)),
            ("vflip", lambda: scores(mirrored(detailed, "vflip"), base)),
            (f"rank{cfg.model.r_min}", lambda: scores(detailed, base, cfg.model.r_min)),
            (f"rank{mid}", lambda: scores(detailed, base, mid))]
    for name, run in plan:
        t0 = time.perf_counter()
        readouts[name] = run()
        print(f"  scored {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    mean_of = lambda names: np.mean([log_softmax(readouts[n]) for n in names], axis=0)   # noqa: E731
    if not args.head:
        readouts["ensemble:trained+concise"] = mean_of(["trained", "concise"])
        readouts["ensemble:flips"] = mean_of(["trained", "hflip", "vflip"])
        readouts["ensemble:ranks"] = mean_of(["trained", f"rank{cfg.model.r_min}", f"rank{mid}"])

    rows = []
    for name, s in readouts.items():
        y = y_all.get(name, y_true)
        raw = validation_metrics(y, s)
        if fitted_folds(y, len(classes)):
            fitted = [validation_metrics(y, out_of_fold_fitted(s, y, seed)) for seed in range(3)]
            fit = {k: float(np.mean([f[k] for f in fitted])) for k in fitted[0]}
        else:       # as maemi_model: not offered with fewer than three images of some category
            fit = {k: float("nan") for k in raw}
        rows.append({"readout": name, **{f"raw_{k}": v for k, v in raw.items()},
                     **{f"fitted_{k}": v for k, v in fit.items()}})
        print(f"{name:26s} raw: top-1 {raw['top1']:.3f} BA {raw['balanced_accuracy']:.3f} AUC {raw['macro_auc']:.3f} "
              f"log-loss {raw['log_loss']:.3f} | fitted (out of fold): top-1 {fit['top1']:.3f} "
              f"BA {fit['balanced_accuracy']:.3f} AUC {fit['macro_auc']:.3f} log-loss {fit['log_loss']:.3f}")
    print(json.dumps({"n": len(y), "rows": rows}))


if __name__ == "__main__":
    main()
