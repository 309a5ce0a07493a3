"""The Dagster code location loads, lists the expected assets and checks, and validates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from maemi_dagster.definitions import defs
from tests.conftest import REPO

EXPECTED_ASSETS = {"raw_images", "vit_classifier", "image_embeddings", "demonstration_sets", "instruction_set",
                   "maemi_model", "benchmark_tables", "model_promotion", "fab_batch", "paper_baseline", "paper_tables"}
EXPECTED_CHECKS = {"raw_images_no_split_leakage", "raw_images_class_balance", "raw_images_rejected_fraction",
                   "raw_images_sample_groups",
                   "vit_classifier_encoder_is_validation_winner", "vit_classifier_not_below_majority",
                   "instruction_set_records_valid", "instruction_set_train_coverage", "instruction_set_task_counts",
                   "instruction_set_teacher_failures", "benchmark_tables_challenger_not_worse"}


def test_definitions_list_the_expected_assets_and_checks():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert EXPECTED_ASSETS <= keys
    checks = {k.name for k in graph.asset_check_keys}
    assert EXPECTED_CHECKS <= checks
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.group_name in {"data", "vision", "teacher", "model", "evaluation", "registry", "paper_baselines"}
        assert node.description and node.code_version and node.owners
        assert len(node.code_version) == 12 and node.code_version != "1"    # derived from the core code it runs


def test_promotion_gate_blocks_and_automation_is_listed():
    from maemi_dagster.checks import benchmark_tables_challenger_not_worse

    (spec,) = benchmark_tables_challenger_not_worse.check_specs
    assert spec.blocking and spec.asset_key == dg.AssetKey("benchmark_tables")
    assert {s.name for s in defs.sensors} == {"incoming_batches", "retune_after_ingest"}
    assert {s.name for s in defs.schedules} == {"weekly_retune"}


def test_leakage_check_blocks():
    from maemi_dagster.checks import raw_images_no_split_leakage

    (spec,) = raw_images_no_split_leakage.check_specs
    assert spec.blocking and spec.asset_key == dg.AssetKey("raw_images")


def test_cli_validates_the_workspace(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "passed validation" in out.stdout + out.stderr


def test_lineage_and_one_torch_step_at_a_time():
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("demonstration_sets")).parent_keys}
    assert {"raw_images", "image_embeddings"} <= parents          # it reads the manifest too
    torch_steps = {k.to_user_string() for k in graph.get_all_asset_keys()
                   if graph.get(k).tags.get("maemi/compute") == "torch" or
                   (defs.get_assets_def(k).op.tags or {}).get("maemi/compute") == "torch"}
    assert {"vit_classifier", "image_embeddings", "maemi_model", "benchmark_tables"} <= torch_steps
    from maemi_dagster.executor import executor

    assert executor.name == "maemi_multiprocess"


def test_code_versions_follow_the_modules_each_asset_imports(tmp_path):
    """An asset's code version hashes the core modules it can import (lazy imports included):
    a line added to the EfficientNet-Lite0 encoder or to the image transforms makes maemi_model
    and benchmark_tables stale, and leaves raw_images, which never runs them, as it was."""
    import shutil

    from maemi_core.code_version import CORE, code_version

    root = tmp_path / "maemi_core"
    shutil.copytree(CORE, root, ignore=shutil.ignore_patterns("__pycache__"))
    assets = ("raw_images", "maemi_model", "benchmark_tables")
    before = {a: code_version(a, root=root) for a in assets}
    assert len(set(before.values())) == 3
    for rel in ("vision/efficientnet_lite0.py", "data/transforms.py"):
        source = root / rel
        original = source.read_text()
        source.write_text(original + "\nUNUSED = 1\n")
        changed = {a: code_version(a, root=root) for a in assets}
        assert changed["maemi_model"] != before["maemi_model"], rel
        assert changed["benchmark_tables"] != before["benchmark_tables"], rel
        assert changed["raw_images"] == before["raw_images"], rel
        source.write_text(original)
        assert {a: code_version(a, root=root) for a in assets} == before
    # The Dagster assets carry exactly these versions.
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert graph.get(key).code_version == code_version(key.to_user_string())
