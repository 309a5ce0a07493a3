"""Teacher stage: the instruction-following dataset."""

import hashlib
import json

import dagster as dg
import mlflow
import pandas as pd

from maemi_core.code_version import code_version
from maemi_core.data.manifest import load_manifest
from maemi_core.teacher.instruction_set import failure_table, generate_instruction_set
from maemi_core.vision.similarity_sampling import demonstrations_dir
from maemi_core.run_isolation import publish
from maemi_dagster.assets.data import OWNERS, raw_images
from maemi_dagster.assets.vision import demonstration_sets
from maemi_dagster.metadata import table_md
from maemi_dagster.resources import MaemiConfigResource, MLflowResource, TeacherResource


def _sample_md(records: list[dict], n: int = 4) -> str:
    seen, out = set(), []
    for r in records:
        if r["task"] in seen or r["split"] != "train":
            continue
        seen.add(r["task"])
        q, a = r["conversations"][0]["value"], r["conversations"][-1]["value"]
        out.append(f"**{r['task']}** `{r['id']}`\n\n> {q.replace(chr(10), ' ')}\n\n{a}\n")
        if len(out) >= n:
            break
    return "\n---\n".join(out) or "none"


@dg.asset(
    group_name="teacher",
    code_version=code_version("instruction_set"),
    owners=OWNERS,
    kinds={"openai", "jsonl", "mlflow"},
    deps=[raw_images, demonstration_sets],
    description=(
        "Instruction-following records (LLaVA conversation format) written by the configured teacher: "
        "captions, open-ended VQA over the prompt pack's families, zero/few-shot classification and the three "
        "group tasks, for every split. Answers are cached by content: re-materializing makes no teacher calls. "
        "Private datasets only go to on-prem teachers. Records: <workdir>/instructions/instructions.jsonl."
    ),
)
def instruction_set(context: dg.AssetExecutionContext, maemi_config: MaemiConfigResource,
                    mlflow_tracking: MLflowResource, teacher: TeacherResource) -> dg.MaterializeResult:
    cfg = maemi_config.load(context, writes="instructions")
    manifest = load_manifest(cfg)
    few_shot = pd.read_parquet(demonstrations_dir(cfg) / "few_shot.parquet")
    groups = pd.read_parquet(demonstrations_dir(cfg) / "groups.parquet")
    result = generate_instruction_set(cfg, manifest, few_shot, groups, log=context.log.info, api_key=teacher.api_key)
    summary = json.loads(result.paths["summary"].read_text())
    with mlflow_tracking.start_run(context, cfg):
        # The teacher identity holds no secret (the key stays in its environment variable).
        mlflow.log_params({f"teacher.{k}": v for k, v in summary["teacher"].items()}
                          | {"prompt_pack": cfg.dataset.prompt_pack, "prompt_pack_version": result.pack_version,
                             "tasks": ",".join(cfg.teacher.tasks), "vqa_questions_per_image": cfg.teacher.vqa_questions_per_image})
        mlflow.log_metrics({k: float(summary[k]) for k in ("records", "failed", "teacher_calls", "cache_hits",
                                                           "http_attempts", "prompt_tokens", "completion_tokens", "cost")})
        for key in ("summary", "failed", "records"):
            mlflow.log_artifact(str(result.paths[key]), artifact_path="instructions")
    counts = result.counts()
    version = hashlib.sha256("".join(r["provenance"]["cache_key"] for r in result.records).encode()).hexdigest()[:16]
    publish(cfg, data_version=version)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/row_count": len(result.records),
            "records_per_task_and_split": table_md(counts) if len(counts) else dg.MetadataValue.md("none"),
            "teacher_calls": result.teacher_calls,
            "cache_hits": result.cache_hits,
            "failed": len(result.failed),
            "failures_per_split": table_md(failure_table(result.records, result.failed).round(4), index=False),
            "failed_records": dg.MetadataValue.md("\n".join(
                f"- `{f['id']}` ({f['split']}, {f['attempts']} attempts): {f['error'][:160]}" for f in result.failed[:20])
                + (f"\n- ... {len(result.failed) - 20} more in failed.jsonl" if len(result.failed) > 20 else "")
                or "none"),
            "http_attempts": result.http_attempts,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "estimated_cost": result.cost,
            "teacher": json.dumps(summary["teacher"]),
            "prompt_pack": f"{cfg.dataset.prompt_pack} v{result.pack_version}",
            "samples": dg.MetadataValue.md(_sample_md(result.records)),
            "path": dg.MetadataValue.path(str(result.paths["records"])),
        },
    )
