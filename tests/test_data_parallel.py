"""Data-parallel tuning (``model.processes``): 2 torchrun processes (gloo) against one process with
the same effective batch, from the same initial model, on real ELPV images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from maemi_core.config import load_config
from maemi_core.data.sources import list_elpv
from maemi_core.model.generation import generate_answers
from maemi_core.model.maemi_model import build_model
from maemi_core.vision.classifiers import vit_dir
from maemi_core.training.data_parallel import train_in_processes
from maemi_core.training.maemi_training import ImageStore, MaemiTrainingConfig, build_examples, train_maemi
from tests.conftest import REPO


@pytest.fixture
def setup(tmp_path):
    profile = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    profile["workdir"] = str(tmp_path / "work")
    profile["vision"]["encoder"] = "efficientnet_lite0"      # frozen, needs no trained ViT
    profile["model"].update({"xattn_heads": 2, "xattn_head_dim": 16})
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    cfg = load_config(path)
    cells = list_elpv()[:6]
    images = ImageStore({f"i{k}": (str(c.path), 0) for k, c in enumerate(cells)}, 224)
    words = ["functional cell, uniform luminescence", "cracked cell with a dark region", "dark corner, likely defective"]
    records = [{"id": f"r{k}", "image_ids": [f"i{k % 6}"],
                "conversations": [{"from": "human", "value": "<image>\nDescribe the cell."},
                                  {"from": "gpt", "value": f"{words[k % 3]} ({k % 6})"}]} for k in range(24)]
    model = build_model(cfg, vit_dir(cfg))
    twin = build_model(cfg, vit_dir(cfg))              # the same seeds: the same model
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in twin.state_dict().items())
    train, _ = build_examples(records[:16], model.tokenizer, 64)
    val, _ = build_examples(records[16:], model.tokenizer, 64)
    tcfg = MaemiTrainingConfig(lr=3e-3, micro_batch=4, effective_batch=8, budget_epochs=3, eval_points=3,
                               gate_lr_multiplier=10, seed=0)
    return cfg, model, twin, images, train, val, tcfg, tmp_path


def test_two_processes_match_one_with_the_same_effective_batch(setup):
    cfg, model, single, images, train, val, tcfg, tmp = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # the same arithmetic as each of the two processes (1 thread each)
    try:
        one = train_maemi(single, train, val, images, tcfg, tmp / "one" / "checkpoint.pt", "fp")
    finally:
        torch.set_num_threads(threads)
    (tmp / "two").mkdir()
    two = train_in_processes(model, cfg, train, val, images, tcfg, tmp / "two" / "checkpoint.pt", "fp", processes=2,
                             threads=1)

    h1, h2 = pd.DataFrame([h.__dict__ for h in one.history]), pd.DataFrame([h.__dict__ for h in two.history])
    print(pd.concat({"1 process": h1[["train_loss", "val_loss"]], "2 processes": h2[["train_loss", "val_loss"]]},
                    axis=1).to_string())
    assert len(h1) == len(h2) == 3 and (h1["step"] == h2["step"]).all() and (h1["tokens"] == h2["tokens"]).all()
    assert h1["train_loss"].iloc[-1] < h1["train_loss"].iloc[0]            # it learns at all
    # With the same threads per process, the same arithmetic: the gradient of a step is g1 + g2
    # either way (accumulated in one process, all-reduced across two), the rank and the dropout
    # masks of each micro-batch are the same. So the trajectory and the weights are bit-identical.
    # (With a different thread count, float reductions inside the matmuls differ and so do the bits.)
    np.testing.assert_array_equal(h2["train_loss"], h1["train_loss"])
    np.testing.assert_array_equal(h2["val_loss"], h1["val_loss"])
    a, b = single.trainable_state_dict(), model.trainable_state_dict()
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    print(f"largest difference of {diff.numel():,} trained values: {float(diff.abs().max()):.1e}")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if k.endswith("attn_gate"))   # the gates moved
    # And the tuned models answer the same at greedy decoding.
    imgs = [[images.get(f"i{k}")] for k in range(6)]
    qs = ["<image>\nDescribe the cell."] * 6
    assert generate_answers(single.eval(), qs, imgs, max_new_tokens=12) == \
        generate_answers(model.eval(), qs, imgs, max_new_tokens=12)


def test_the_torchrun_launcher_dies_with_a_killed_step():
    """A step killed mid-training must not leave torchrun training on its checkpoint: the launcher is
    started with a parent-death signal (what train_in_processes passes as preexec_fn)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    step = subprocess.Popen([sys.executable, "-c", """
import subprocess, sys
from maemi_core.training.data_parallel import _die_with_parent
child = subprocess.Popen(["sleep", "120"], preexec_fn=_die_with_parent)
print(child.pid, flush=True)
child.wait()
"""], stdout=subprocess.PIPE, text=True)
    child = int(step.stdout.readline())
    os.kill(step.pid, signal.SIGKILL)                # the step dies the hard way
    step.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:       # reaped by init or a zombie: gone either way
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the launched process outlived the killed step")
