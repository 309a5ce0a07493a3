"""Registering MAEMI versions in the MLflow Model Registry (aliases, never stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient

PYFUNC_FILE = Path(__file__).resolve().parent / "registry" / "maemi_pyfunc.py"
CHALLENGER, CHAMPION = "challenger", "champion"


def registered_model_name(dataset_name: str) -> str:
    return f"maemi-{dataset_name}"


def log_and_register(package_dir: str | Path, name: str, tags: dict[str, str],
                     input_example=None) -> tuple[str, str]:
    """Log the pyfunc (models-from-code) in the active run, register it as a new version of
    ``name`` and point the ``challenger`` alias at it. Returns (model URI, version)."""
    info = mlflow.pyfunc.log_model(
        name="maemi", python_model=str(PYFUNC_FILE), artifacts={"package": str(package_dir)},
        registered_model_name=name, input_example=input_example,
        pip_requirements=["torch==2.13.0", "transformers", "mlflow", "pandas", "pillow", "safetensors"],
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.set_registered_model_alias(name, CHALLENGER, version)
    return info.model_uri, version


class RegistryError(RuntimeError):
    """The model registry could not answer: nothing may be promoted or assumed absent."""


def is_missing(exc: Exception) -> bool:
    """True only for "this model / alias does not exist" (sqlite answers a missing alias with
    INVALID_PARAMETER_VALUE "... alias ... not found"); a 5xx, an auth error or a timeout is not."""
    code = getattr(exc, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc).lower())


def alias_version(name: str, alias: str) -> Optional[str]:
    """The version ``alias`` points at; None only when the model or the alias does not exist.
    Any other registry error raises :class:`RegistryError` naming the tracking URI, so that a
    failing server never reads as "no champion yet" (which would promote without comparison)."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as exc:
        if is_missing(exc):
            return None
        raise RegistryError(f"the MLflow registry at {mlflow.get_tracking_uri()} failed to resolve {name}@{alias}: "
                            f"{exc}. Nothing was promoted and no alias moved; check the tracking server "
                            "(MLFLOW_TRACKING_URI / mlflow.tracking_uri) and re-run.") from exc


def download_package(name: str, alias_or_version: str, dst: Optional[str | Path] = None) -> tuple[Path, str]:
    """The MAEMI package folder of ``models:/<name>@<alias>`` (or ``models:/<name>/<version>``
    when given digits) on local disk, and its version."""
    if str(alias_or_version).isdigit():
        version = str(alias_or_version)
    else:
        version = alias_version(name, alias_or_version)
        if version is None:
            raise LookupError(f"registered model {name!r} has no version with alias {alias_or_version!r}: "
                              "materialize maemi_model first")
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst) if dst else None)
    package = Path(local) / "artifacts" / "package"
    if not (package / "maemi.json").is_file():
        raise FileNotFoundError(f"models:/{name}/{version} holds no MAEMI package (looked in {package})")
    return package, version
