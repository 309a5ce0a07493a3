"""The ``maemi_model`` step: tune the MAEMI model on the instruction set and register it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from maemi_core.code_version import code_version
from maemi_core.config import MaemiConfig
from maemi_core.vision.classification_metrics import loss_curve_figure
from maemi_core.model.maemi_model import build_model, save_package
from maemi_core.vision.classifiers import vit_dir
from maemi_core.tracking import TrackingContext
from maemi_core.teacher.instruction_set import stable_slice
from maemi_core.training.maemi_training import (
    Example, ImageStore, MaemiTrainingConfig, TrainingPoint, build_examples, train_maemi,
)
from maemi_core.run_isolation import stage_dir

ASSET = "maemi_model"
# model.* settings that only serving reads: outside the training checkpoint's fingerprint.
SERVING_ONLY = {"max_new_tokens", "inference_kernel", "served_rank_cache"}


def model_dir(cfg: MaemiConfig) -> Path:
    return stage_dir(cfg, "model")


def select_records(records: list[dict], split: str, tasks: list[str], limit: Optional[int],
                   task_weights: Optional[dict[str, int]] = None) -> list[dict]:
    """Records of one split and the training tasks; with ``limit``, a stable slice by id hash
    that keeps every task represented (round-robin over tasks, ``task_weights`` records of a
    task per round, default 1). Without ``limit`` (the stream), ``task_weights`` oversamples:
    every record of a task appears that many times per epoch (0 drops the task)."""
    chosen = stable_slice([r for r in records if r["split"] == split and r["task"] in tasks], limit,
                          lambda r: r["task"], task_weights)
    if limit is not None or not task_weights:
        return chosen
    return [r for r in chosen for _ in range(max(0, int(task_weights.get(r["task"], 1))))]


def with_views(records: list[dict], task_views: Optional[dict[str, list[str]]]) -> list[dict]:
    """The stream with ``model.train_task_views`` applied: the k-th time a record of a task with
    views comes in the stream (its copies from ``train_task_weights``), it shows its images in
    that task's k-th view (cyclically; ``none``: as they are). A record shown in another view is
    a copy whose ``image_ids`` name the view (:func:`maemi_core.data.transforms.view_id`); the
    rest are the records themselves. Deterministic: no random state, so a resumed run and the
    learning-curve bench read the same stream."""
    from maemi_core.data.transforms import view_id

    if not task_views:
        return records
    seen: dict[str, int] = {}
    out = []
    for r in records:
        views = task_views.get(r["task"])
        if not views:
            out.append(r)
            continue
        k = seen.get(r["id"], 0)
        seen[r["id"]] = k + 1
        view = views[k % len(views)]
        out.append(r if view == "none" else {**r, "image_ids": [view_id(i, view) for i in r["image_ids"]]})
    return out


def build_stream_examples(records: list[dict], tokenizer, max_len: int) -> tuple[list[Example], int]:
    """:func:`build_examples` of a stream in which a record may come several times (task
    weights): each record is tokenised once and its example repeated in the stream's order; the
    count of records dropped as too long counts each record once."""
    memo: dict[int, Optional[Example]] = {}
    for r in records:
        if id(r) not in memo:
            built, _ = build_examples([r], tokenizer, max_len)
            memo[id(r)] = built[0] if built else None
    return [memo[id(r)] for r in records if memo[id(r)] is not None], sum(e is None for e in memo.values())


def package_meta(records: list[dict], manifest: pd.DataFrame) -> dict:
    """What serving needs beyond the weights: the category names and the zero-shot
    classification question the model was tuned on (for ``maemi classify``)."""
    question = next((r["conversations"][0]["value"] for r in records if r["task"] == "classify_zero_shot"), None)
    return {"class_names": sorted(manifest["label"].unique()), "classify_question": question}


def warm_start_from_champion(model, cfg: MaemiConfig, log: Callable[[str], None]) -> Optional[str]:
    """Load the champion's trained tensors (B, gated cross-attention, new embeddings) into
    ``model`` so re-tuning continues from it; None (train from scratch) when there is no
    champion or its shapes do not fit this profile."""
    import tempfile

    import torch
    from safetensors.torch import load_file

    from maemi_core.model_registry import CHAMPION, alias_version, download_package, registered_model_name

    name = registered_model_name(cfg.dataset.name)
    if alias_version(name, CHAMPION) is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        package, version = download_package(name, CHAMPION, tmp)
        tensors = load_file(str(package / "adapter.safetensors"))
    own = model.state_dict()
    misfit = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    if misfit:
        log(f"champion v{version} does not fit this model profile ({len(misfit)} tensors differ, e.g. {misfit[0]}): "
            "training from scratch")
        return None
    if bool(int(tensors.get("media_images", torch.zeros(())))) != model.cfg.media_standardize:
        log(f"champion v{version} was trained with model.media_standardize="
            f"{not model.cfg.media_standardize}, this profile says {model.cfg.media_standardize}: training from scratch")
        return None
    model.load_state_dict(tensors, strict=False)
    log(f"warm start: continuing from the champion's adapters ({name} v{version})")
    return version


def choose_inference_kernel(model, val_recs: list[dict], val_ex, images: ImageStore, cfg: MaemiConfig,
                            log: Callable[[str], None]):
    """Serve with a faster int8 numerics only where it answers like the training numerics on the
    validation records (greedy tokens and loss); see maemi_core/model/inference_kernel.py."""
    from maemi_core.model.inference_kernel import measure_agreement
    from maemi_core.training.maemi_training import evaluate_loss

    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    probe = val_recs[:8]
    agreement = measure_agreement(
        model, lambda: evaluate_loss(model, val_ex, pad_id, images, cfg.model.micro_batch, exact=False),
        [r["conversations"][0]["value"] for r in probe], [[images.get(i) for i in r["image_ids"]] for r in probe],
        min(32, cfg.model.max_new_tokens), cfg.model.inference_kernel)
    log(f"inference numerics: {agreement.summary()}")
    return agreement


def choose_category_scoring(model, records: list[dict], manifest: pd.DataFrame, images: ImageStore, cfg: MaemiConfig,
                            log: Callable[[str], None]) -> dict:
    """How this model's category likelihoods are compared (maemi_core/model/category_scoring.py):
    the profile's fixed choice, or (``auto``) the best on validation images; ``fitted`` (fixed or
    chosen) is fitted on those images. The zero-shot prompt's choice is the top level (what
    ``maemi classify`` and serving read); the few-shot prompt's, made the same way on the
    validation few-shot prompts, is under ``few_shot`` (absent without such prompts)."""
    from maemi_core.model.category_scoring import FEW_SHOT, ZERO_SHOT, choose_on_validation, validation_records
    from maemi_core.training.maemi_training import MediaCache

    fixed = cfg.evaluation.category_scoring
    if fixed not in ("auto", "fitted", "head"):
        return {"chosen": fixed, "reason": "evaluation.category_scoring"}
    media = MediaCache(model, images)
    class_names = sorted(manifest["label"].unique())
    head_images = cfg.evaluation.head_train_images

    def one(task: str) -> dict:
        if task == ZERO_SHOT and head_images != 0:
            log("category scoring: reading the train zero-shot prompts for the head scoring")
        got = choose_on_validation(model, records, class_names, lambda recs: media.stacked([r["image_ids"] for r in recs]),
                                   batch_size=cfg.evaluation.batch_size, limit=cfg.evaluation.scoring_val_images,
                                   seed=cfg.model.seed, task=task, head_train_images=head_images)
        if fixed != "auto" and got.get(fixed):
            got |= {"chosen": fixed, "reason": "evaluation.category_scoring"}
        elif fixed != "auto" and task == ZERO_SHOT:
            raise ValueError(f"evaluation.category_scoring is {fixed}, but it could not be fitted "
                             f"({got.get('note') or got.get('reason')}): set it to auto or add images of every category")
        elif fixed != "auto":      # the few-shot prompt only: keep the trained model, state the fallback
            got["note"] = f"{fixed} not possible on the few-shot prompts ({got.get('note') or got.get('reason')})"
        prompts = "zero-shot" if task == ZERO_SHOT else "few-shot"
        if "validation" in got:
            log(f"category scoring, {prompts}: {got['chosen']} (on {got['n']} validation prompts, log-loss / top-1 / "
                "balanced accuracy / macro AUC: " + "; ".join(
                    f"{k} {v['log_loss']:.3f} / {v['top1']:.3f} / {v['balanced_accuracy']:.3f} / {v['macro_auc']:.3f}"
                    for k, v in got["validation"].items()) + ")" + (f"; {got['note']}" if got.get("note") else ""))
        else:
            log(f"category scoring, {prompts}: raw ({got['reason']})")
        return got

    got = one(ZERO_SHOT)
    if validation_records(records, class_names, FEW_SHOT):
        got["few_shot"] = one(FEW_SHOT)
    return got


def tensors_sha256(tensors: dict) -> str:
    """sha256 (16 hex digits) over named tensors: names and raw bytes, in name order. Dtypes numpy
    lacks (bfloat16, float8) are hashed by their bytes, with the dtype's name."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        if t.dtype == torch.bfloat16:
            h.update(str(t.dtype).encode())
            t = t.view(torch.int16)
        elif t.dtype.itemsize == 1 and t.dtype.is_floating_point:
            h.update(str(t.dtype).encode())
            t = t.view(torch.uint8)
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def encoder_fingerprint(model) -> str:
    """sha256 over the frozen vision encoder's weights: a checkpoint trained against one encoder
    is never resumed against another (vit_classifier re-trained in between changes the ViT
    under the same name)."""
    return tensors_sha256(model.vision.state_dict())


