"""Jobs, sensors and the schedule that re-tune MAEMI on new fab data.

incoming_batches (sensor, every operations.sensor_interval_s): a new *complete* batch in the
drop folder becomes a ``fab_batches`` partition and an ingestion run; its cursor remembers the
batches already requested, so a batch is picked up once, and a half-copied one not at all.
retune_after_ingest (run-status sensor): a successful ingestion requests the re-tuning job.
weekly_retune (schedule, operations.retune_cron): the re-tuning job even when no sensor fired,
skipped when data, code and profile are unchanged since the last successful re-tune.
All three start enabled and can be switched off in the UI (Automation); the daemon that runs
them is part of ``dagster dev``.
"""

from __future__ import annotations

import json

import dagster as dg

from maemi_core.config import ConfigError, config_path_from_env, load_config
from maemi_core.data.incoming import scan_batches
from maemi_dagster.assets.data import raw_images
from maemi_dagster.assets.evaluation import benchmark_tables
from maemi_dagster.assets.model import maemi_model
from maemi_dagster.assets.operations import fab_batch, fab_batches, model_promotion
from maemi_dagster.assets.teacher import instruction_set
from maemi_dagster.assets.vision import demonstration_sets, image_embeddings, vit_classifier
from maemi_dagster.resources import MaemiConfigResource

try:
    _CFG = load_config(config_path_from_env())
    _OPS, _DATASET = _CFG.operations, _CFG.dataset.name
except ConfigError:  # a broken profile must not stop the code location from loading
    from maemi_core.config import OperationsConfig

    _OPS, _DATASET = OperationsConfig(), "unknown"

# The run queue (deploy/dagster.yaml) allows one run per value of this tag: one re-tuning per dataset.
RETUNE_TAG = "maemi/retune"

ingest_job = dg.define_asset_job(
    "ingest_fab_batch", selection=dg.AssetSelection.assets(fab_batch), partitions_def=fab_batches,
    description="Validate one new fab batch (a fab_batches partition) so raw_images includes it.")

# Everything that depends on the images, the vision stage included: its classifiers score every
# test image of the current manifest, so the classification benchmark (every row on the same
# images) covers the new fab images too. The stage costs minutes next to the re-tune's training.
retune_job = dg.define_asset_job(
    "retune",
    selection=dg.AssetSelection.assets(raw_images, vit_classifier, image_embeddings, demonstration_sets,
                                       instruction_set, maemi_model, benchmark_tables, model_promotion),
    description="Re-tune on everything ingested: manifest, the vision classifiers and embeddings, demonstrations, "
                "instructions for the new images (the teacher cache answers the rest), training from the champion's "
                "adapters, the benchmark on every current test image, and promotion if the new version is shown not "
                "worse (maemi_core/registry/model_promotion.py).",
    tags={"maemi/job": "retune", RETUNE_TAG: _DATASET},
)


# What `make demo` materializes, as a job that can be submitted to the run queue (the multi-host
# stack's way to run the whole pipeline: `dagster job launch -j everything`).
everything_job = dg.define_asset_job(
    "everything", selection=dg.AssetSelection.all() - dg.AssetSelection.assets(fab_batch)
    - dg.AssetSelection.groups("paper_baselines"),
    description="Every asset but the per-batch ingestion, with its checks: the whole pipeline on the profile's data.",
    tags={"maemi/job": "everything"})


@dg.sensor(job=ingest_job, minimum_interval_seconds=_OPS.sensor_interval_s,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="New complete batches in the drop folder -> a fab_batches partition and an ingestion run.")
def incoming_batches(context: dg.SensorEvaluationContext, maemi_config: MaemiConfigResource):
    cfg = maemi_config.load()
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    statuses = scan_batches(cfg)
    waiting = [f"{b.name} ({b.reason})" for b in statuses if not b.complete]
    new = [b.name for b in statuses if b.complete and b.name not in seen]
    if not new:
        return dg.SkipReason("no new complete batch in " + str(cfg.incoming_path)
                             + (f"; waiting: {', '.join(waiting)}" if waiting else ""))
    context.log.info(f"new batches: {new}" + (f"; still waiting: {waiting}" if waiting else ""))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=b, run_key=f"ingest-{b}", tags={"maemi/batch": b}) for b in new],
        dynamic_partitions_requests=[fab_batches.build_add_request(new)],
        cursor=json.dumps(sorted(seen | set(new))),
    )


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[ingest_job], request_job=retune_job,
                      default_status=dg.DefaultSensorStatus.RUNNING,
                      description="A successful batch ingestion requests a re-tuning run.")
