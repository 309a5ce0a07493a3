"""Choose the decoding controls on validation records: METEOR of greedy answers for a grid of
repetition penalties and n-gram blocking, on the profile's validation split (never test).

    .venv/bin/python bench/decoding_sweep.py [--config configs/default.yaml] [--package DIR]
                                             [--records 32] [--tasks caption,vqa]

``--package``: a model package folder (default: the one ``maemi_model`` last wrote under the
workdir). Prints one row per setting (mean METEOR and the paired difference to decoding without
controls, with its 95% bootstrap interval over records) and the setting to use for
``evaluation.repetition_penalty`` / ``evaluation.no_repeat_ngram_size``: the best mean METEOR among
the settings whose difference to "off" excludes zero, else "off" (a control is only switched on
when the validation records show it helps).
"""

from __future__ import annotations

import argparse

import pandas as pd

GRID = [(1.0, 0), (1.1, 0), (1.2, 0), (1.0, 3), (1.0, 4), (1.1, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--package", default=None)
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--tasks", default="caption,vqa")
    args = ap.parse_args()

    from maemi_core.config import load_config
    from maemi_core.data.manifest import load_manifest
    from maemi_core.evaluation.answering import Answerer, benchmark_records, reference
    from maemi_core.evaluation.benchmark_tables import bootstrap_ci
    from maemi_core.evaluation.text_metrics import score_pairs
    from maemi_core.model.generation import DecodingConfig
    from maemi_core.model.maemi_model import load_package
    from maemi_core.teacher.instruction_set import load_instruction_set

    cfg = load_config(args.config)
    manifest = load_manifest(cfg)
    records = load_instruction_set(cfg)
    package = args.package or str(cfg.workdir_path / "model" / "package")
    model = load_package(package, cfg.model.lm_cache and str(cfg.resolve(cfg.model.lm_cache)))
    val = []
    for task in args.tasks.split(","):
        val += benchmark_records(records, task, args.records, split="val")
    refs = [reference(r) for r in val]
    rows, off = [], None
    for penalty, ngram in GRID:
        answerer = Answerer(model, manifest, cfg.evaluation.batch_size, DecodingConfig(penalty, ngram))
        got = answerer.answer(val, cfg.model.max_new_tokens, desc=f"penalty {penalty}, no-repeat {ngram}")
        sc = score_pairs(got, refs)
        met = sc["meteor"].to_numpy()
        off = met if off is None else off          # GRID starts with decoding without controls
        lo, hi = bootstrap_ci(met - off)
        rows.append({"repetition_penalty": penalty, "no_repeat_ngram_size": ngram, "n": len(val),
                     **sc.mean().to_dict(), "meteor_minus_off": float((met - off).mean()),
                     "meteor_minus_off_ci_low": lo, "meteor_minus_off_ci_high": hi,
                     "mean_answer_words": sum(len(a.split()) for a in got) / len(got)})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print(df.round(4).to_string(index=False))
    helps = df[(df["meteor_minus_off_ci_low"] > 0)]
    best = helps.loc[helps["meteor"].idxmax()] if len(helps) else df.iloc[0]
    print(f"choice on validation (METEOR): repetition_penalty {best['repetition_penalty']}, "
          f"no_repeat_ngram_size {int(best['no_repeat_ngram_size'])}"
          + ("" if len(helps) else " (no control improved on decoding without them with an interval above 0)"))


if __name__ == "__main__":
    main()
