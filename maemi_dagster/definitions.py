"""The Dagster code location: ``dagster dev -w workspace.yaml`` or ``-m maemi_dagster.definitions``."""

import os

import dagster as dg

from maemi_core.config import TeacherConfig
from maemi_dagster.assets import data, evaluation, model, operations, paper_baselines, teacher, vision
from maemi_dagster.automation import JOBS, SCHEDULES, SENSORS
from maemi_dagster.checks import EVALUATION_CHECKS, INSTRUCTION_SET_CHECKS, RAW_IMAGES_CHECKS, VISION_CHECKS
from maemi_dagster.executor import executor
from maemi_dagster.resources import MaemiConfigResource, MLflowResource, TeacherResource

# The key is only bound when its variable exists, so profiles with the on-prem measurement
# teacher (the default) need no secret at all.
_KEY_ENV = TeacherConfig().api_key_env

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([data, vision, teacher, model, evaluation, operations, paper_baselines]),
    asset_checks=[*RAW_IMAGES_CHECKS, *VISION_CHECKS, *INSTRUCTION_SET_CHECKS, *EVALUATION_CHECKS],
    jobs=JOBS,
    sensors=SENSORS,
    schedules=SCHEDULES,
    executor=executor,
    resources={
        "maemi_config": MaemiConfigResource(),
        "mlflow_tracking": MLflowResource(),
        "teacher": TeacherResource(api_key=dg.EnvVar(_KEY_ENV) if os.environ.get(_KEY_ENV) else None),
    },
)
