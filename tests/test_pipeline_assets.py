"""The pipeline end to end in Dagster on the tiny profile: ViT + baselines, embeddings,
demonstration sets, the instruction set, the MAEMI model registered as challenger, the
registered model answering in a fresh process, and the benchmark tables."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from maemi_core.config import load_config
from maemi_core import tracking
from maemi_core.vision.embeddings import load_embeddings
from maemi_dagster.assets.data import raw_images
from maemi_dagster.assets.evaluation import benchmark_tables
from maemi_dagster.assets.model import maemi_model
from maemi_dagster.assets.teacher import instruction_set
from maemi_dagster.assets.vision import demonstration_sets, image_embeddings, vit_classifier
from maemi_dagster.assets.operations import model_promotion
from maemi_dagster.checks import EVALUATION_CHECKS, INSTRUCTION_SET_CHECKS, VISION_CHECKS
from maemi_dagster.resources import MaemiConfigResource, MLflowResource, TeacherResource
from tests.conftest import REPO


@dataclass
class Pipeline:
    tmp_path: Path
    profile: Path
    cfg: object
    resources: dict
    instance: dg.DagsterInstance
    result: object


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One materialization of every asset on the tiny profile, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    (tmp_path / "configs").mkdir()
    profile = tmp_path / "configs" / "tiny.yaml"
    shutil.copy(REPO / "configs" / "tiny.yaml", profile)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        resources = {"maemi_config": MaemiConfigResource(path=str(profile)), "mlflow_tracking": MLflowResource(),
                     "teacher": TeacherResource()}
        instance = dg.DagsterInstance.ephemeral()
        result = dg.materialize(
            [raw_images, vit_classifier, *VISION_CHECKS, image_embeddings, demonstration_sets, instruction_set,
             *INSTRUCTION_SET_CHECKS,
             maemi_model, benchmark_tables, *EVALUATION_CHECKS, model_promotion],
            resources=resources, instance=instance,
        )
        assert result.success
        yield Pipeline(tmp_path, profile, load_config(profile), resources, instance, result)
        mlflow.set_tracking_uri(None)


def test_pipeline_on_the_tiny_profile(pipeline):
    tmp_path, cfg, resources, instance, result = (pipeline.tmp_path, pipeline.cfg, pipeline.resources,
                                                  pipeline.instance, pipeline.result)
    vision = cfg.workdir_path / "vision"

    classification = pd.read_csv(vision / "classification.csv")
    assert list(classification["model"]) == ["vit", "efficientnet_lite0", "classical"]
    assert {"model", "top1", "top5", "macro_f1"} <= set(classification.columns)
    assert classification["top1"].between(0, 1).all()
    assert (classification["top5"] == 1.0).all()  # 4 classes: top-5 is capped at top-4
    per_class = pd.read_csv(vision / "per_class.csv")
    assert len(per_class) == 3 * 4 and {"precision", "recall", "f1", "support"} <= set(per_class.columns)
    assert (cfg.workdir_path / "vision" / "vit" / "model.safetensors").is_file()

    (mat,) = result.asset_materializations_for_node("vit_classifier")
    assert "| vit " in mat.metadata["classification"].value
    assert mat.metadata["confusion_vit"].value.startswith("![vit confusion](data:image/png;base64,")

    index, emb = load_embeddings(cfg)
    assert emb.shape == (64, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)

    demos = cfg.workdir_path / "demonstrations"
    few_shot = pd.read_parquet(demos / "few_shot.parquet")
    split_of = dict(zip(index["image_id"], index["split"]))
    assert len(few_shot) == 64
    assert all(len(d) == 3 and all(split_of[i] == "train" for i in d) and t not in d
               for t, d in zip(few_shot["target_id"], few_shot["demo_ids"]))
    groups = pd.read_parquet(demos / "groups.parquet")
    assert set(groups["kind"]) == {"inter_class_similar", "intra_class_dissimilar", "spatial_heterogeneity"}
    assert set(groups["split"]) == {"train", "val", "test"}

    client = MlflowClient(tracking.embedded_store(tmp_path)[0])
    exp = client.get_experiment_by_name("maemi-elpv-tiny")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs[f"vit_classifier-{result.run_id}"]
    for model in ("vit", "efficientnet_lite0", "classical"):
        child = runs[f"vit_classifier-{result.run_id}/{model}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags[tracking.TAG_MODEL] == model
        assert 0 <= child.data.metrics["top1"] <= 1
        arts = {a.path for a in client.list_artifacts(child.info.run_id, "figures")}
        assert f"figures/confusion_{model}.png" in arts
    vit_run = runs[f"vit_classifier-{result.run_id}/vit"]
    assert len(client.get_metric_history(vit_run.info.run_id, "val_loss")) == 3  # one per epoch

    # The teacher stage: the on-prem measurement teacher wrote every record, checks pass.
    (mat,) = result.asset_materializations_for_node("instruction_set")
    n_records = mat.metadata["dagster/row_count"].value
    assert n_records > 64 * 4
    assert mat.metadata["teacher_calls"].value == n_records and mat.metadata["cache_hits"].value == 0
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    # The encoder check warns (never blocks) unless the profile's encoder won on validation.
    enc = evaluations.pop("vit_classifier_encoder_is_validation_winner")
    summary = json.loads((vision / "summary.json").read_text())
    assert enc.metadata["encoder_in_use"].value == cfg.vision.encoder == "vit"
    assert enc.metadata["best_encoder_on_val"].value == (summary["best_encoder_on_val"] or "none")
    assert enc.passed == (summary["best_encoder_on_val"] == "vit")
    assert enc.severity == dg.AssetCheckSeverity.WARN
    # So does the majority-class check: it passes exactly when no model is below the majority on val.
    below = evaluations.pop("vit_classifier_not_below_majority")
    assert below.severity == dg.AssetCheckSeverity.WARN
    assert below.passed == (summary["below_majority_on_val"] == [])
    assert summary["best_encoder_on_val"] not in summary["below_majority_on_val"]
    assert all(e.passed for e in evaluations.values())
    lines = (cfg.workdir_path / "instructions" / "instructions.jsonl").read_text().splitlines()
    assert len(lines) == n_records

    # A second materialization makes zero teacher calls.
    again = dg.materialize([instruction_set], resources=resources, instance=instance)
    (mat2,) = again.asset_materializations_for_node("instruction_set")
    assert mat2.metadata["teacher_calls"].value == 0 and mat2.metadata["cache_hits"].value == n_records

    # The model stage: trained, packaged, registered as challenger, loadable in a fresh process.
    (mm,) = result.asset_materializations_for_node("maemi_model")
    assert mm.metadata["registered_model"].value == "maemi-elpv-tiny"
    assert mm.metadata["epochs"].value == 3 and 0 < mm.metadata["trainable_parameters"].value
    history = pd.read_csv(cfg.workdir_path / "model" / "history.csv")
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    version = client.get_model_version_by_alias("maemi-elpv-tiny", "challenger")
    assert str(version.version) == str(mm.metadata["version"].value)
    assert version.tags["dagster_run_id"] == result.run_id

    image = pd.read_parquet(cfg.workdir_path / "raw_images" / "manifest.parquet")["path"].iloc[0]
    script = (
        "import base64, mlflow, pandas as pd, sys\n"
        "m = mlflow.pyfunc.load_model('models:/maemi-elpv-tiny@challenger')\n"
        "b64 = base64.b64encode(open(sys.argv[1], 'rb').read()).decode()\n"
        "out = m.predict(pd.DataFrame({'image': [b64, b64], 'question': ['Describe the cell.', 'Is it defective?'],"
        " 'rank': [2, 8]}))\n"
        "assert list(out.columns) == ['answer'] and len(out) == 2, out\n"
        "print('ANSWERS', [type(a).__name__ for a in out['answer']])\n"
    )
    import subprocess
    import sys
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": tracking.embedded_store(tmp_path)[0]}
    proc = subprocess.run([sys.executable, "-c", script, image], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ANSWERS ['str', 'str']" in proc.stdout

    # The evaluation stage: every table, traceable to per-sample scores, tagged on the version.
    reports = cfg.workdir_path / "reports"
    for name in ("captioning", "vqa", "vqa_intra_dissimilar", "vqa_inter_similar", "vqa_heterogeneity",
                 "classification", "per_class", "qualitative", "rank_sweep"):
        assert (reports / f"{name}.md").is_file() and (reports / f"{name}.csv").is_file(), name
    cap = pd.read_csv(reports / "captioning.csv").set_index("method")
    assert {"maemi", "maemi_gates_closed", "base_lm", "llava_unreachable"} == set(cap.index)
    assert (cap.loc["maemi", "meteor_ci_low"] <= cap.loc["maemi", "meteor"] <= cap.loc["maemi", "meteor_ci_high"])
    assert cap.loc["llava_unreachable", "status"].startswith("unavailable") and pd.isna(cap.loc["llava_unreachable", "meteor"])
    assert cap.loc["maemi", "n"] == 3 and 0 <= cap.loc["maemi", "meteor"] <= 1
    samples = pd.read_csv(reports / "samples" / "captioning.csv")
    mine = samples[samples["method"] == "maemi"]
    assert abs(mine["meteor"].mean() - cap.loc["maemi", "meteor"]) < 1e-9     # the table is the samples' mean
    cls = pd.read_csv(reports / "classification.csv").set_index("method")
    assert {"maemi_zero_shot", "maemi_few_shot", "zero_shot:base_lm", "zero_shot:maemi_gates_closed", "vit",
            "efficientnet_lite0", "classical"} <= set(cls.index)
    manifest = pd.read_parquet(cfg.workdir_path / "raw_images" / "manifest.parquet")
    test_images = (manifest["split"] == "test").sum()
    assert (cls["n_images"] == test_images).all()                 # every row scores every test image
    assert cls.loc["maemi_zero_shot", "n_generated"] == 3         # generated answers on the record slice
    diffs = pd.read_csv(reports / "paired_differences.csv")
    assert {"maemi - base_lm", "maemi - maemi_gates_closed", "maemi_zero_shot - zero_shot:base_lm"} <= set(diffs["comparison"])
    sweep = pd.read_csv(reports / "rank_sweep.csv")
    assert list(sweep["rank"]) == [2, 5, 8] and (sweep["tokens_per_s"] > 0).all()
    assert "![" in (reports / "qualitative.md").read_text()
    (bt,) = result.asset_materializations_for_node("benchmark_tables")
    assert bt.metadata["model_version"].value == str(version.version)
    assert bt.metadata["text_metrics"].value.startswith("![text_metrics](data:image/png;base64,")
    tags = client.get_model_version("maemi-elpv-tiny", version.version).tags
    assert float(tags["benchmark.vqa.meteor"]) == bt.metadata["vqa.meteor"].value


def _cli_env(pipeline) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"MLFLOW_DISABLE_TELEMETRY": "true"}


def test_first_model_becomes_champion_and_the_cli_answers(pipeline):
    import subprocess
    import sys

    client = MlflowClient(tracking.embedded_store(pipeline.tmp_path)[0])
    champion = client.get_model_version_by_alias("maemi-elpv-tiny", "champion")
    (pm,) = pipeline.result.asset_materializations_for_node("model_promotion")
    assert pm.metadata["decision"].value == "promoted" and "first model" in pm.metadata["reason"].value
    assert str(champion.version) == pm.metadata["champion"].value
    assert champion.tags["promotion.decision"] == "promoted"
    checks = {e.check_name: e.passed for e in pipeline.result.get_asset_check_evaluations()}
    assert checks["benchmark_tables_challenger_not_worse"]

    maemi = str(Path(sys.executable).parent / "maemi")
    image = pd.read_parquet(pipeline.cfg.workdir_path / "raw_images" / "manifest.parquet")["path"].iloc[0]
    base = [maemi, "--config", str(pipeline.profile)]
    ask = subprocess.run(base + ["ask", image, "Describe the cell.", "--rank", "4"], env=_cli_env(pipeline),
                         capture_output=True, text=True, timeout=300, cwd=pipeline.tmp_path)
    # an answer on stdout, or (exit 3) a stated empty answer on stderr - never a silent empty line
    assert (ask.returncode == 0 and ask.stdout.strip()) or (ask.returncode == 3 and "empty answer" in ask.stderr), \
        ask.stderr[-3000:]
    cls = subprocess.run(base + ["classify", image, image], env=_cli_env(pipeline), capture_output=True, text=True,
                         timeout=300, cwd=pipeline.tmp_path)
    assert cls.returncode == 0 or (cls.returncode == 3 and "empty" in cls.stderr), cls.stderr[-3000:]
    lines = cls.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["image", "category"] and "functional" in lines[0] and len(lines) == 3
    probs = [float(v) for v in lines[1].split()[-5:-1]]
    assert abs(sum(probs) - 1) < 0.01
    # the categories compared as the benchmark compared them: the package's scoring, named
    bench = json.loads((pipeline.cfg.workdir_path / "reports" / "benchmark.json").read_text())
    assert lines[0].split()[-1] == "scoring" and lines[1].split()[-1] == bench["category_scoring"]
    # the few-shot prompts got their own choice on the validation few-shot prompts, and the benchmark read it
    meta = json.loads((pipeline.cfg.workdir_path / "model" / "package" / "maemi.json").read_text())
    # the head scoring was fitted on the train prompts' states, judged on validation and benchmarked
    zero = meta["category_scoring"]
    assert zero["head"]["n"] > 0 and "head" in zero["validation"] and "head" not in zero["few_shot"].get("validation", {})
    cls_rows = pd.read_csv(pipeline.cfg.workdir_path / "reports" / "classification.csv")
    assert "maemi_zero_shot[head]" in set(cls_rows["method"])
    few = meta["category_scoring"]["few_shot"]
    assert few["n"] > 0 and bench["few_shot_category_scoring"] == few["chosen"]
    assert "validation" not in few or "calibrated" not in few["validation"]
    missing = subprocess.run(base + ["ask", image, "Hi", "--model", "models:/maemi-elpv-tiny@nosuchalias"],
                             env=_cli_env(pipeline), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "error" in missing.stderr


def test_mlflow_models_serve_answers_on_loopback(pipeline):
    import base64
    import json
    import os
    import sys
    import urllib.request

    from tests.conftest import served_model

    bin_dir = str(Path(sys.executable).parent)       # the server execs `uvicorn` from PATH
    env = _cli_env(pipeline) | {"MLFLOW_TRACKING_URI": tracking.embedded_store(pipeline.tmp_path)[0],
                                "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    with served_model("models:/maemi-elpv-tiny@champion", env, timeout=240) as port:
        image = pd.read_parquet(pipeline.cfg.workdir_path / "raw_images" / "manifest.parquet")["path"].iloc[0]
        b64 = base64.b64encode(Path(image).read_bytes()).decode()
        body = json.dumps({"dataframe_split": {"columns": ["image", "question"],
                                               "data": [[b64, "Describe the cell."]]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert isinstance(out["predictions"], list) and set(out["predictions"][0]) == {"answer"}

        # 16 concurrent requests, different images and ranks: each answer equals the answer to the
        # same request sent alone (rank and image conditioning travel with the call).
        from concurrent.futures import ThreadPoolExecutor

        paths = pd.read_parquet(pipeline.cfg.workdir_path / "raw_images" / "manifest.parquet")["path"].tolist()
        ranks = [2, 4, 8, None]

        def ask(i: int) -> str:
            row = {"image": base64.b64encode(Path(paths[i % len(paths)]).read_bytes()).decode(),
                   "question": "Describe the cell.", "rank": ranks[i % 4]}
            body = json.dumps({"dataframe_records": [row]}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read())["predictions"][0]["answer"]

        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, range(16)))
        alone = [ask(i) for i in range(16)]
        assert together == alone


REUSABLE = ("vit_classifier", "image_embeddings", "demonstration_sets", "maemi_model", "benchmark_tables")


def _materialize_again(pipeline, profile=None):
    """`*benchmark_tables` once more, in a fresh Dagster instance, on the same workdir."""
    resources = pipeline.resources | ({"maemi_config": MaemiConfigResource(path=str(profile))} if profile else {})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = dg.materialize([raw_images, vit_classifier, image_embeddings, demonstration_sets, instruction_set,
                                 maemi_model, benchmark_tables], resources=resources,
                                instance=dg.DagsterInstance.ephemeral())
    assert result.success
    return {n: result.asset_materializations_for_node(n)[0] for n in ("instruction_set",) + REUSABLE}


def _versions(pipeline) -> int:
    client = MlflowClient(tracking.embedded_store(pipeline.tmp_path)[0])
    return len(client.search_model_versions("name='maemi-elpv-tiny'"))


def test_materializing_everything_again_asks_and_trains_nothing(pipeline):
    before = _versions(pipeline)
    first = {n: pipeline.result.asset_materializations_for_node(n)[0] for n in REUSABLE}
    again = _materialize_again(pipeline)
    assert again["instruction_set"].metadata["teacher_calls"].value == 0
    for n in REUSABLE:
        assert again[n].metadata["reused"].value is True, n
        assert again[n].tags["dagster/data_version"] == first[n].tags["dagster/data_version"], n
    assert _versions(pipeline) == before                        # no new model version registered


def test_changing_one_prompt_of_the_pack_reruns_only_what_depends_on_it(pipeline):
    import yaml

    from maemi_core.teacher.prompt_pack import PACKS_DIR

    pack = yaml.safe_load((PACKS_DIR / "elpv.yaml").read_text())
    pack["caption"]["prompts"][0] = "Describe this electroluminescence image of a solar cell briefly."
    (pipeline.tmp_path / "configs" / "site-pack.yaml").write_text(yaml.safe_dump(pack))
    profile = yaml.safe_load(pipeline.profile.read_text())
    profile["dataset"]["prompt_pack"] = "configs/site-pack.yaml"
    changed = pipeline.tmp_path / "configs" / "tiny-site-pack.yaml"
    changed.write_text(yaml.safe_dump(profile))
    before = _versions(pipeline)
    mats = _materialize_again(pipeline, changed)
    calls = mats["instruction_set"].metadata["teacher_calls"].value
    assert 0 < calls < mats["instruction_set"].metadata["dagster/row_count"].value   # only the changed prompt's
    for n in ("vit_classifier", "image_embeddings", "demonstration_sets"):
        assert mats[n].metadata["reused"].value is True, n
    for n in ("maemi_model", "benchmark_tables"):
        assert "reused" not in mats[n].metadata, n
    assert _versions(pipeline) == before + 1


def test_the_pipelines_trainer_and_the_learning_curve_bench_give_identical_weights(pipeline, tmp_path):
    """One recipe: bench/learning_curve.py trains through the same ``train_maemi`` on the same
    data as the ``maemi_model`` step's ``tune_and_register``; for the profile's budget and seed
    both end with the same weights, bit for bit (same process, same threads). Both train on the
    workdir's current instruction set, whatever earlier tests changed in it."""
    import importlib.util

    import torch
    from safetensors.torch import load_file

    from maemi_core.data.manifest import load_manifest
    from maemi_core.model.maemi_model import build_model
    from maemi_core.vision.classifiers import vit_dir
    from maemi_core.run_isolation import scoped
    from maemi_core.teacher.instruction_set import load_instruction_set
    from maemi_core.threads import fit_threads
    from maemi_core.training.instruction_tuning import training_config, tune_and_register, tuning_data

    spec = importlib.util.spec_from_file_location("learning_curve", REPO / "bench" / "learning_curve.py")
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    cfg = pipeline.cfg
    fit_threads(cfg)                                  # what the maemi_model step sets
    manifest, records = load_manifest(cfg), load_instruction_set(cfg)
    step = scoped(cfg, "recipe-comparison", "model")   # a run folder of its own, never a published copy
    summary = tune_and_register(step, manifest, records)
    pipeline_weights = load_file(str(Path(summary["package"]) / "adapter.safetensors"))
    # A serving setting (the answer length) re-packages the finished run; it does not train it again.
    served = step.model_copy(update={"model": step.model.model_copy(update={"max_new_tokens": 7})})
    again = tune_and_register(served, manifest, records)
    assert summary["steps"] > 0 and again["resumed_from_step"] == again["steps"] == summary["steps"]
    assert json.loads((Path(again["package"]) / "maemi.json").read_text())["max_new_tokens"] == 7
    assert all(torch.equal(v, load_file(str(Path(again["package"]) / "adapter.safetensors"))[k])
               for k, v in pipeline_weights.items())

    model = build_model(cfg, vit_dir(cfg))
    data = tuning_data(cfg, manifest, records, model.tokenizer)
    recipe = training_config(cfg)
    unit, amount = recipe.budget
    tcfg = curve.curve_config(cfg, [amount], unit, recipe.decay_fraction * amount)
    points = []
    curve.train_to_budgets(model, data, tcfg, [amount], tmp_path / "curve.state.pt", "fp", points.append)
    assert [p.epoch for p in points] == [3] and points[0].lr == 0.0      # the cooldown ends at 0
    mine = model.trainable_state_dict()
    trained = [k for k in mine if k in pipeline_weights and ("lora_B" in k or k.endswith("attn_gate"))]
    assert trained and any(float(pipeline_weights[k].abs().max()) > 0 for k in trained)   # it trained
    for k in mine:
        if k in pipeline_weights:
            assert torch.equal(mine[k].cpu(), pipeline_weights[k]), k


