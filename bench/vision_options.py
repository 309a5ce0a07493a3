"""The vision options side by side on a profile's images: validation and test top-1 of each.

    .venv/bin/python bench/vision_options.py [--config configs/default.yaml]
        [--options efficientnet_lite0,efficientnet_lite0_tiles,efficientnet_lite0_tta,
                   efficientnet_lite0_finetune,classical]
        [--tile-scales 2] [--threads 2]
        [--grouped-cv [--folds 5] [--repeats 1] [--seed 0]]

Needs the profile's ``raw_images`` materialized. Runs the ``vit_classifier`` step's own code for
each option (``maemi_core/vision/classifiers.py``) on the manifest's splits and prints, per option,
what validation chose (probe C; the classical feature set; the fine-tuning's best epoch), validation and test top-1, their gap,
macro-F1 and the wall time (features come from the workdir's cache when a run computed them).
What it writes goes to ``<workdir>/runs/bench-vision-options/vision``, never over the pipeline's
published vision stage. Choose on the validation column; the test column is for the report.

With ``--grouped-cv`` (for sets with few sample groups, e.g. tens of micrographs in many shifted
copies) every option's candidates (its C, feature sets, tile scales, ...) are scored instead by
cross-validation over train+val with leave-samples-out folds (``group_id``): it prints the mean
and std over folds of each candidate, the one with the best mean, and then - once, at the end -
that candidate refitted on train+val and scored on the test split: on every test image, on the
images of samples train+val never holds, and on those of samples it does. Nothing on the test
split takes part in the choice. The CV table is also written to ``cv_selection.csv`` there.
"""

from __future__ import annotations

import argparse
import time

import torch

from maemi_core.threads import use_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--options", default="efficientnet_lite0,efficientnet_lite0_tiles,efficientnet_lite0_tta,"
                                         "efficientnet_lite0_finetune,classical")
    ap.add_argument("--tile-scales", default=None, help="comma-separated; default: the profile's vision.tile_scales")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grouped-cv", action="store_true",
                    help="choose among the options' candidates by grouped CV over train+val; score the winner on test")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1, help="dealings of the groups to folds (each a shuffle)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-test", action="store_true",
                    help="with --grouped-cv: the CV table only, the test split untouched (while exploring options)")
    args = ap.parse_args()
    use_threads(args.threads)          # subnormals flushed before torch starts its threads

    import pandas as pd

    from maemi_core.config import load_config
    from maemi_core.data.manifest import load_manifest
    from maemi_core.run_isolation import scoped
    from maemi_core.vision.classifiers import (
        load_vision_data, train_classical, train_efficientnet_finetune, train_efficientnet_probe,
    )

    cfg = scoped(load_config(args.config), "bench-vision-options", writes="vision")
    if args.tile_scales:
        cfg.vision.tile_scales = [int(s) for s in args.tile_scales.split(",")]
    manifest = load_manifest(cfg)
    data = load_vision_data(cfg, manifest)
    counts = manifest["split"].value_counts().to_dict()
    print(f"{cfg.dataset.name}: {len(manifest)} images {counts}, classes {data.class_names}, "
          f"tile scales {cfg.vision.tile_scales}")
    if args.grouped_cv:
        grouped(cfg, data, args)
        return
    rows = []
    for option in args.options.split(","):
        t0 = time.perf_counter()
        if option == "classical":
            report = train_classical(cfg, data)
        elif option == "efficientnet_lite0_finetune":
            report = train_efficientnet_finetune(cfg, data)
        else:
            report = train_efficientnet_probe(cfg, data, option)
        fs = report.params.get("feature_set")
        if "C" in report.params:
            chosen = (f"{fs}, " if fs else "") + f"C={report.params['C']:g} ({report.params['C_chosen_by']})"
        else:
            chosen = (f"epoch {report.summary['best_epoch']} of {report.summary['epochs']} "
                      f"(validation loss, {report.params['finetune_blocks']} blocks tuned)")
        rows.append({"option": option, "chosen on val": chosen,
                     "val top-1": report.summary["val_top1"], "test top-1": report.summary["top1"],
                     "val - test": report.summary["val_top1"] - report.summary["top1"],
                     "test macro-F1": report.summary["macro_f1"], "seconds": time.perf_counter() - t0})
        print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format="%.3f"), flush=True)
        if fs:
            print(f"  validation estimate of each feature set: {report.params['feature_set_scores']}", flush=True)
    print()
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))


def grouped(cfg, data, args) -> None:
    from maemi_core.vision.classifiers import choose_model_by_grouped_cv, cv_table_markdown, vision_dir

    t0 = time.perf_counter()
    groups = data.manifest.loc[data.manifest["split"] != "test", "group_id"]
    print(f"grouped {args.folds}-fold CV over train+val: {int((data.manifest['split'] != 'test').sum())} images of "
          f"{groups.nunique()} sample groups, {args.repeats} dealing(s), seed {args.seed}", flush=True)
    choice = choose_model_by_grouped_cv(cfg, data, args.options.split(","), args.folds, args.repeats, args.seed,
                                        log=lambda m: print(m, flush=True), score_test=not args.no_test)
    print()
    print(cv_table_markdown(choice))
    if choice.test:
        s, cv = choice.test, choice.chosen["cv_top1"]
        print(f"CV - test: {cv - s['top1']:+.3f} on every test image, {cv - s['top1_unseen_samples']:+.3f} on the "
              f"images of unseen samples")
    table = choice.selection.table.copy()
    table["fold_top1"] = table["fold_top1"].map(lambda f: " ".join(f"{v:.3f}" for v in f))
    path = vision_dir(cfg) / "cv_selection.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    wall = time.perf_counter() - t0
    print(f"{len(table)} candidates, {len(choice.selection.folds)} folds; wall time {wall:.0f} s "
          f"({wall / 60:.1f} min, features from the workdir's cache where a run computed them); {path}")


if __name__ == "__main__":
    main()
