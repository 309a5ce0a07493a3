"""Evaluation stage: the paper's tables for the registered challenger."""

import dagster as dg

from maemi_core.code_version import code_version
from maemi_core.data.manifest import load_manifest
from maemi_core.registry.registered_benchmark import benchmark_registered_model
from maemi_core.evaluation.benchmark_tables import TEXT_TABLES
from maemi_core.teacher.instruction_set import load_instruction_set
from maemi_core.run_isolation import data_version, fingerprint, publish
from maemi_core.threads import fit_threads
from maemi_dagster.assets.data import OWNERS
from maemi_dagster.assets.model import maemi_model
from maemi_dagster.assets.vision import vit_classifier
from maemi_dagster.executor import TORCH_POOL, TORCH_STEP
from maemi_dagster.metadata import image_md, table_md
from maemi_dagster.resources import MaemiConfigResource, MLflowResource
from maemi_dagster.reuse import Recompute, reuse_unchanged

BENCH_CODE = code_version("benchmark_tables")
SHOWN = ["method", "n", "bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor", "status"]


@dg.asset(
    op_tags=TORCH_STEP, pool=TORCH_POOL,
    group_name="evaluation",
    code_version=BENCH_CODE,
    owners=OWNERS,
    kinds={"pandas", "mlflow"},
    deps=[maemi_model, vit_classifier],
    description=(
        "The paper's evaluation on the held-out test split: captioning (Table 1), open-ended VQA with a per-family "
        "breakdown (Table 3), intra-dissimilar / inter-similar / heterogeneity VQA (Tables 4-6), zero- and few-shot "
        "classification against the vit_classifier baselines (Tables 7, 9), a qualitative table (Table 10) and "
        "deploy-any-rank. BLEU-2/4, ROUGE-1/2/L and METEOR (WordNet) as mean ± std; per-sample scores saved. "
        "Markdown + CSV in <workdir>/reports/, logged to MLflow, key metrics tagged on the model version."
    ),
)
def benchmark_tables(context: dg.AssetExecutionContext, config: Recompute, maemi_config: MaemiConfigResource,
                     mlflow_tracking: MLflowResource) -> dg.MaterializeResult:
    cfg = maemi_config.load(context, writes="reports")
    inputs = fingerprint(BENCH_CODE, cfg.evaluation.model_dump(mode="json"), data_version(cfg, "model"),
                         data_version(cfg, "instructions"), data_version(cfg, "raw_images"), data_version(cfg, "vision"))
    if (reused := reuse_unchanged(context, cfg, inputs, config)) is not None:
        return reused
    fit_threads(cfg)
    out = benchmark_registered_model(cfg, load_manifest(cfg), load_instruction_set(cfg),
                                     mlflow_tracking.tracking_context(context, cfg), log=context.log.info)
    result = out["result"]
    meta: dict = {
        "model_version": str(out["version"]),
        "registered_model": str(out["registered_model"]),
        "reports": dg.MetadataValue.path(str(result.paths.get("benchmark_json"))),
        "evaluation_tokens_per_s": float(result.evaluation_tokens_per_s),
        "seconds": float(result.seconds),
        "mlflow_run_id": str(out["mlflow_run_id"]),
    }
    meta |= {k: float(v) for k, v in result.key_metrics.items()}
    for name in [*TEXT_TABLES, "rank_sweep"]:
        if name in result.tables:
            t = result.tables[name]
            meta[f"table_{name}"] = table_md(t[[c for c in SHOWN + ["rank", "tokens_per_s"] if c in t]].round(4), index=False)
    for name in ("classification", "per_class", "vqa_by_family", "measurements"):
        if name in result.tables:
            meta[f"table_{name}"] = table_md(result.tables[name].round(4), index=False)
    if "qualitative" in result.tables:
        meta["table_qualitative"] = table_md(result.tables["qualitative"].drop(columns=["thumbnail"]).round(3), index=False)
    for key, path in result.figures.items():
        meta[key] = image_md(path, key)
    if result.unavailable:
        meta["unavailable_baselines"] = dg.MetadataValue.json(result.unavailable)
    version = f"{out['registered_model']}-v{out['version']}-{inputs}"
    publish(cfg, inputs=inputs, data_version=version)
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(version))
