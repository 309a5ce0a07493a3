"""The Dagster code location: ``dagster dev -w workspace.yaml`` or ``-m maemi_dagster.definitions``."""

import dagster as dg

from maemi_dagster.assets import data, vision
from maemi_dagster.checks import RAW_IMAGES_CHECKS
from maemi_dagster.resources import MaemiConfigResource, MLflowResource

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([data, vision]),
    asset_checks=RAW_IMAGES_CHECKS,
    resources={
        "maemi_config": MaemiConfigResource(),
        "mlflow_tracking": MLflowResource(),
    },
)
