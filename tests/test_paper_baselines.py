"""The paper's Tables 7 and 8 (job paper_baselines): the zoo's rows build and train, one row of
each family trains on tiny data through the real Dagster asset and lands in the tables, a
failing partition fails alone and the table marks it, and rows that cannot run here are listed
with their reason."""

from __future__ import annotations

import shutil
import sys

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from maemi_core.vision.paper_baselines import zoo
from maemi_core.vision.paper_baselines.library_modules import import_submodule
from tests.conftest import REPO

FAMILY_ROWS = {"convnet": "SqueezeNet", "vit": "VanillaViT", "vsl": "SimCLR", "gnn": "GraphConv", "gcl": "GRACE"}


def test_every_row_of_both_tables_is_in_the_zoo_or_says_why_not():
    table7 = {"AlexNet", "DenseNet", "ResNet", "VGG", "GoogleNet", "SqueezeNet", "Barlowtwins", "SimCLR", "byol", "moco",
              "simsiam", "CCT", "CVT", "ConViT", "ConvVT", "CrossViT", "SwinT", "VanillaViT", "Visformer", "ATS", "CaiT",
              "DeepViT", "Dino", "Distillation", "LeViT", "NesT", "PatchMerger", "PiT", "RegionViT", "SMIM", "T2TViT",
              "ViT-SD"}
    table8 = {"GBT", "GRACE", "BGRL", "InfoGraph", "APPNP", "AGNN", "ARMA", "DNA", "GAT", "GGConv", "GraphConv",
              "GCN2Conv", "ChebConv", "GraphUNet", "MPNN", "RGGConv", "SuperGAT", "TAGConv"}
    assert {r.method for r in zoo.ROWS if r.table == 7} == table7
    assert {r.method for r in zoo.ROWS if r.table == 8} == table8
    assert {r.method for r in zoo.ROWS if r.unavailable} == {"ConViT", "Visformer"}


@pytest.mark.parametrize("method", [r.method for r in zoo.ROWS if r.kind == "supervised" and not r.unavailable])
def test_each_supervised_row_builds_and_takes_a_training_step(method):
    torch.manual_seed(0)
    model = zoo.build_supervised(method, 4, 32, "tiny")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert model(x).shape == (4, 4)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "the step changed nothing"


def test_model_files_load_without_the_packages_init():
    """vit-pytorch's __init__ imports torchvision and PyGCL's imports DGL: neither runs."""
    import_submodule("vit_pytorch", "cait")
    import_submodule("GCL", "losses")
    assert "torchvision" not in sys.modules and "dgl" not in sys.modules
    with pytest.raises(ImportError, match="baselines"):
        import_submodule("no_such_package_here", "model")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from maemi_dagster.assets.data import raw_images
    from maemi_dagster.resources import MaemiConfigResource, MLflowResource

    tmp = tmp_path_factory.mktemp("paper")
    (tmp / "configs").mkdir()
    profile = tmp / "configs" / "tiny.yaml"
    shutil.copy(REPO / "configs" / "tiny.yaml", profile)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        resources = {"maemi_config": MaemiConfigResource(path=str(profile)), "mlflow_tracking": MLflowResource()}
        instance = dg.DagsterInstance.ephemeral()
        assert dg.materialize([raw_images], resources=resources, instance=instance).success
        yield tmp, profile, resources, instance
        mlflow.set_tracking_uri(None)


def _materialize(workspace, method):
    from maemi_dagster.assets.paper_baselines import paper_baseline

    _, _, resources, instance = workspace
    return dg.materialize([paper_baseline], partition_key=method, resources=resources, instance=instance,
                          raise_on_error=False)


def test_one_row_of_each_family_trains_through_the_job_and_a_failing_partition_fails_alone(workspace, monkeypatch):
    from maemi_core.config import load_config
    from maemi_dagster.assets.paper_baselines import paper_tables, row_fingerprint

    tmp, profile, resources, instance = workspace
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real_build = zoo.build_supervised

    def out_of_memory(method, *args, **kwargs):
        if method == "AlexNet":
            raise MemoryError("simulated: the row's model does not fit")
        return real_build(method, *args, **kwargs)

    monkeypatch.setattr(zoo, "build_supervised", out_of_memory)
    assert not _materialize(workspace, "AlexNet").success
    for method in FAMILY_ROWS.values():
        assert _materialize(workspace, method).success, method
    again = _materialize(workspace, "SqueezeNet")            # same data, code and budget: reused, not retrained
    assert again.success
    assert again.asset_materializations_for_node("paper_baseline")[0].metadata["reused"].value is True

    assert dg.materialize([paper_tables], resources=resources, instance=instance).success
    cfg = load_config(profile)
    out = cfg.workdir_path / "paper_tables"
    t7 = pd.read_csv(out / "table7_vision_baselines.csv").set_index("method")
    t8 = pd.read_csv(out / "table8_graph_baselines.csv").set_index("method")
    both = pd.concat([t7, t8])
    for family, method in FAMILY_ROWS.items():
        r = both.loc[method]
        assert r["status"] == "ok" and r["family"] == family
        assert 0.0 <= r["top1_ci_low"] <= r["top1"] <= r["top1_ci_high"] <= 1.0
        assert r["top5"] == 1.0 and r["top5_k"] == 4          # 4 classes: every class is in the top 5
        assert r["params"] > 0 and r["n_test"] == 12
    assert both.loc["AlexNet", "status"].startswith("failed: MemoryError")
    assert both.loc["ConViT", "status"].startswith("cannot run here")
    assert both.loc["ResNet", "status"].startswith("not run")
    assert len(t7) == 32 and len(t8) == 18                     # no benchmark in this workspace: no MAEMI rows
    assert (out / "table7_vision_baselines.png").stat().st_size > 0
    # the row's scores are those it recorded for the test images
    folder = cfg.workdir_path / "paper_baselines" / "GraphConv" / row_fingerprint(cfg, "GraphConv")
    assert np.load(folder / "test_scores.npy").shape == (12, 4)


def test_a_second_run_of_the_same_row_waits_for_the_first(tmp_path, profile_factory):
    """Two runs of one partition never train the same row into the same folder at once: the
    second waits for the first (then reuses its result) and gives up with LockTimeout."""
    import threading

    from maemi_core.shared_database import LockTimeout
    from maemi_dagster.assets.paper_baselines import row_lock

    cfg = profile_factory()
    folder = tmp_path / "paper_baselines" / "SqueezeNet" / "abc"
    held, release = threading.Event(), threading.Event()

    def first():
        with row_lock(cfg, folder, timeout_s=5):
            held.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    assert held.wait(5)
    with pytest.raises(LockTimeout, match="another run"):
        with row_lock(cfg, folder, timeout_s=1.5):
            pass
    release.set()
    t.join()
    with row_lock(cfg, folder, timeout_s=5):
        pass