def training_data_hash(train_recs: list[dict], val_recs: list[dict]) -> str:
    """The version of what a run trains and validates on: the teacher cache keys of its records."""
    return hashlib.sha256("".join(r["provenance"]["cache_key"] for r in train_recs + val_recs).encode()).hexdigest()[:16]


def training_fingerprint(cfg: MaemiConfig, model, data_hash: str, tcfg: MaemiTrainingConfig,
                         warm_version: Optional[str]) -> str:
    """What a training checkpoint must have been trained with to be resumed: data, model settings
    (serving-only ones excepted), encoder and its weights, the frozen base's matmul dtype, the
    recipe and the warm start. ``bench/gpu_training.py`` computes it the same way, so a run trained
    on another machine is taken up here as a finished run."""
    m = cfg.model
    return json.dumps({"data": data_hash, "model": m.model_dump(exclude=SERVING_ONLY),
                       "encoder": cfg.vision.encoder,
                       "encoder_weights": encoder_fingerprint(model),
                       "matmul_dtype": model.cfg.matmul_dtype,   # auto resolved on this machine
                       "train": asdict(tcfg), "warm_start": warm_version}, sort_keys=True)


def training_config(cfg: MaemiConfig, warm_start: bool = False) -> MaemiTrainingConfig:
    """The profile's recipe; a re-tune that warm-starts from the champion trains for
    ``model.retune_budget`` (when the profile sets one) instead of ``model.train_budget``."""
    m = cfg.model
    budget = (m.retune_budget or m.train_budget) if warm_start else m.train_budget
    return MaemiTrainingConfig.from_budget(budget, lr=m.lr, micro_batch=m.micro_batch, effective_batch=m.effective_batch,
                                           seed=m.seed, low_memory_allocator=m.low_memory_allocator,
                                           gate_lr_multiplier=m.gate_lr_multiplier)


