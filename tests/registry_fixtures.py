"""A tiny registered MAEMI model in a scratch MLflow store: a random 2-layer Llama with SmolLM2's
tokenizer and an untrained paper ViT, packaged with ``save_package`` and registered with
``log_and_register`` (seconds, not the pipeline's minutes). For the commands and the chat page
that serve registered versions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from maemi_core.config import load_config

CLASSES = ["defective", "functional"]
CLASSIFY_QUESTION = "<image>\nIs this solar cell defective or functional?"


@dataclass
class TinyRegistry:
    profile: Path                 # a profile whose mlflow.tracking_uri is the scratch store
    tracking_uri: str
    name: str                     # the registered model
    versions: dict[str, str]      # alias -> version


def register_tiny_models(root: Path, aliases: tuple[str, ...] = ("champion",), max_new_tokens: int = 8,
                         lm_profile: str = "tiny") -> TinyRegistry:
    """One version per alias (seeds 0, 1, ...), registered in ``root/mlflow.db`` with artifacts
    under ``root/artifacts``; ``aliases[i]`` points at the i-th version. ``lm_profile="default"``:
    SmolLM2-135M as it ships (loaded from its file like a real version, in about a second) with
    untrained adapters."""
    import torch
    from mlflow.tracking import MlflowClient

    from maemi_core.model.maemi_model import build_model, save_package
    from maemi_core.vision.classifiers import vit_dir
    from maemi_core.model_registry import log_and_register, registered_model_name
    from maemi_core.tracking import TrackingContext
    from maemi_core.vision.vit import PaperViT, PaperViTConfig

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    profile = root / "profile.yaml"
    profile.write_text(yaml.safe_dump({
        "dataset": {"name": "chattest", "kind": "imagefolder", "root": "images", "prompt_pack": "elpv",
                    "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "workdir": "work",
        "mlflow": {"tracking_uri": uri, "experiment": "chattest"},
        "vision": {"encoder": "vit", "image_size": 224},
        "model": {"lm_profile": lm_profile, "xattn_every": 1, "xattn_heads": 2, "xattn_head_dim": 16, "r_min": 2,
                  "r_max": 8, "alpha": 8.0, "max_new_tokens": max_new_tokens},
    }))
    cfg = load_config(profile)
    name = registered_model_name(cfg.dataset.name)
    tracker = TrackingContext(uri, cfg.mlflow.experiment, "tiny-registry", profile.name, root / "artifacts")
    versions: dict[str, str] = {}
    for seed, alias in enumerate(aliases):
        torch.manual_seed(seed)
        PaperViT(PaperViTConfig(num_classes=len(CLASSES))).save(vit_dir(cfg), CLASSES)
        cfg.model.seed = seed
        model = build_model(cfg, vit_dir(cfg))
        # A random LM with tied embeddings copies its last prompt token (a newline: an empty
        # answer); with the final norm negated its greedy answer is words.
        if lm_profile == "tiny":
            with torch.no_grad():
                model.lm.model.norm.weight.mul_(-1)
        package = save_package(model, cfg, root / f"v{seed}" / "package",
                               {"class_names": CLASSES, "classify_question": CLASSIFY_QUESTION})
        with tracker.run("maemi_model"):
            _, version = log_and_register(package, name, {"test": f"tiny seed {seed}"})
        MlflowClient(uri).set_registered_model_alias(name, alias, version)
        versions[alias] = version
    if "challenger" not in aliases:   # log_and_register points it at every new version
        MlflowClient(uri).delete_registered_model_alias(name, "challenger")
    return TinyRegistry(profile, uri, name, versions)
