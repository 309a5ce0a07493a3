"""How far the MAEMI model gets as training compute grows: metric vs training tokens.

    .venv/bin/python bench/learning_curve.py [--budgets 10,30,60,120] [--eval-images 0]
        [--eval-records 64] [--threads 2] [--config configs/default.yaml] [--figure docs/learning_curve.png]
        [--unit minutes|tokens|epochs] [--decay 0]

Needs the profile's ``instruction_set`` (and so ``raw_images``) materialized (``make demo`` does).
Trains the profile's model with the pipeline's own trainer and recipe (``train_maemi``: the
profile's train records, streamed; warmup-stable-decay), the budget replaced by the curve's last
budget (``--unit``: minutes of training wall time, tokens or epochs), and at each cumulative
budget evaluates on the same fixed test records:

- zero-shot classification top-1 by category-name likelihood on the test images
  (``--eval-images 0``: every test image), for MAEMI and for the tuned LM with its
  cross-attention gates closed (what the image adds);
- METEOR (mean and 95% bootstrap interval) of greedy answers on ``--eval-records`` open-ended
  VQA and captioning test records;
- the validation answer loss.

``base_lm`` (the LM as it ships) is evaluated once, at 0 tokens. Every point is logged to the
MLflow experiment ``maemi-learning-curve-<dataset>`` (step = training tokens) and written to
the CSV beside ``--figure`` (same name, ``.csv``); every evaluation's category log-likelihoods
per image go to ``.scores.parquet`` beside it (method, train_tokens, image_id, label,
``loglik_<class>``), so two runs can be compared image by image.

The trainer checkpoints its whole state (trained tensors, Adam moments, data order and random
state) atomically to ``--state`` (default: beside the figure, ``.state.pt``) at every budget and
every few minutes, the evaluated rows go beside it (``.state.rows.pt``). Run the script again
with larger ``--budgets`` and the same settings and it continues from where it stopped instead
of starting over (``--fresh`` ignores the state); a state written for other settings or data is
not used. ``--replot`` only redraws the figure from that CSV (no model is loaded).

The learning rate is constant (the profile's ``model.lr``) unless ``--decay D`` (in the budgets'
unit): then it falls linearly to 0 over the last D before the last budget (a cooldown; a state
saved by a constant-rate run can be continued this way, e.g. ``--budgets 90,120 --decay 30``
from the 90-minute state).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from maemi_core.threads import use_threads


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp)`` to a unique file beside ``path``, then rename it over ``path``: a run killed
    while writing, or two runs with the same ``--figure``, never leave a half-written file."""
    import uuid

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--budgets", default="10,30,60,120", help="cumulative budgets of training, in --unit")
    ap.add_argument("--unit", default="minutes", choices=["minutes", "tokens", "epochs"])
    ap.add_argument("--eval-images", type=int, default=0, help="0: every test image")
    ap.add_argument("--eval-records", type=int, default=64, help="0: no text tasks (classification only)")
    ap.add_argument("--eval-split", default="test", choices=["test", "val"],
                    help="val: compare design variants without looking at the test set")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--figure", default="docs/learning_curve.png")
    ap.add_argument("--state", default=None, help="resumable training state (default: <figure>.state.pt)")
    ap.add_argument("--fresh", action="store_true", help="start from 0 tokens even if a state exists")
    ap.add_argument("--decay", "--decay-minutes", dest="decay", type=float, default=0.0,
                    help="anneal the learning rate linearly to 0 over the last this many minutes before the last "
                         "budget (0: constant, as the curve in the README)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw --figure from the CSV beside it (give the run's --eval-split / --eval-images: "
                         "they set the majority-class line; and its --decay and --unit, named in the title)")
    args = ap.parse_args()
    last = max(float(b) for b in args.budgets.split(","))
    if not 0 <= args.decay <= last:
        raise SystemExit(f"--decay {args.decay:g}: give 0 (constant rate) up to the last budget ({last:g} {args.unit})")
    use_threads(args.threads)          # subnormals flushed before torch starts its threads
    if args.replot:
        return replot(args)

    import mlflow

    from maemi_core.config import load_config
    from maemi_core.data.manifest import load_manifest
    from maemi_core.evaluation.answering import BASE_LM, GATES_CLOSED, MAEMI, Answerer, benchmark_records, reference
    from maemi_core.evaluation.benchmark_tables import bootstrap_ci
    from maemi_core.evaluation.text_metrics import score_pairs
    from maemi_core.model.maemi_model import build_model
    from maemi_core.vision.classifiers import vit_dir
    from maemi_core.tracking import resolve_tracking_uri, tracked_run
    from maemi_core.teacher.instruction_set import load_instruction_set
    from maemi_core.checkpoints import load_checkpoint, save_checkpoint
    from maemi_core.training.instruction_tuning import tuning_data
    from maemi_core.training.maemi_training import MediaCache, evaluate_loss

    cfg = load_config(args.config)
    m = cfg.model
    manifest = load_manifest(cfg)
    records = load_instruction_set(cfg)
    budgets = [float(b) for b in args.budgets.split(",")]
    model = build_model(cfg, vit_dir(cfg))
    data = tuning_data(cfg, manifest, records, model.tokenizer)
    train_ex, val_ex, images = data.train, data.val, data.images
    media = MediaCache(model, images)
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tcfg = curve_config(cfg, budgets, args.unit, args.decay)

    class_names, image_ids, cls_recs, y, majority = classification_targets(manifest, records, args)
    text_tasks = ("vqa", "caption") if args.eval_records else ()
    text_recs = {t: benchmark_records(records, t, args.eval_records) for t in text_tasks}
    answerer = Answerer(model, manifest, cfg.evaluation.batch_size)
    print(f"{len(train_ex)} train examples, {len(val_ex)} val; evaluation: {len(cls_recs)} {args.eval_split} images "
          f"(majority class {majority:.3f}), "
          + ", ".join(f"{len(v)} {k} records" for k, v in text_recs.items()))

    def evaluate(tokens: int, seconds: float, methods) -> list[dict]:
        rows = []
        model.eval()
        for method in methods:
            t0 = time.perf_counter()
            row = {"method": method, "train_tokens": tokens, "train_minutes": seconds / 60}
            sc = answerer.category_scores(cls_recs, class_names, method)
            hit = (sc.argmax(1) == y).astype(float)
            per_image.append({"method": method, "train_tokens": tokens, "image_id": list(image_ids),
                              "label": [class_names[i] for i in y],
                              **{f"loglik_{c}": sc[:, j].tolist() for j, c in enumerate(class_names)}})
            lo, hi = bootstrap_ci(hit)
            row |= {"zero_shot_top1": hit.mean(), "zero_shot_top1_ci_low": lo, "zero_shot_top1_ci_high": hi,
                    # how often it names a class other than the majority's: 0 means the image is ignored
                    "zero_shot_pred_spread": float(1 - np.bincount(sc.argmax(1), minlength=len(class_names)).max()
                                                   / max(len(y), 1)),
                    # mean -log p(true category) over the category names: falls below the gates-closed
                    # value only if the image carries information the answer uses (more sensitive than top-1)
                    "zero_shot_label_nll": float(np.mean(np.logaddexp.reduce(sc, axis=1) - sc[np.arange(len(y)), y])),
                    # one-vs-rest AUC of the category scores: above 0.5 when the scores rank images by
                    # class, whatever the answer's bias towards one name (calibration-free)
                    "zero_shot_macro_auc": _macro_auc(y, sc, len(class_names))}
            row |= _auc_interval(y, sc, len(class_names))
            if method != GATES_CLOSED:
                for task, recs in text_recs.items():
                    got = answerer.answer(recs, m.max_new_tokens, desc=f"{task}: {method}", method=method)
                    met = score_pairs(got, [reference(r) for r in recs])["meteor"].to_numpy()
                    lo, hi = bootstrap_ci(met)
                    row |= {f"{task}_meteor": met.mean(), f"{task}_meteor_ci_low": lo, f"{task}_meteor_ci_high": hi}
            if method == MAEMI:
                row["val_loss"] = evaluate_loss(model, val_ex, pad_id, images, m.micro_batch, media=media)
            row["eval_seconds"] = time.perf_counter() - t0
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            rows.append(row)
        return rows

    uri, artifact_root = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.project_root)
    state_path = Path(args.state) if args.state else Path(args.figure).with_suffix(".state.pt")
    rows_path = state_path.with_suffix(".rows.pt")
    fingerprint = _fingerprint(args, cfg, train_ex, cls_recs, text_recs)
    if args.fresh:
        state_path.unlink(missing_ok=True)
    saved = load_checkpoint(rows_path, fingerprint) if not args.fresh else None
    rows: list[dict] = saved["rows"] if saved else []
    per_image: list[dict] = saved["per_image"] if saved else []     # every evaluation's category scores per image
    with tracked_run(uri, f"maemi-learning-curve-{cfg.dataset.name}", "learning_curve", time.strftime("%Y%m%dT%H%M%S"),
                     Path(args.config).name, artifact_root):
        mlflow.log_params({"budgets": args.budgets, "budget_unit": args.unit, "train_examples": len(train_ex),
                           "eval_images": len(cls_recs), "eval_records": args.eval_records, "threads": args.threads,
                           "lr": tcfg.lr, "effective_batch": tcfg.effective_batch,
                           "gate_lr_multiplier": tcfg.gate_lr_multiplier, "xattn_heads": m.xattn_heads,
                           "xattn_head_dim": m.xattn_head_dim, "media_norm": m.media_norm,
                           "media_standardize": m.media_standardize, "eval_split": args.eval_split,
                           "majority_top1": majority, "decay": args.decay})
        if not rows:
            rows += evaluate(0, 0.0, [BASE_LM, MAEMI, GATES_CLOSED])
        rows = [r for r in rows if r["method"] != "efficientnet_probe"]     # recomputed below (cheap)
        probe = probe_reference(cfg, manifest, image_ids, y, class_names)
        if probe is not None:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in probe.items()}, flush=True)
            rows.append(probe)

        def on_point(p) -> None:
            # A point evaluated before a kill and trained again after it replaces its earlier rows.
            rows[:] = [r for r in rows if r["train_tokens"] != p.tokens or r["method"] == "efficientnet_probe"]
            per_image[:] = [q for q in per_image if q["train_tokens"] != p.tokens]
            print(f"{p.minutes:.1f} min: epoch {p.epoch}, {p.tokens} training tokens", flush=True)
            new = evaluate(p.tokens, p.minutes * 60, [MAEMI, GATES_CLOSED])
            rows.extend(new)
            for r in new:
                mlflow.log_metrics({f"{r['method']}.{k}": float(v) for k, v in r.items()
                                    if k not in ("method",) and isinstance(v, (int, float)) and np.isfinite(v)},
                                   step=p.tokens)
            save_checkpoint({"fingerprint": fingerprint, "rows": rows, "per_image": per_image}, rows_path)

        train_to_budgets(model, data, tcfg, budgets, state_path, fingerprint, on_point)
        df = pd.DataFrame(rows)
        csv = Path(args.figure).with_suffix(".csv")
        csv.parent.mkdir(parents=True, exist_ok=True)
        _replace_atomically(csv, lambda tmp: df.to_csv(tmp, index=False))
        if per_image:
            scores = pd.concat([pd.DataFrame(p) for p in per_image], ignore_index=True)
            _replace_atomically(Path(args.figure).with_suffix(".scores.parquet"),
                                lambda tmp: scores.to_parquet(tmp, index=False))
        fig = figure(df, Path(args.figure), cfg.dataset.name, majority, args.eval_split, args.decay, args.unit)
        mlflow.log_artifact(str(csv))
        mlflow.log_artifact(str(fig), artifact_path="figures")
    print(df.round(4).to_string(index=False))


