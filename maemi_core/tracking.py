"""The MLflow tracking store and the run conventions every asset follows.

Default store: the embedded sqlite backend ``mlflow/mlflow.db`` with artifacts under
``mlflow/artifacts`` in the project root. ``MLFLOW_TRACKING_URI`` (or ``mlflow.tracking_uri``
in the profile) points the project at a remote tracking server instead.

Every run is named ``<asset>-<dagster run id>`` and tagged with the Dagster run id, the asset
key and the profile name, so a run can be traced from either UI to the other.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

TAG_DAGSTER_RUN = "dagster.run_id"
TAG_ASSET = "dagster.asset_key"
TAG_CONFIG = "maemi.config"
TAG_CONFIG_FINGERPRINT = "maemi.config_fingerprint"
TAG_MODEL = "maemi.model"


def embedded_store(project_root: str | Path) -> tuple[str, Path]:
    """``(tracking uri, artifact root)`` of the embedded sqlite store."""
    root = Path(project_root) / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'mlflow.db').resolve()}", (root / "artifacts").resolve()


def resolve_tracking_uri(configured: Optional[str], project_root: str | Path) -> tuple[str, Optional[Path]]:
    """Profile value, else ``MLFLOW_TRACKING_URI``, else the embedded store.

    The artifact root is returned only for the embedded store (a remote server decides its own).
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    return embedded_store(project_root)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Optional[Path]) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (artifact_root / name).as_uri() if artifact_root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# What a second writer gets when it inserts a row another process inserted first (sqlite,
# PostgreSQL, MySQL): the row exists now, so the same call succeeds when it is made again.
_RACED_INSERT = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")


def log_input(dataset, context: str, attempts: int = 3) -> None:
    """``mlflow.log_input`` that survives two runs logging one dataset at once.

    MLflow's store looks the dataset up and inserts it when missing, in two statements; two
    processes logging the same (experiment, name, digest) together both miss it and the slower
    insert fails on the table's unique key. Made again, the lookup finds the row and the run only
    links to it. Any other error is raised at once.
    """
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as e:
            if attempt == attempts - 1 or not any(m in str(e) for m in _RACED_INSERT):
                raise


def run_name(asset: str, dagster_run_id: str) -> str:
    return f"{asset}-{dagster_run_id}"


@dataclass
class TrackingContext:
    """Where and under which names a pipeline step logs to MLflow."""

    tracking_uri: str
    experiment: str
    dagster_run_id: str
    config_name: str
    artifact_root: Optional[Path] = None
    extra_tags: dict[str, str] = field(default_factory=dict)
    # Given a Dagster run id: True when that run ended without finishing (failed, canceled,
    # killed). Its MLflow runs still marked RUNNING are closed as FAILED when the asset runs again.
    run_is_dead: Optional[Callable[[str], bool]] = None

    @contextlib.contextmanager
    def run(self, asset: str, model: Optional[str] = None) -> Iterator[mlflow.ActiveRun]:
        """The asset's run; with ``model``, a child run ``<asset>-<run id>/<model>`` nested in
        the active one (one MLflow run per model, grouped under the asset's run)."""
        if model is None:
            if self.run_is_dead is not None:
                close_orphaned_runs(self.tracking_uri, self.experiment, asset, self.dagster_run_id, self.run_is_dead)
            with tracked_run(self.tracking_uri, self.experiment, asset, self.dagster_run_id, self.config_name,
                             self.artifact_root, self.extra_tags) as run:
                yield run
            return
        tags = {TAG_DAGSTER_RUN: self.dagster_run_id, TAG_ASSET: asset, TAG_CONFIG: self.config_name,
                TAG_MODEL: model, **self.extra_tags}
        parent = mlflow.active_run()
        with mlflow.start_run(run_name=f"{run_name(asset, self.dagster_run_id)}/{model}", nested=True, tags=tags,
                              experiment_id=parent.info.experiment_id if parent else None) as run:
            yield run


@contextlib.contextmanager
def tracked_run(
    tracking_uri: str,
    experiment: str,
    asset: str,
    dagster_run_id: str,
    config_name: str,
    artifact_root: Optional[Path] = None,
    extra_tags: Optional[dict[str, str]] = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run following the project's naming and tagging conventions."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp_id = ensure_experiment(client, experiment, artifact_root)
    tags = {TAG_DAGSTER_RUN: dagster_run_id, TAG_ASSET: asset, TAG_CONFIG: config_name, **(extra_tags or {})}
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name(asset, dagster_run_id), tags=tags) as run:
        yield run


def close_orphaned_runs(tracking_uri: str, experiment: str, asset: str, current_dagster_run: str,
                        run_is_dead: Callable[[str], bool]) -> list[str]:
    """MLflow runs of ``asset`` still RUNNING although their Dagster run is over (a kill, an OOM,
    a lost worker) are set to FAILED, with a tag naming the run that noticed; their ids."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    closed = []
    for r in client.search_runs([exp.experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                                   f"tags.`{TAG_ASSET}` = '{asset}'", max_results=200):
        owner = r.data.tags.get(TAG_DAGSTER_RUN, "")
        if owner and owner != current_dagster_run and run_is_dead(owner):
            # nested runs (one per model) of the dead run too
            for child in client.search_runs([exp.experiment_id], filter_string=(
                    f"attributes.status = 'RUNNING' and tags.`mlflow.parentRunId` = '{r.info.run_id}'")):
                client.set_terminated(child.info.run_id, "FAILED")
            client.set_tag(r.info.run_id, "maemi.closed_by", f"dagster run {current_dagster_run}: its own run "
                                                             f"{owner} ended without closing it")
            client.set_terminated(r.info.run_id, "FAILED")
            closed.append(r.info.run_id)
    return closed