def test_a_run_trained_from_an_exported_bundle_is_the_pipelines_own_run(pipeline, tmp_path):
    """bench/gpu_training.py, with the CPU as the other machine: export the tiny profile's
    training inputs, train from the bundle alone, carry the finished run back in pieces; the
    pipeline's step takes it up without training a step, and its package holds the weights the
    step trains itself on the same data, bit for bit (same threads). A checkpoint whose
    fingerprint differs is refused before anything is packaged."""
    import importlib.util

    import torch
    from safetensors.torch import load_file

    from maemi_core.data.manifest import load_manifest
    from maemi_core.run_isolation import scoped
    from maemi_core.teacher.instruction_set import load_instruction_set
    from maemi_core.threads import fit_threads
    from maemi_core.training.instruction_tuning import tune_and_register

    spec = importlib.util.spec_from_file_location("gpu_training", REPO / "bench" / "gpu_training.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = pipeline.cfg
    fit_threads(cfg)
    meta = bench.export_bundle(cfg, tmp_path / "bundle")
    assert (tmp_path / "bundle" / "vit").is_dir() and meta["train_examples"] > 0   # the tiny profile reads a ViT
    report = bench.train_bundle(cfg, tmp_path / "bundle", tmp_path / "run", device="cpu", split_mib=0.01,
                                log=lambda m: None)
    pieces = sorted((tmp_path / "run").glob("final.pt.part*"))
    assert report["finished"] and report["steps"] > 0 and len(pieces) > 1
    carried = tmp_path / "carried.pt"
    carried.write_bytes(b"".join(p.read_bytes() for p in pieces))
    _, summary = bench.take_up(cfg, carried, tmp_path / "scratch", log=lambda m: None)
    assert summary["resumed_from_step"] == summary["steps"] == report["steps"]
    taken = load_file(str(Path(summary["package"]) / "adapter.safetensors"))

    own = tune_and_register(scoped(cfg, "recipe-comparison", "model"), load_manifest(cfg), load_instruction_set(cfg))
    own_weights = load_file(str(Path(own["package"]) / "adapter.safetensors"))
    assert set(own_weights) == set(taken)
    assert any(float(v.abs().max()) > 0 for k, v in taken.items() if "lora_B" in k)        # it trained
    for k, v in own_weights.items():
        assert torch.equal(v, taken[k]), k

    state = torch.load(carried, weights_only=False)
    other = json.loads(state["fingerprint"])
    other["model"]["seed"] += 1                      # the same run with another seed
    state["fingerprint"] = json.dumps(other, sort_keys=True)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a finished run of this profile"):
        bench.take_up(cfg, tmp_path / "other.pt", tmp_path / "scratch2", log=lambda m: None)


def test_an_image_blind_challenger_is_refused_by_the_grounding_gate(pipeline, tmp_path):
    """A real registered model with every cross-attention gate forced closed (it cannot see),
    benchmarked on the tiny profile's test records: the grounding gate refuses it, naming
    maemi_gates_closed (its text answers are exactly those without the image) and majority (its
    category answer is the same for every image)."""
    import torch
    from safetensors.torch import load_file, save_file

    from maemi_core.data.manifest import load_manifest
    from maemi_core.registry.registered_benchmark import benchmark_registered_model
    from maemi_core.registry.model_promotion import evaluate
    from maemi_core.model_registry import download_package, log_and_register
    from maemi_core.teacher.instruction_set import load_instruction_set

    cfg = pipeline.cfg
    uri, artifact_root = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.project_root)
    tracker = tracking.TrackingContext(uri, cfg.mlflow.experiment, "image-blind-test", "tiny.yaml", artifact_root)
    package, _ = download_package("maemi-elpv-tiny", "1", tmp_path / "v1")
    tensors = load_file(str(package / "adapter.safetensors"))
    gates = [k for k in tensors if k.endswith(("attn_gate", "ff_gate"))]
    assert gates and any(float(tensors[k].abs().max()) > 0 for k in gates)          # it was trained to look
    save_file({k: torch.zeros_like(v) if k in gates else v for k, v in tensors.items()},
              str(package / "adapter.safetensors"))
    with tracker.run("maemi_model"):
        _, version = log_and_register(package, "maemi-elpv-tiny", {"test": "gates forced closed"})
    benchmark_registered_model(cfg, load_manifest(cfg), load_instruction_set(cfg), tracker, version=version,
                               out_dir=tmp_path / "reports")
    cls = pd.read_csv(tmp_path / "reports" / "classification.csv").set_index("method")
    per_image = pd.read_csv(tmp_path / "reports" / "samples" / "classification_maemi_zero_shot.csv")
    assert per_image["predicted"].nunique() == 1                              # one answer for every image
    assert cls.loc["maemi_zero_shot", "balanced_accuracy"] == pytest.approx(1 / per_image["label"].nunique())
    print(cls[["top1", "balanced_accuracy", "macro_auc", "macro_auc_ci_low", "macro_auc_ci_high"]].to_string())
    d = evaluate(MlflowClient(), "maemi-elpv-tiny", version, None, cfg.promotion.key_metrics,
                 first_must_beat_base_lm=False, require_grounding=True)
    assert not d.promote and "not grounded" in d.reason
    assert "does not beat maemi_gates_closed" in d.reason and "does not beat majority" in d.reason, d.reason


