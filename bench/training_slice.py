"""How the demo's training slice should be shared between tasks, chosen on validation records.

    .venv/bin/python bench/training_slice.py [--variants "even;vqa=3,caption=2"] [--records 32]
        [--tasks vqa,caption] [--config configs/default.yaml] [--threads 2]

Needs the profile's ``instruction_set`` materialized. For each variant (``even``: one record of
each task per round, else ``task=weight,...`` for ``model.train_task_weights``; ``package:DIR``:
a model already trained, e.g. the profile's own ``<workdir>/model/package``) it runs the
profile's own recipe (``model.max_train_records`` records, ``model.train_budget``, ...) with
``tune_and_register`` in ``<workdir>/runs/bench-training-slice-<i>/`` (never over the published
model, nothing registered), then answers ``--records`` validation records of each task (greedy,
the profile's decoding) and prints METEOR per task with a 95% bootstrap interval, the paired
difference to ``base_lm`` (the LM as it ships, on the same records) and to the first variant, and
the validation loss. Choose on these rows; the test split stays for ``benchmark_tables``.
"""

from __future__ import annotations

import argparse
import time

import torch

from maemi_core.threads import use_threads


def parse_weights(text: str) -> dict[str, int]:
    if text.strip() in ("", "even"):
        return {}
    return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--variants", default="even;vqa=3,caption=2")
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--tasks", default="vqa,caption")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    use_threads(args.threads)          # subnormals flushed before torch starts its threads

    import pandas as pd

    from maemi_core.config import load_config
    from maemi_core.data.manifest import load_manifest
    from maemi_core.evaluation.answering import BASE_LM, MAEMI, Answerer, benchmark_records, reference
    from maemi_core.evaluation.benchmark_tables import bootstrap_ci
    from maemi_core.evaluation.text_metrics import score_pairs
    from maemi_core.model.generation import DecodingConfig
    from maemi_core.model.maemi_model import load_package
    from maemi_core.run_isolation import scoped
    from maemi_core.teacher.instruction_set import load_instruction_set
    from maemi_core.training.instruction_tuning import select_records, tune_and_register

    base_cfg = load_config(args.config)
    manifest = load_manifest(base_cfg)
    records = load_instruction_set(base_cfg)
    ev = base_cfg.evaluation
    decoding = DecodingConfig(ev.repetition_penalty, ev.no_repeat_ngram_size)
    val = {t: benchmark_records(records, t, args.records, split="val") for t in args.tasks.split(",")}
    rows, first, base = [], {}, {}
    for i, variant in enumerate(args.variants.split(";")):
        cfg = scoped(base_cfg, f"bench-training-slice-{i}", writes="model")
        t0 = time.perf_counter()
        if variant.startswith("package:"):
            summary, share = {"package": variant.removeprefix("package:"), "best_val_loss": float("nan")}, {}
        else:
            weights = parse_weights(variant)
            cfg.model = cfg.model.model_copy(update={"train_task_weights": weights})
            chosen = select_records(records, "train", cfg.model.train_tasks, cfg.model.max_train_records, weights)
            share = pd.Series([r["task"] for r in chosen]).value_counts().to_dict()
            summary = tune_and_register(cfg, manifest, records, log=lambda m: print(m, flush=True))
        train_s = time.perf_counter() - t0
        model = load_package(summary["package"], cfg.model.lm_cache and str(cfg.resolve(cfg.model.lm_cache)))
        answerer = Answerer(model, manifest, ev.batch_size, decoding)
        for task, recs in val.items():
            refs = [reference(r) for r in recs]
            if task not in base:
                base[task] = score_pairs(answerer.answer(recs, cfg.model.max_new_tokens, method=BASE_LM,
                                                         desc=f"{task}: base_lm"), refs)["meteor"].to_numpy()
            met = score_pairs(answerer.answer(recs, cfg.model.max_new_tokens, method=MAEMI,
                                              desc=f"{task}: {variant}"), refs)["meteor"].to_numpy()
            first.setdefault(task, met)
            lo, hi = bootstrap_ci(met)
            dlo, dhi = bootstrap_ci(met - base[task])
            flo, fhi = bootstrap_ci(met - first[task])
            rows.append({"variant": variant, "task": task, "n": len(recs), "meteor": met.mean(),
                         "ci": f"[{lo:.3f}, {hi:.3f}]", "base_lm": base[task].mean(),
                         "minus_base_lm": f"{(met - base[task]).mean():+.3f} [{dlo:+.3f}, {dhi:+.3f}]",
                         "minus_first": f"{(met - first[task]).mean():+.3f} [{flo:+.3f}, {fhi:+.3f}]",
                         "val_loss": summary["best_val_loss"], "train_s": train_s,
                         "slice": ",".join(f"{k}:{v}" for k, v in sorted(share.items()))})
            print(rows[-1], flush=True)
    print()
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
