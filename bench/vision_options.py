"""The vision options side by side on a profile's images: validation and test top-1 of each.

    .venv/bin/python bench/vision_options.py [--config configs/default.yaml]
        [--options efficientnet_lite0,efficientnet_lite0_tiles,efficientnet_lite0_tta,
                   efficientnet_lite0_finetune,classical]
        [--tile-scales 2] [--threads 2]

Needs the profile's ``raw_images`` materialized. Runs the ``vit_classifier`` step's own code for
each option (``maemi_core/vision/classifiers.py``) on the manifest's splits and prints, per option,
what validation chose (probe C; the classical feature set; the fine-tuning's best epoch), validation and test top-1, their gap,
macro-F1 and the wall time (features come from the workdir's cache when a run computed them).
What it writes goes to ``<workdir>/runs/bench-vision-options/vision``, never over the pipeline's
published vision stage. Choose on the validation column; the test column is for the report.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--options", default="efficientnet_lite0,efficientnet_lite0_tiles,efficientnet_lite0_tta,"
                                         "efficientnet_lite0_finetune,classical")
    ap.add_argument("--tile-scales", default=None, help="comma-separated; default: the profile's vision.tile_scales")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

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


if __name__ == "__main__":
    main()