@dataclass
class TuningData:
    """What the trainer reads, built the same way for the pipeline and the learning-curve bench."""
    train_recs: list[dict]
    val_recs: list[dict]
    train: list[Example]
    val: list[Example]
    dropped_too_long: int
    images: ImageStore


def tuning_data(cfg: MaemiConfig, manifest: pd.DataFrame, records: list[dict], tokenizer) -> TuningData:
    """Every train record of ``model.train_tasks`` (or the profile's stable slice of them), the
    validation slice, tokenised, and the manifest's images."""
    m = cfg.model
    train_recs = with_views(select_records(records, "train", m.train_tasks, m.max_train_records, m.train_task_weights),
                            m.train_task_views)
    val_recs = select_records(records, "val", m.train_tasks, m.max_val_records)
    if not train_recs:
        zeroed = sorted(t for t, w in m.train_task_weights.items() if w == 0)
        raise ValueError("no train records for model.train_tasks"
                         + (f" (model.train_task_weights sets {zeroed} to 0: give a task a weight above 0)" if zeroed else
                            ": materialize instruction_set first"))
    train_ex, dropped_tr = build_stream_examples(train_recs, tokenizer, m.max_len)
    val_ex, dropped_va = build_examples(val_recs, tokenizer, m.max_len)
    return TuningData(train_recs, val_recs, train_ex, val_ex, dropped_tr + dropped_va,
                      ImageStore.from_manifest(manifest, cfg.vision.image_size))


