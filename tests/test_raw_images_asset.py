"""Materialize ``raw_images`` for real: Dagster in-process, a real sqlite MLflow store."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from maemi_core.config import load_config
from maemi_core.data.manifest import manifest_dir
from maemi_core import tracking
from maemi_dagster.assets.data import raw_images
from maemi_dagster.checks import RAW_IMAGES_CHECKS, raw_images_no_split_leakage
from maemi_dagster.resources import MaemiConfigResource, MLflowResource
from tests.conftest import REPO, write_profile


def materialize(profile: Path) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [raw_images, *RAW_IMAGES_CHECKS],
        resources={"maemi_config": MaemiConfigResource(path=str(profile)), "mlflow_tracking": MLflowResource()},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=True,
    )


def checks_by_name(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_tiny_profile_materializes_with_checks_and_mlflow_run(tmp_path, monkeypatch):
    # The shipped tiny profile, moved to a scratch project root with the embedded store.
    (tmp_path / "configs").mkdir()
    profile = tmp_path / "configs" / "tiny.yaml"
    shutil.copy(REPO / "configs" / "tiny.yaml", profile)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    result = materialize(profile)
    assert result.success
    (mat,) = result.asset_materializations_for_node("raw_images")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["dagster/row_count"] == 64
    assert meta["n_rejected"] == 0
    assert "| functional " in meta["counts_per_split_and_class"] and "| total " in meta["counts_per_split_and_class"]
    assert meta["preview"].startswith("![samples per class](data:image/png;base64,")
    assert mat.tags.get("dagster/data_version") == meta["data_version"]

    checks = checks_by_name(result)
    assert {name: c.passed for name, c in checks.items()} == {
        "raw_images_no_split_leakage": True, "raw_images_class_balance": True, "raw_images_rejected_fraction": True,
        "raw_images_sample_groups": True}

    cfg = load_config(profile)
    manifest = pd.read_parquet(manifest_dir(cfg) / "manifest.parquet")
    assert len(manifest) == 64 and set(manifest["split"]) == {"train", "val", "test"}
    assert (manifest_dir(cfg) / "preview.png").stat().st_size > 10_000

    # The embedded store under <project root>/mlflow, run named and tagged by convention.
    uri, artifacts = tracking.embedded_store(tmp_path)
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("maemi-elpv-tiny")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == f"raw_images-{result.run_id}"
    assert run.data.tags[tracking.TAG_DAGSTER_RUN] == result.run_id
    assert run.data.tags[tracking.TAG_ASSET] == "raw_images"
    assert run.data.tags[tracking.TAG_CONFIG] == "tiny"
    assert run.data.metrics["n_images"] == 64
    assert run.data.params["data_version"] == meta["data_version"]
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "raw_images")}
    assert {"manifest.parquet", "rejected.parquet", "preview.png", "summary.json"} <= logged
    assert Path(exp.artifact_location.removeprefix("file://")).is_relative_to(artifacts)


def test_bad_files_do_not_fail_the_run_but_fail_the_bound(messy_imagefolder, tmp_path):
    profile = write_profile(tmp_path, max_rejected_fraction=0.5)
    result = materialize(profile)
    assert result.success
    (mat,) = result.asset_materializations_for_node("raw_images")
    assert mat.metadata["dagster/row_count"].value == 6
    assert mat.metadata["n_rejected"].value == 5
    assert "truncated" in mat.metadata["rejected_by_reason"].value
    assert checks_by_name(result)["raw_images_rejected_fraction"].passed  # 5/11 <= 0.5

    data = yaml.safe_load(profile.read_text())
    data["dataset"]["max_rejected_fraction"] = 0.05
    profile.write_text(yaml.safe_dump(data))
    checks = checks_by_name(materialize(profile))
    assert not checks["raw_images_rejected_fraction"].passed
    # Only two classes, one of them with 2 images: the balance check warns about empty cells.
    assert checks["raw_images_class_balance"].severity == dg.AssetCheckSeverity.WARN


def test_leakage_check_fails_on_a_leaking_manifest(tmp_path):
    profile = write_profile(tmp_path)
    cfg = load_config(profile)
    manifest_dir(cfg).mkdir(parents=True)
    pd.DataFrame({"image_id": ["x", "x", "y"], "label": ["a", "a", "b"], "split": ["train", "test", "val"]}).to_parquet(
        manifest_dir(cfg) / "manifest.parquet")
    result = raw_images_no_split_leakage(dg.build_asset_check_context(), maemi_config=MaemiConfigResource(path=str(profile)))
    assert not result.passed
    assert result.metadata["leaked_rows"].value == 2


def test_data_version_follows_content(tmp_path, elpv_paths, copy_file):
    for i, p in enumerate(elpv_paths[:10]):
        copy_file(p, tmp_path / "images" / ("a" if i % 2 else "b") / p.name)
    profile = write_profile(tmp_path)

    def version():
        (mat,) = materialize(profile).asset_materializations_for_node("raw_images")
        return mat.metadata["data_version"].value

    first = version()
    assert version() == first
    copy_file(elpv_paths[10], tmp_path / "images" / "a" / "new.png")
    assert version() != first


@pytest.mark.parametrize("configured", [None, "sqlite:///explicit.db"])
def test_tracking_uri_precedence(tmp_path, monkeypatch, configured):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    uri, artifacts = tracking.resolve_tracking_uri(configured, tmp_path)
    assert uri == (configured or "http://127.0.0.1:5999") and artifacts is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri, artifacts = tracking.resolve_tracking_uri(None, tmp_path)
    assert uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}" and artifacts == tmp_path / "mlflow" / "artifacts"


def test_sample_groups_are_shown_and_a_dominant_sample_warns(tmp_path, elpv_paths):
    from tests.conftest import write_profile
    from tests.test_manifest import _frames

    _frames(elpv_paths[0], tmp_path / "images" / "a", "big", 8)
    for i, src in enumerate(elpv_paths[1:9]):
        _frames(src, tmp_path / "images" / ("a" if i < 2 else "b"), f"s{i}", 2)
    profile = write_profile(tmp_path, group_by=r"/([a-z]+\d*)_frame")
    result = materialize(profile)
    (mat,) = result.asset_materializations_for_node("raw_images")
    assert mat.metadata["sample_groups"].value == 9
    assert "big" in mat.metadata["largest_groups"].value
    assert mat.metadata["group_preview"].value.startswith("![images of the largest sample groups](data:image/png")
    check = checks_by_name(result)["raw_images_sample_groups"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN and "dominated" in check.description
