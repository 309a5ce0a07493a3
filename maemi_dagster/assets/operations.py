"""Operations: new fab batches (a dynamic partition per batch) and registry promotion."""

import dagster as dg

from maemi_core.code_version import code_version
from maemi_core.data.incoming import ingest_batch
from maemi_core.registry.model_promotion import promote_challenger
from maemi_dagster.assets.data import OWNERS
from maemi_dagster.assets.evaluation import benchmark_tables
from maemi_dagster.metadata import table_md
from maemi_dagster.resources import MaemiConfigResource, MLflowResource

fab_batches = dg.DynamicPartitionsDefinition(name="fab_batches")


@dg.asset(
    group_name="data",
    code_version=code_version("fab_batch"),
    owners=OWNERS,
    kinds={"python"},
    partitions_def=fab_batches,
    description=(
        "One complete batch of new fab images from the drop folder (<incoming>/<batch>/<class>/<files>), "
        "registered as a partition by the incoming_batches sensor. Ingesting it validates the files and makes "
        "raw_images include them (same validation, quarantine and hash-based splits)."
    ),
)
def fab_batch(context: dg.AssetExecutionContext, maemi_config: MaemiConfigResource) -> dg.MaterializeResult:
    cfg = maemi_config.load(context)
    rec = ingest_batch(cfg, context.partition_key)
    n = sum(rec["images_per_class"].values())
    context.log.info(f"batch {rec['batch']}: {n} images in {len(rec['images_per_class'])} classes, "
                     f"{len(rec['rejected'])} rejected ({rec['complete_because']})")
    import pandas as pd

    return dg.MaterializeResult(metadata={
        "images": n, "rejected": len(rec["rejected"]), "complete_because": rec["complete_because"],
        "images_per_class": table_md(pd.Series(rec["images_per_class"], name="images").to_frame()),
        "path": dg.MetadataValue.path(rec["path"]),
    })


@dg.asset(
    group_name="registry",
    code_version=code_version("model_promotion"),
    owners=OWNERS,
    kinds={"mlflow"},
    deps=[benchmark_tables],
    pool="maemi_registry",
    description=(
        "Moves the MLflow alias `champion` to the version this run registered and benchmarked when the promotion "
        "rules hold (paired non-inferiority to the champion and the reference on every key metric, see "
        "benchmark_tables_challenger_not_worse); runs only after that blocking check passes, and re-compares under "
        "a registry lock so concurrent re-tuning runs cannot leave a worse champion. Every decision goes to the "
        "promotion log and the version's promotion.* tags."
    ),
)
def model_promotion(context: dg.AssetExecutionContext, maemi_config: MaemiConfigResource,
                    mlflow_tracking: MLflowResource) -> dg.MaterializeResult:
    cfg = maemi_config.load(context)
    mlflow_tracking.activate(cfg)
    out = promote_challenger(cfg, context.run_id, log=context.log.info)
    d = out["decision"]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{out['registered_model']}-champion-v{out['champion']}"),
        metadata={
            "decision": "promoted" if d.promote else "rejected",
            "reason": d.reason,
            "challenger": out["challenger"],
            "champion": str(out["champion"]),
            "metrics": table_md(d.table().round(4), index=False),
            "promotion_log": table_md(out["log"].drop(columns=["metrics"]).tail(20), index=False),
        },
    )
