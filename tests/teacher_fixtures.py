"""A small real dataset for teacher tests: the tiny ELPV slice with sampled demonstrations."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml

from maemi_core.config import load_config
from maemi_core.data.manifest import build_manifest
from maemi_core.vision.similarity_sampling import build_groups, few_shot_demonstrations
from tests.conftest import REPO


def teacher_project(tmp_path: Path, teacher: dict | None = None, per_class: int = 4, tasks: list[str] | None = None,
                    private: bool = True, prompt_pack: str = "elpv"):
    """(cfg, manifest, few_shot, groups) for a scratch project with the tiny profile's data."""
    (tmp_path / "configs").mkdir(exist_ok=True)
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["dataset"]["max_per_class"] = per_class
    data["dataset"]["split"] = {"train": 0.5, "val": 0.25, "test": 0.25}
    data["dataset"]["private"] = private
    data["dataset"]["prompt_pack"] = prompt_pack
    data["teacher"] = {"vqa_questions_per_image": 2, "concurrency": 4, **(teacher or {})}
    if tasks is not None:
        data["teacher"]["tasks"] = tasks
    data["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "teacher-test"}
    profile = tmp_path / "configs" / "teacher.yaml"
    profile.write_text(yaml.safe_dump(data))
    cfg = load_config(profile)
    manifest = build_manifest(cfg).manifest
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(manifest), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = manifest[["image_id", "split", "label"]].reset_index(drop=True)
    few_shot = few_shot_demonstrations(index, emb, k=2)
    groups = build_groups(index, emb, rng.random(len(manifest)), group_size=2, groups_per_split=1)
    return cfg, manifest, few_shot, groups


def copy_pack(src_name: str, dst: Path) -> Path:
    from maemi_core.teacher.prompt_pack import PACKS_DIR

    shutil.copy(PACKS_DIR / f"{src_name}.yaml", dst)
    return dst