def tune_and_register(cfg: MaemiConfig, manifest: pd.DataFrame, records: list[dict],
                      tracker: Optional[TrackingContext] = None, log: Callable[[str], None] = lambda m: None,
                      stop_after_steps: Optional[int] = None) -> dict:
    import mlflow

    from maemi_core.data.manifest import manifest_hash
    from maemi_core.model_registry import log_and_register, registered_model_name

    m = cfg.model
    model = build_model(cfg, vit_dir(cfg))
    data = tuning_data(cfg, manifest, records, model.tokenizer)
    train_recs, val_recs, train_ex, val_ex, images = data.train_recs, data.val_recs, data.train, data.val, data.images
    counts = model.parameter_counts()
    log(f"MAEMI model: {counts['trainable']:,} trainable of {counts['total']:,} parameters; "
        f"{model.n_adapted} DyQLoRA-FA layers; {len(train_recs)} train records per epoch "
        f"({len({r['id'] for r in train_recs})} distinct; model.train_task_weights {m.train_task_weights or 'none'}) / "
        f"{len(val_recs)} val records")
    data_hash = training_data_hash(train_recs, val_recs)
    warm: dict = {"version": None}
    out = model_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    pack_version = records[0]["provenance"]["prompt_pack_version"] if records else ""

    def on_point(p: TrainingPoint) -> None:
        log(f"maemi step {p.step} (epoch {p.epoch}, {p.tokens} tokens, {p.minutes:.1f} min): "
            f"train_loss={p.train_loss:.4f} val_loss={p.val_loss:.4f} lr={p.lr:g} ({p.tokens_per_s:.0f} tok/s)")
        if tracker is not None:
            mlflow.log_metrics({"train_loss": p.train_loss, "val_loss": p.val_loss, "lr": p.lr,
                                "tokens_per_s": p.tokens_per_s}, step=p.tokens)

    def run() -> dict:
        tcfg = training_config(cfg, warm_start=warm["version"] is not None)
        # What serving reads (answer length, numerics choice, merged-weight cache) does not change the
        # trained weights: changing it re-packages the finished run instead of training it again.
        fingerprint = training_fingerprint(cfg, model, data_hash, tcfg, warm["version"])
        if m.processes > 1:
            from maemi_core.training.data_parallel import train_in_processes

            result = train_in_processes(model, cfg, train_ex, val_ex, images, tcfg, out / "checkpoint.pt", fingerprint,
                                        m.processes, on_point=on_point, stop_after_steps=stop_after_steps, log=log)
        else:
            result = train_maemi(model, train_ex, val_ex, images, tcfg, out / "checkpoint.pt", fingerprint,
                                 on_point=on_point, stop_after_steps=stop_after_steps)
        kernel = choose_inference_kernel(model, val_recs, val_ex, images, cfg, log)
        scoring = choose_category_scoring(model, records, manifest, images, cfg, log)
        package = save_package(model, cfg, out / "package",
                               extra_meta=package_meta(records, manifest) | {"inference_kernel": kernel.chosen,
                                                                             "kernel_agreement": kernel.as_dict(),
                                                                             "category_scoring": scoring})
        history = pd.DataFrame([h.__dict__ for h in result.history])
        history.to_csv(out / "history.csv", index=False)
        fig = loss_curve_figure(history, "MAEMI instruction tuning", out / "loss_curve.png", x="tokens")
        unit, amount = tcfg.budget
        summary = {"final_val_loss": result.final_val_loss, "steps": result.steps, "train_tokens": result.tokens,
                   "train_minutes": result.minutes, "epochs": result.history[-1].epoch if result.history else 0,
                   "budget": f"{amount:g} {unit}", "resumed_from_step": result.resumed_from_step,
                   "train_records": len(train_ex),
                   "val_records": len(val_ex), "dropped_too_long": data.dropped_too_long, **counts,
                   "data_hash": data_hash, "package": str(package), "loss_curve": str(fig),
                   "warm_start_version": warm["version"], "inference_kernel": kernel.chosen,
                   "category_scoring": scoring["chosen"],
                   "few_shot_category_scoring": (scoring.get("few_shot") or {}).get("chosen"),
                   "kernel_agreement": kernel.as_dict()}
        return summary

    if tracker is None:
        (out / "registered.json").unlink(missing_ok=True)
        summary = run()
        summary["model_uri"] = summary["version"] = None
        return summary
    with tracker.run(ASSET) as active:
        if cfg.operations.warm_start_from_champion:
            warm["version"] = warm_start_from_champion(model, cfg, log)
        recipe = training_config(cfg, warm_start=warm["version"] is not None)
        mlflow.log_params({
            "warm_start_from": warm["version"] or "none",
            "lm_profile": m.lm_profile, "vision_encoder": cfg.vision.encoder, "r_min": m.r_min, "r_max": m.r_max,
            "alpha": m.alpha, "lora_dropout": m.lora_dropout, "quantization": "int8 weight-only" if m.quantize_8bit else "fp32",
            "train_matmul_dtype": model.cfg.matmul_dtype,
            "xattn_every": m.xattn_every, "xattn_heads": m.xattn_heads, "xattn_head_dim": m.xattn_head_dim,
            "lr": m.lr, "gate_lr_multiplier": m.gate_lr_multiplier, "micro_batch": m.micro_batch,
            "effective_batch": m.effective_batch, "max_len": m.max_len,
            "train_budget": json.dumps(recipe.budget), "decay_fraction": recipe.decay_fraction,
            "train_tasks": ",".join(m.train_tasks), "prompt_pack": cfg.dataset.prompt_pack,
            "prompt_pack_version": pack_version, "data_hash": data_hash, "manifest_version": manifest_hash(manifest),
            "trainable_parameters": counts["trainable"],
        })
        summary = run()
        mlflow.log_metrics({"final_val_loss": summary["final_val_loss"], "train_tokens": summary["train_tokens"],
                            "train_minutes": summary["train_minutes"]}
                           | {f"kernel_{k}": float(v) for k, v in summary["kernel_agreement"].items()
                              if isinstance(v, (int, float))})
        mlflow.set_tag("inference_numerics", summary["inference_kernel"])
        mlflow.log_artifact(summary["loss_curve"], artifact_path="figures")
        mlflow.log_artifact(str(out / "history.csv"))
        name = registered_model_name(cfg.dataset.name)
        uri, version = log_and_register(summary["package"], name, {
            "data_hash": data_hash, "manifest_version": manifest_hash(manifest),
            "code_version": code_version("maemi_model"),
            "dagster_run_id": tracker.dagster_run_id, "lm_profile": m.lm_profile, "prompt_pack_version": pack_version,
            "training_numerics": "int8 weight-only" if m.quantize_8bit else "fp32",
            "inference_numerics": summary["inference_kernel"]})
        summary |= {"model_uri": uri, "version": version, "registered_model": name, "mlflow_run_id": active.info.run_id}
        # What this run registered, for the benchmark, the check and the promotion of the same
        # run (they never re-resolve the moving `challenger` alias).
        (out / "registered.json").write_text(json.dumps({k: summary[k] for k in (
            "registered_model", "version", "model_uri", "mlflow_run_id")} | {"dagster_run_id": tracker.dagster_run_id}))
        log(f"registered {name} version {version} as challenger")
    return summary