def curve_config(cfg, budgets: list[float], unit: str, decay: float):
    """The profile's training recipe (``maemi_core.training.instruction_tuning.training_config``)
    with the curve's last budget, in ``unit``, and a cooldown over its last ``decay``."""
    from dataclasses import replace

    from maemi_core.training.instruction_tuning import training_config

    last = max(budgets)
    amount = int(last) if unit == "tokens" else float(last)
    budget = {"budget_tokens": None, "budget_minutes": None, "budget_epochs": None} | {f"budget_{unit}": amount}
    return replace(training_config(cfg), **budget, decay_fraction=decay / last if last else 0.0)


def train_to_budgets(model, data, tcfg, budgets: list[float], state_path: Path, fingerprint: str, on_point):
    """Train with the pipeline's own trainer (``train_maemi``) and evaluate at each budget:
    no loop of the bench's own. The trainer's checkpoint at ``state_path`` makes the curve
    resumable, and a later run with larger budgets continues it."""
    from maemi_core.training.maemi_training import train_maemi

    return train_maemi(model, data.train, data.val, data.images, tcfg, state_path, fingerprint, on_point=on_point,
                       points=budgets)


def classification_targets(manifest: pd.DataFrame, records: list[dict], args):
    """The fixed zero-shot evaluation: class names, image ids, their records, labels (indices)
    and the score of always answering the majority class."""
    from maemi_core.evaluation.benchmark_run import classification_images

    class_names = sorted(manifest["label"].unique())
    if args.eval_split == "test":
        image_ids = classification_images(records, None, args.eval_images or None)
    else:
        image_ids = sorted({r["image_ids"][-1] for r in records if r["split"] == "val"
                            and r["task"] == "classify_zero_shot"})[: args.eval_images or None]
    zs = {r["image_ids"][-1]: r for r in records if r["split"] == args.eval_split and r["task"] == "classify_zero_shot"}
    cls_recs = [zs[i] for i in image_ids]
    y = np.array([class_names.index(r["label"]) for r in cls_recs])
    majority = float(np.bincount(y, minlength=len(class_names)).max() / max(len(y), 1))
    return class_names, image_ids, cls_recs, y, majority