def test_a_new_fab_batch_leads_to_a_new_version_and_a_promotion_decision(pipeline):
    """Drop folder -> sensor -> ingestion (a fab_batches partition) -> re-tuning from the champion's
    adapters -> benchmark -> a recorded promotion decision."""
    from maemi_core.data.sources import list_elpv
    from maemi_core.registry.model_promotion import read_log, registry_paths
    from maemi_dagster.automation import incoming_batches, ingest_job, retune_after_ingest, retune_job
    from maemi_dagster.definitions import defs

    cfg = pipeline.cfg
    n_versions = _versions(pipeline)
    new_version = str(n_versions + 1)
    before = pd.read_parquet(cfg.workdir_path / "raw_images" / "manifest.parquet")
    used = set(before["path"])
    new = [c for c in list_elpv() if str(c.path.resolve()) not in used][:16]
    batch = cfg.incoming_path / "lot-2026-11-26"
    for c in new:
        dst = batch / c.label / c.path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(c.path, dst)
    (batch / "_COMPLETE").touch()

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MAEMI_CONFIG", str(pipeline.profile))      # the code location's resources read it
        ctx = dg.build_sensor_context(instance=pipeline.instance, resources=pipeline.resources)
        sensed = incoming_batches(ctx)
        (request,) = sensed.run_requests
        assert request.partition_key == "lot-2026-11-26"
        pipeline.instance.add_dynamic_partitions("fab_batches", [request.partition_key])
        job = defs.resolve_job_def(ingest_job.name)
        ingest = job.execute_in_process(partition_key=request.partition_key, instance=pipeline.instance)
        assert ingest.success
        run_ctx = dg.build_run_status_sensor_context(sensor_name=retune_after_ingest.name,
                                                     dagster_event=ingest.get_run_success_event(),
                                                     dagster_instance=pipeline.instance,
                                                     dagster_run=ingest.dagster_run)
        (retune_request,) = [r for r in [retune_after_ingest(run_ctx)] if r is not None]
        assert retune_request.tags["maemi/trigger"] == "fab_batch"
        retune = defs.resolve_job_def(retune_job.name).execute_in_process(instance=pipeline.instance,
                                                                     tags=retune_request.tags,
                                                                     raise_on_error=False)
        after = pd.read_parquet(cfg.workdir_path / "raw_images" / "manifest.parquet")
    assert after["source"].str.startswith("incoming:").sum() == len(new)
    # The new fab images enter the key metric: every current test image is scored, new ones included.
    new_test = set(after.loc[after["source"].str.startswith("incoming:") & (after["split"] == "test"), "image_id"])
    scored = pd.read_csv(cfg.workdir_path / "reports" / "samples" / "classification_maemi_zero_shot.csv")
    assert new_test and new_test <= set(scored["image_id"])
    assert set(scored["image_id"]) == set(after.loc[after["split"] == "test", "image_id"])
    old_split = before.set_index("image_id")["split"]
    assert (after.set_index("image_id").loc[old_split.index, "split"] == old_split).all()   # old test stays test

    client = MlflowClient(tracking.embedded_store(pipeline.tmp_path)[0])
    challenger = client.get_model_version_by_alias("maemi-elpv-tiny", "challenger")
    assert str(challenger.version) == new_version
    (mm,) = retune.asset_materializations_for_node("maemi_model")
    run = client.get_run(mm.metadata["mlflow_run_id"].value)
    assert run.data.params["warm_start_from"] == "1"
    log = read_log(registry_paths(cfg)[1])
    assert list(log["version"]) == ["1", new_version] and log["decision"].iloc[-1] in {"promoted", "rejected"}
    champion = client.get_model_version_by_alias("maemi-elpv-tiny", "champion").version
    assert str(champion) == (new_version if log["decision"].iloc[-1] == "promoted" else "1")
    assert retune.success                        # a rejection is a recorded decision, not a failed run
    (mp,) = retune.asset_materializations_for_node("model_promotion")
    assert mp.metadata["decision"].value == log["decision"].iloc[-1]

