"""Resources: the active profile and the MLflow tracking store."""

import contextlib
from typing import Iterator, Optional

import dagster as dg

from maemi_core.config import MaemiConfig, config_path_from_env, load_config
from maemi_core import tracking
from maemi_core.run_isolation import check_shared, scoped
from maemi_dagster.executor import steps_on_many_hosts


class MaemiConfigResource(dg.ConfigurableResource):
    """The profile (``configs/*.yaml``) every asset reads; defaults to ``$MAEMI_CONFIG``."""

    path: str = ""

    def load(self, context=None, writes: Optional[str] = None) -> MaemiConfig:
        """The profile; with a step's ``context``, scoped to its run (maemi_core/run_isolation.py):
        ``writes`` names the stage the step produces, in a folder no other run touches."""
        cfg = load_config(self.path or config_path_from_env())
        try:
            run = context.run if context is not None else None
        except Exception:  # a context built for a direct call (tests, notebooks) has no run
            run = None
        if run is None:
            return cfg
        if steps_on_many_hosts():
            # Steps of one run land on different hosts and pass files by path: fail here, clearly,
            # on a worker that does not see the deployment's shared workdir.
            check_shared(cfg)
        return scoped(cfg, run_scope(run), writes)


def _run_is_dead(instance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    # Unknown to this instance (another deployment, a deleted run): leave it alone.
    return run is not None and run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def run_scope(run) -> str:
    """The Dagster root run id: re-executions of a run continue in its folders."""
    return run.tags.get("dagster/root_run_id") or run.run_id


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking, written for this project (``dagster-mlflow`` pins old MLflow).

    ``tracking_uri`` empty: the profile's ``mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``,
    else the embedded sqlite store under ``mlflow/``.
    """

    tracking_uri: Optional[str] = None

    def uri_and_artifacts(self, cfg: MaemiConfig):
        return tracking.resolve_tracking_uri(self.tracking_uri or cfg.mlflow.tracking_uri, cfg.project_root)

    def activate(self, cfg: MaemiConfig) -> str:
        """Point this process's MLflow client (registry calls outside a run) at the store."""
        import mlflow

        uri = self.uri_and_artifacts(cfg)[0]
        mlflow.set_tracking_uri(uri)
        return uri

    def tracking_context(self, context: dg.AssetExecutionContext, cfg: MaemiConfig) -> tracking.TrackingContext:
        """What core functions need to log runs under the project's conventions."""
        uri, artifacts = self.uri_and_artifacts(cfg)
        return tracking.TrackingContext(
            tracking_uri=uri, experiment=cfg.experiment_name, dagster_run_id=context.run.run_id,
            config_name=cfg.config_name, artifact_root=artifacts,
            extra_tags={tracking.TAG_CONFIG_FINGERPRINT: cfg.fingerprint()},
            run_is_dead=lambda run_id: _run_is_dead(context.instance, run_id),
        )

    @contextlib.contextmanager
    def start_run(self, context: dg.AssetExecutionContext, cfg: MaemiConfig) -> Iterator:
        ctx = self.tracking_context(context, cfg)
        asset = context.asset_key.to_user_string()
        with ctx.run(asset) as run:
            context.log.info(f"MLflow run {run.info.run_id} ({tracking.run_name(asset, ctx.dagster_run_id)}) at {ctx.tracking_uri}")
            yield run


class TeacherResource(dg.ConfigurableResource):
    """Secrets of the teacher. ``api_key`` is bound to ``dg.EnvVar`` in the definitions (when the
    variable named by ``teacher.api_key_env`` is set); it is passed to the client only, never
    logged, never written to MLflow. Everything else about the teacher is in the profile."""

    api_key: Optional[str] = None