def replot(args) -> None:
    """Redraw ``--figure`` from the CSV beside it (e.g. after a change to the figure). The CSV does
    not hold the majority class's score: it is recomputed from the instruction set for the same
    ``--eval-split`` / ``--eval-images`` as the run that wrote the CSV."""
    from maemi_core.config import load_config
    from maemi_core.data.manifest import load_manifest
    from maemi_core.teacher.instruction_set import load_instruction_set

    csv = Path(args.figure).with_suffix(".csv")
    if not csv.exists():
        raise SystemExit(f"{csv} does not exist: run the learning curve first (without --replot)")
    cfg = load_config(args.config)
    majority = classification_targets(load_manifest(cfg), load_instruction_set(cfg), args)[-1]
    print(figure(pd.read_csv(csv), Path(args.figure), cfg.dataset.name, majority, args.eval_split,
                 args.decay, args.unit))


def _fingerprint(args, cfg, train_ex, cls_recs, text_recs) -> str:
    """What a saved state must share with this run to be continued: the profile's model and
    training settings, the train examples and the evaluation records."""
    import hashlib
    import json

    key = {"model": cfg.model.model_dump(mode="json"),
           "vision": cfg.vision.encoder, "threads": args.threads, "eval_split": args.eval_split,
           "train": [e.id for e in train_ex], "eval_images": [r["id"] for r in cls_recs],
           "eval_records": {k: [r["id"] for r in v] for k, v in text_recs.items()}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def probe_reference(cfg, manifest: pd.DataFrame, image_ids: list[str], y: np.ndarray, class_names: list[str]):
    """The same scores for the frozen EfficientNet-Lite0 linear probe (``vit_classifier``'s
    baseline) on the same images, from the raw pooled features it was trained on (the workdir's
    feature cache; the L2-normalised ``image_embeddings`` are not its input): how much of the
    class the visual tokens MAEMI attends to carry. None when the probe or the cache is missing."""
    import joblib

    from maemi_core.data.manifest import manifest_hash
    from maemi_core.run_isolation import stage_dir

    path = stage_dir(cfg, "vision") / "efficientnet_lite0" / "probe.joblib"
    key = manifest_hash(manifest)
    feats_path = cfg.workdir_path / "cache" / f"efficientnet_lite0_{key}.npy"
    if not (path.is_file() and feats_path.is_file()):
        return None
    feats = np.load(feats_path)
    if len(feats) != len(manifest):
        return None
    saved = joblib.load(path)
    row_of = {iid: k for k, iid in enumerate(manifest["image_id"])}
    proba = saved["probe"].predict_log_proba(feats[[row_of[i] for i in image_ids]])
    sc = np.full((len(image_ids), len(class_names)), -np.inf)
    for j, name in enumerate(saved["class_names"]):
        sc[:, class_names.index(name)] = proba[:, j]
    hit = (sc.argmax(1) == y).astype(float)
    return {"method": "efficientnet_probe", "train_tokens": 0, "train_minutes": 0.0, "zero_shot_top1": hit.mean(),
            "zero_shot_label_nll": float(np.mean(-sc[np.arange(len(y)), y])),
            "zero_shot_macro_auc": _macro_auc(y, sc, len(class_names)), **_auc_interval(y, sc, len(class_names))}


def _auc_interval(y: np.ndarray, scores: np.ndarray, n_classes: int) -> dict:
    """95% percentile-bootstrap interval of the macro AUC over the evaluation images."""
    from maemi_core.model.category_scoring import macro_auc_interval

    lo, hi = macro_auc_interval(y, scores, normalise=False)
    return {"zero_shot_macro_auc_ci_low": lo, "zero_shot_macro_auc_ci_high": hi}


def _macro_auc(y: np.ndarray, scores: np.ndarray, n_classes: int) -> float:
    """Mean one-vs-rest ROC AUC of the raw category scores over the classes present in ``y``."""
    from maemi_core.model.category_scoring import macro_auc

    return macro_auc(y, scores, normalise=False)


def figure(df: pd.DataFrame, path: Path, dataset: str, majority: float | None = None, split: str = "test",
           decay: float = 0.0, unit: str = "minutes") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("zero_shot_top1", f"zero-shot top-1 (likelihood, {split} images)"),
              ("zero_shot_macro_auc", "zero-shot macro AUC (category scores)"), ("vqa_meteor", "VQA METEOR"),
              ("caption_meteor", "caption METEOR")]
    panels = [p for p in panels if p[0] in df.columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    axes = axes[0]
    for ax, (metric, title) in zip(axes, panels):
        for method, g in df.groupby("method", sort=False):
            g = g.dropna(subset=[metric])
            if not len(g):
                continue
            x = g["train_tokens"] / 1e3
            if len(g) == 1:   # a fixed reference (base_lm, the probe): a horizontal line
                style = {"base_lm": ("--", "grey")}.get(method, (":", "green"))
                ax.axhline(g[metric].iloc[0], ls=style[0], color=style[1], label=method)
                continue
            ax.plot(x, g[metric], marker="o", label=method)
            ax.fill_between(x, g[f"{metric}_ci_low"], g[f"{metric}_ci_high"], alpha=0.2)
        if metric == "zero_shot_top1" and majority is not None:
            ax.axhline(majority, ls="-.", color="black", lw=0.8, label="always the majority class")
        ax.set_xlabel("training tokens (thousands)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    decay = (f"; learning rate decayed linearly to 0 over the last {decay:g} {unit} before the last point"
             if decay > 0 else "")
    fig.suptitle(f"MAEMI learning curve ({dataset}; bands: 95% bootstrap intervals{decay})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
