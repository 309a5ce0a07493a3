"""The profile's MAEMI training on another machine (a GPU's), then its benchmark on this one.

A GPU machine often has no network and no project install, so the run is cut in three:

    python bench/gpu_training.py export BUNDLE
        here, after `make demo` (or instruction_set): writes what the trainer reads, built by the
        pipeline's own code (``tuning_data``: the tokenised train stream and validation examples),
        the model-input images as the pipeline decodes them, the ViT when the profile's encoder is
        one, and the checkpoint fingerprint that ``maemi_model`` computes (``training_fingerprint``),
        with checksums of the language model, the frozen random A matrices and the tokenizer.
    python bench/gpu_training.py train BUNDLE OUT [--device cuda] [--max-steps N] [--split-mib 15.5]
        on the other machine (this repository, the same profile, the LM package and the encoder
        weights importable): checks those checksums, runs the pipeline's trainer (``train_maemi``:
        the profile's budget, warmup-stable-decay, DyQLoRA-FA, bf16 frozen-base matmuls where
        the device has them) and writes OUT/checkpoint.pt (CPU tensors) and OUT/gpu_run.json
        (device, versions, tokens/s per evaluation point, wall time). A killed run started
        again resumes from its checkpoint.
    python bench/gpu_training.py evaluate OUT/checkpoint.pt SCRATCH [--no-benchmark]
        here again: SCRATCH becomes a workdir that reads every stage of the profile's workdir but
        its own ``model/`` and ``reports/``; the checkpoint goes where ``maemi_model`` looks, so
        the pipeline's step takes it up as a finished run (it stops before if the checkpoint is
        not a finished run of this profile on this data), checks the serving numerics, chooses
        the category scoring, packages, and ``run_benchmark`` writes the paper's tables to
        SCRATCH/reports.

On a GPU the convolutions and fp32 matmuls run without TF32 (the CPU's fp32); the frozen base's
matmuls run in bf16 as on a CPU with AVX512-BF16, and the exporting machine's fingerprint must
say the same (``train`` stops otherwise). A test in ``tests/test_pipeline_assets.py`` runs
export, train and the take-up on the CPU with the tiny profile (not the benchmark that
``evaluate`` runs after it). Nothing here is a test: it records what one run measured.
``evaluate`` builds the model twice (once to check the fingerprint before anything is written,
once in the pipeline's step): about half a minute on the default profile.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maemi_core.config import load_config  # noqa: E402
from maemi_core.data.transforms import split_view  # noqa: E402
from maemi_core.training.maemi_training import ImageStore  # noqa: E402


def model_checksums(model) -> dict:
    """What must be equal on both machines for the fingerprint to mean the same run."""
    from maemi_core.training.instruction_tuning import tensors_sha256

    base = {k: v for k, v in model.lm.state_dict().items() if "lora" not in k and "xattn" not in k}
    lora_a = {k: v for k, v in model.state_dict().items() if k.endswith("lora_A")}
    tok = model.tokenizer
    return {"lm_base": tensors_sha256(base), "lora_A": tensors_sha256(lora_a), "vocab": len(tok),
            "image_token_id": int(model.image_token_id), "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id}


class ArrayImageStore(ImageStore):
    """The model-input images, decoded on the machine that exported them."""

    def __init__(self, arrays: dict[str, np.ndarray], size: int):
        super().__init__({}, size)
        self._cache.update(arrays)


def pipeline_run(cfg):
    """What ``maemi_model`` builds for a first version of this profile: (model, tuning data,
    recipe, checkpoint fingerprint)."""
    from maemi_core.data.manifest import load_manifest
    from maemi_core.model.maemi_model import build_model
    from maemi_core.teacher.instruction_set import load_instruction_set
    from maemi_core.training.instruction_tuning import (training_config, training_data_hash, training_fingerprint,
                                                        tuning_data)
    from maemi_core.vision.classifiers import vit_dir

    manifest, records = load_manifest(cfg), load_instruction_set(cfg)
    model = build_model(cfg, vit_dir(cfg))
    data = tuning_data(cfg, manifest, records, model.tokenizer)
    tcfg = training_config(cfg)
    data_hash = training_data_hash(data.train_recs, data.val_recs)
    return model, data, tcfg, training_fingerprint(cfg, model, data_hash, tcfg, None)


def export_bundle(cfg, bundle: str | Path) -> dict:
    model, data, tcfg, fingerprint = pipeline_run(cfg)
    out = Path(bundle)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "examples.pt.gz", "wb") as f:
        torch.save({"train": data.train, "val": data.val}, f)
    ids = sorted({split_view(i)[0] for e in data.train + data.val for i in e.image_ids})   # views: derived there
    arrays = np.stack([data.images.get(i) for i in ids])                  # (n, 3, S, S) uint8
    gray = bool((arrays == arrays[:, :1]).all())
    np.savez_compressed(out / "images.npz", ids=np.array(ids), pixels=arrays[:, :1] if gray else arrays)
    if model.vit_dir is not None:                # the profile's encoder is the ViT vit_classifier trained
        shutil.copytree(model.vit_dir, out / "vit", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("checkpoint.pt", "history.csv"))
    meta = {"fingerprint": fingerprint, "profile_fingerprint": cfg.fingerprint(),
            "train_config": dict(tcfg.__dict__), "image_size": cfg.vision.image_size, "gray": gray,
            "checksums": model_checksums(model), "train_examples": len(data.train), "val_examples": len(data.val),
            "images": len(ids), "stream_tokens_per_epoch": sum(len(e.input_ids) for e in data.train),
            "matmul_dtype": model.cfg.matmul_dtype}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def train_bundle(cfg, bundle: str | Path, out: str | Path, device: str = "cuda", max_steps: Optional[int] = None,
                 checkpoint_minutes: Optional[float] = None, split_mib: Optional[float] = None,
                 log: Callable[[str], None] = print) -> dict:
    from maemi_core.checkpoints import load_checkpoint, save_checkpoint
    from maemi_core.model.maemi_model import build_model
    from maemi_core.training.maemi_training import MaemiTrainingConfig, train_maemi

    bundle, out = Path(bundle), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((bundle / "meta.json").read_text())
    if cfg.fingerprint() != meta["profile_fingerprint"]:
        raise SystemExit("the profile here differs from the exported one: use the same MAEMI_CONFIG and code")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    model = build_model(cfg, bundle / "vit" if (bundle / "vit").is_dir() else None)
    got = model_checksums(model)
    if got != meta["checksums"]:
        raise SystemExit(f"the model built here differs from the exported one: {got} != {meta['checksums']}")
    if model.cfg.matmul_dtype != meta["matmul_dtype"]:
        raise SystemExit(f"frozen-base matmuls resolve to {model.cfg.matmul_dtype} here, {meta['matmul_dtype']} "
                         "where the bundle was exported: the fingerprint would not describe this run")
    model.to(dev)
    with gzip.open(bundle / "examples.pt.gz", "rb") as f:
        ex = torch.load(f, weights_only=False)
    with np.load(bundle / "images.npz") as z:
        pix = np.repeat(z["pixels"], 3, axis=1) if meta["gray"] else z["pixels"]
        images = ArrayImageStore(dict(zip(z["ids"].tolist(), pix)), meta["image_size"])
    tcfg = MaemiTrainingConfig(**meta["train_config"])
    if checkpoint_minutes is not None:
        # How often the state is saved does not change the weights (a resumed run ends with an
        # uninterrupted run's): the fingerprint stays the exported one.
        tcfg.checkpoint_minutes = checkpoint_minutes
    setup_s = time.perf_counter() - t0
    points = []

    def on_point(p) -> None:
        points.append(dict(p.__dict__))
        log(f"step {p.step} epoch {p.epoch} tokens {p.tokens} {p.minutes:.2f} min train_loss {p.train_loss:.4f} "
            f"val_loss {p.val_loss:.4f} lr {p.lr:.3g} {p.tokens_per_s:.0f} tok/s")

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    result = train_maemi(model, ex["train"], ex["val"], images, tcfg, out / "checkpoint.pt", meta["fingerprint"],
                         on_point=on_point, stop_after_steps=max_steps)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t1
    state = load_checkpoint(out / "checkpoint.pt", meta["fingerprint"])    # mapped to the CPU
    save_checkpoint(state, out / "checkpoint.pt")
    if state.get("finished") and split_mib:
        # What the exporting machine needs of a finished run: its weights and position (Adam's
        # moments are not read again), in pieces small enough to carry back; join them with cat.
        state["optimizer"]["state"] = {}
        blob_path = save_checkpoint(state, out / "final.pt")
        blob, piece = blob_path.read_bytes(), int(split_mib * 2**20)
        for k in range(0, len(blob), piece):
            (out / f"final.pt.part{k // piece:02d}").write_bytes(blob[k: k + piece])
        blob_path.unlink()
    report = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "transformers": __import__("transformers").__version__, "threads": torch.get_num_threads(),
        "setup_s": setup_s, "train_wall_s": wall, "steps": result.steps, "tokens": result.tokens,
        "train_minutes": result.minutes, "resumed_from_step": result.resumed_from_step,
        "tokens_per_s": result.tokens / max(result.minutes * 60, 1e-9), "final_val_loss": result.final_val_loss,
        "finished": bool(state.get("finished")), "matmul_dtype": model.cfg.matmul_dtype,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "points": points}
    (out / "gpu_run.json").write_text(json.dumps(report, indent=1, default=float))
    return report


def take_up(cfg, checkpoint: str | Path, scratch: str | Path, log: Callable[[str], None] = print):
    """The checkpoint as the ``maemi_model`` step of a workdir that reads the profile's stages:
    returns (that workdir's config, the step's summary). Nothing is trained here."""
    from maemi_core.checkpoints import load_checkpoint
    from maemi_core.data.manifest import load_manifest
    from maemi_core.teacher.instruction_set import load_instruction_set
    from maemi_core.training.instruction_tuning import tune_and_register

    scratch = Path(scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    for entry in cfg.workdir_path.iterdir():     # every stage but the model and the reports: the profile's own
        if entry.name in ("model", "reports", "runs", "paper_tables") or (scratch / entry.name).exists():
            continue
        (scratch / entry.name).symlink_to(entry.resolve())
    (scratch / "model").mkdir(exist_ok=True)
    shutil.copy(checkpoint, scratch / "model" / "checkpoint.pt")
    local = cfg.model_copy(update={"workdir": str(scratch)})
    expected = pipeline_run(local)[-1]
    state = load_checkpoint(scratch / "model" / "checkpoint.pt")
    if state is None or state.get("fingerprint") != expected or not state.get("finished"):
        raise SystemExit("the checkpoint is not a finished run of this profile on this workdir's data (finished: "
                         f"{state and state.get('finished')}; fingerprint equal: "
                         f"{state is not None and state.get('fingerprint') == expected})")
    del state
    summary = tune_and_register(local, load_manifest(local), load_instruction_set(local), tracker=None, log=log)
    if summary["resumed_from_step"] != summary["steps"]:
        raise SystemExit(f"steps were trained here (resumed at {summary['resumed_from_step']} of {summary['steps']})")
    return local, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("bundle")
    t = sub.add_parser("train")
    t.add_argument("bundle")
    t.add_argument("out")
    t.add_argument("--device", default="cuda")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (a smoke run)")
    t.add_argument("--checkpoint-minutes", type=float, default=None, help="save the state this often (default: the "
                   "profile's); a killed run started again resumes")
    t.add_argument("--split-mib", type=float, default=None, help="also write the finished run's weights as "
                   "final.pt.partNN pieces of this size")
    v = sub.add_parser("evaluate")
    v.add_argument("checkpoint")
    v.add_argument("scratch")
    v.add_argument("--no-benchmark", action="store_true", help="package only")
    args = ap.parse_args()
    cfg = load_config()
    if args.cmd == "export":
        meta = export_bundle(cfg, args.bundle)
        print(f"bundle {args.bundle}: {meta['train_examples']} train examples per epoch, {meta['val_examples']} "
              f"validation, {meta['images']} images; frozen-base matmuls {meta['matmul_dtype']}")
    elif args.cmd == "train":
        report = train_bundle(cfg, args.bundle, args.out, args.device, args.max_steps, args.checkpoint_minutes,
                              args.split_mib)
        print(json.dumps({k: v for k, v in report.items() if k != "points"}, default=float))
    else:
        local, summary = take_up(cfg, args.checkpoint, args.scratch)
        got = {k: summary[k] for k in ("inference_kernel", "category_scoring", "final_val_loss", "package")}
        if not args.no_benchmark:
            from maemi_core.evaluation.benchmark_run import run_benchmark
            from maemi_core.data.manifest import load_manifest
            from maemi_core.teacher.instruction_set import load_instruction_set

            res = run_benchmark(local, load_manifest(local), load_instruction_set(local), summary["package"], log=print,
                                model_label=f"trained by bench/gpu_training.py ({args.checkpoint})",
                                out_dir=Path(args.scratch) / "reports")
            got["key_metrics"] = res.key_metrics
        print(json.dumps(got, indent=1, default=float))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
