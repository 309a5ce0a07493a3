"""Model stage: instruction-tune MAEMI and register the new version as `challenger`."""

import dagster as dg

from maemi_core.code_version import code_version
from maemi_core.data.manifest import load_manifest
from maemi_core.teacher.instruction_set import load_instruction_set
from maemi_core.training.instruction_tuning import tune_and_register
from maemi_core.run_isolation import data_version, fingerprint, publish
from maemi_core.threads import fit_threads
from maemi_dagster.assets.data import OWNERS
from maemi_dagster.assets.teacher import instruction_set
from maemi_dagster.assets.vision import visual_token_inputs, vit_classifier
from maemi_dagster.executor import TORCH_POOL, TORCH_STEP
from maemi_dagster.metadata import image_md
from maemi_dagster.resources import MaemiConfigResource, MLflowResource
from maemi_dagster.reuse import Recompute, reuse_unchanged

MODEL_CODE = code_version("maemi_model")


@dg.asset(
    op_tags=TORCH_STEP, pool=TORCH_POOL,
    group_name="model",
    code_version=MODEL_CODE,
    owners=OWNERS,
    kinds={"pytorch", "mlflow"},
    deps=[vit_classifier, instruction_set],
    description=(
        "MAEMI: the vision encoder (frozen) + gated cross-attention every n-th decoder layer + a causal LM "
        "tuned with DyQLoRA-FA (int8 frozen base, frozen random A, trained B, rank sampled per step). "
        "Answer-only cross-entropy on the train records, early stopping on val, resumable. Registered in "
        "MLflow as maemi-<dataset> with alias `challenger`."
    ),
)
def maemi_model(context: dg.AssetExecutionContext, config: Recompute, maemi_config: MaemiConfigResource,
                mlflow_tracking: MLflowResource) -> dg.MaterializeResult:
    cfg = maemi_config.load(context, writes="model")
    # Inputs: records, images, the frozen encoder, the profile and the code. A new champion alone
    # is not a reason to train again (promoting this very model would otherwise make the next
    # "materialize all" re-train); new data is, and that training continues from the champion.
    inputs = fingerprint(MODEL_CODE, cfg.model.model_dump(mode="json"), visual_token_inputs(cfg), cfg.vision.image_size,
                         cfg.operations.warm_start_from_champion, data_version(cfg, "raw_images"),
                         data_version(cfg, "instructions"))
    if (reused := reuse_unchanged(context, cfg, inputs, config)) is not None:
        return reused
    fit_threads(cfg)
    summary = tune_and_register(cfg, load_manifest(cfg), load_instruction_set(cfg),
                                mlflow_tracking.tracking_context(context, cfg), log=context.log.info)
    version = f"{summary['registered_model']}-v{summary['version']}"
    publish(cfg, inputs=inputs, data_version=version)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "registered_model": summary["registered_model"],
            "version": summary["version"],
            "model_uri": summary["model_uri"],
            "alias": "challenger",
            "final_val_loss": float(summary["final_val_loss"]),
            "budget": summary["budget"],
            "train_tokens": int(summary["train_tokens"]),
            "train_minutes": float(summary["train_minutes"]),
            "steps": int(summary["steps"]),
            "epochs": int(summary["epochs"]),
            "trainable_parameters": int(summary["trainable"]),
            "total_parameters": int(summary["total"]),
            "train_records": int(summary["train_records"]),
            "val_records": int(summary["val_records"]),
            "loss_curve": image_md(summary["loss_curve"], "loss curve"),
            "mlflow_run_id": summary["mlflow_run_id"],
        },
    )