def retune_after_ingest(context: dg.RunStatusSensorContext):
    batch = context.dagster_run.tags.get("dagster/partition", "")
    fp = retune_fingerprint(load_config(config_path_from_env()))
    return dg.RunRequest(run_key=f"retune-after-{context.dagster_run.run_id}",
                         tags={"maemi/trigger": "fab_batch", "maemi/batch": batch,
                               FINGERPRINT_TAG: json.dumps(fp, sort_keys=True)})


FINGERPRINT_TAG = "maemi/retune_fingerprint"


def retune_fingerprint(cfg) -> dict:
    """What a re-tuning depends on: the dataset's files (path, size, modification time, fab
    batches included), the code (every core module an asset runs) and the profile."""
    import hashlib

    from maemi_core.code_version import ASSET_ENTRIES, code_version
    from maemi_core.data.manifest import list_candidates

    data = hashlib.sha256()
    for c in sorted(list_candidates(cfg), key=lambda c: str(c.path)):
        if c.rejected is not None:       # listed only to be refused (a link out of the drop folder, ...)
            continue
        st = c.path.stat()
        data.update(f"{c.path}|{st.st_size}|{st.st_mtime_ns}|{c.label}\n".encode())
    profile = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    return {"data": data.hexdigest()[:12], "code": code_version(*ASSET_ENTRIES), "profile": profile.hexdigest()[:12]}


def _last_retune(instance) -> dg.DagsterRun | None:
    runs = instance.get_runs(filters=dg.RunsFilter(job_name="retune", statuses=[dg.DagsterRunStatus.SUCCESS]),
                             limit=1)
    return runs[0] if runs else None


@dg.schedule(name="weekly_retune", job=retune_job, cron_schedule=_OPS.retune_cron,
             execution_timezone=_OPS.timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
             description="Re-tune on everything accumulated since the last champion, even when no sensor fired; "
                         "skipped, with the reason shown, when data, code and profile are unchanged since the last "
                         "successful re-tune.")
def weekly_retune(context: dg.ScheduleEvaluationContext, maemi_config: MaemiConfigResource):
    return retune_decision(retune_fingerprint(maemi_config.load()), _last_retune(context.instance))


def retune_decision(fp: dict, last) -> dg.RunRequest | dg.SkipReason:
    """Skip when the last successful re-tune (``last``: a run with ``tags`` and ``run_id``, or
    None) had the same fingerprint; else a run request naming what changed."""
    if last is not None and last.tags.get(FINGERPRINT_TAG) == json.dumps(fp, sort_keys=True):
        return dg.SkipReason(f"data, code and profile unchanged since re-tune run {last.run_id[:8]} "
                             f"(data {fp['data']}, code {fp['code']}, profile {fp['profile']})")
    changed = ([k for k, v in json.loads(last.tags[FINGERPRINT_TAG]).items() if fp.get(k) != v]
               if last is not None and FINGERPRINT_TAG in last.tags else ["no previous re-tune"])
    return dg.RunRequest(tags={"maemi/trigger": "schedule", "maemi/changed": ",".join(changed),
                               FINGERPRINT_TAG: json.dumps(fp, sort_keys=True)})

# The paper's Tables 7 and 8 (not part of `make demo`): launch a backfill of every partition of
# paper_baseline (one run per row; the run queue and the torch pool decide how many at once),
# then paper_tables.
paper_baselines_job = dg.define_asset_job(
    "paper_baselines", selection=dg.AssetSelection.keys("paper_baseline"),
    description="Train one row of the paper's Tables 7/8 per partition (backfill all partitions for the whole zoo).",
    tags={"maemi/job": "paper_baselines"})
paper_tables_job = dg.define_asset_job(
    "build_paper_tables", selection=dg.AssetSelection.keys("paper_tables"),
    description="Tables 7 and 8 from the rows trained so far, beside MAEMI's rows.", tags={"maemi/job": "build_paper_tables"})

JOBS = [ingest_job, retune_job, everything_job, paper_baselines_job, paper_tables_job]
SENSORS = [incoming_batches, retune_after_ingest]
SCHEDULES = [weekly_retune]
