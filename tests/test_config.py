"""Profiles: the shipped ones load, bad ones fail with a message that says what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from maemi_core.config import ConfigError, load_config
from tests.conftest import REPO, write_profile


@pytest.mark.parametrize("name", ["default", "tiny", "sem", "quick"])
def test_shipped_profiles_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.config_name == name
    assert Path(cfg.project_root) == REPO
    assert cfg.workdir_path == REPO / ".maemi" / cfg.dataset.name
    assert cfg.dataset.private is True


def test_sem_profile_is_the_papers_imagefolder():
    cfg = load_config(REPO / "configs" / "sem.yaml")
    assert (cfg.dataset.kind, cfg.dataset.prompt_pack, cfg.dataset.crop_databar) == ("imagefolder", "sem", True)


def test_env_var_selects_the_profile(monkeypatch):
    monkeypatch.setenv("MAEMI_CONFIG", str(REPO / "configs" / "tiny.yaml"))
    assert load_config().dataset.name == "elpv-tiny"
    monkeypatch.setenv("MAEMI_CONFIG", "configs/tiny.yaml")  # relative to the checkout
    monkeypatch.chdir("/")
    assert load_config().dataset.name == "elpv-tiny"


def test_errors_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="MAEMI_CONFIG"):
        load_config(tmp_path / "missing.yaml")

    path = write_profile(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["dataset"]["prmopt_pack"] = "sem"  # typo
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="prmopt_pack"):
        load_config(path)

    with pytest.raises(ConfigError, match="dataset.root"):
        load_config(write_profile(tmp_path, root=None))
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(write_profile(tmp_path, split={"train": 0.9, "val": 0.2, "test": 0.1}))


def test_training_and_promotion_settings_that_cannot_work_are_refused_at_load(tmp_path):
    from maemi_core.config import KEY_METRIC_NAMES
    from maemi_core.evaluation.benchmark_tables import TEXT_TABLES
    from maemi_core.evaluation.text_metrics import METRICS

    # the names promotion accepts are the per-record metrics the benchmark stores
    assert {f"{t}.{m}" for t in TEXT_TABLES for m in METRICS} <= set(KEY_METRIC_NAMES)

    def profile(**sections):
        path = write_profile(tmp_path)
        data = yaml.safe_load(path.read_text())
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        path.write_text(yaml.safe_dump(data))
        return path

    with pytest.raises(ConfigError, match="vqa.meteorr.*choose from"):        # misspelled: never n = 0 forever
        load_config(profile(promotion={"key_metrics": {"vqa.meteorr": 0.04}}))
    with pytest.raises(ConfigError, match="no_vision_baseline is off.*require_grounding: false"):
        load_config(profile(evaluation={"no_vision_baseline": False}, promotion={"first_must_beat_base_lm": False}))
    with pytest.raises(ConfigError, match=r"weights \['heterogeneity'\], which model.train_tasks .* does not train"):
        load_config(profile(model={"train_tasks": ["caption", "vqa"], "train_task_weights": {"heterogeneity": 3}}))
    with pytest.raises(ConfigError, match="max_epochs is no longer read.*train_budget"):
        load_config(profile(model={"max_epochs": 2}))
    with pytest.raises(ConfigError, match="exactly one of tokens, minutes or epochs"):
        load_config(profile(model={"train_budget": {"tokens": 1000, "minutes": 5}}))
    cfg = load_config(profile(model={"train_budget": {"minutes": 90, "decay_fraction": 0.3},
                                     "retune_budget": {"tokens": 5000}}))
    from maemi_core.training.instruction_tuning import training_config

    assert training_config(cfg).budget == ("minutes", 90.0) and training_config(cfg).decay_fraction == 0.3
    assert training_config(cfg, warm_start=True).budget == ("tokens", 5000.0)


def test_relative_paths_resolve_against_the_profile_folder(tmp_path):
    cfg = load_config(write_profile(tmp_path))
    assert cfg.workdir_path == tmp_path / "work"
    assert cfg.resolve("images") == tmp_path / "images"


def test_cli_prints_counts_and_reports_bad_profiles(tmp_path, messy_imagefolder, capsys):
    from maemi_core.cli import main

    assert main(["--config", str(write_profile(tmp_path)), "manifest"]) == 0
    out = capsys.readouterr().out
    assert "| cracked " in out and "truncated" in out
    assert main(["--config", str(tmp_path / "nope.yaml"), "manifest"]) == 2
    assert "MAEMI_CONFIG" in capsys.readouterr().err


def test_the_configuration_reference_is_generated_from_the_code():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / "scripts" / "config_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = (REPO / "docs" / "configuration_reference.md").read_text()
    assert "`model.train_budget.tokens`" in page and "`promotion.require_grounding`" in page


def test_a_head_scoring_without_train_prompts_is_refused_at_load(tmp_path):
    path = write_profile(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["evaluation"] = {"category_scoring": "head", "head_train_images": 0}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="head_train_images is 0"):
        load_config(path)
    data["evaluation"]["head_train_images"] = 400
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).evaluation.head_train_images == 400
