"""The served model's deployment rank: a client may choose only a whole rank of the trained range
(anything else is INVALID_PARAMETER_VALUE, HTTP 400 from the scoring server, before any row is
answered), and the merged fp32 weights kept per rank are bounded (least recently used dropped,
``model.served_rank_cache`` of the profile, carried in the package)."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException

from maemi_core.config import load_config
from maemi_core.data.sources import list_elpv

R_MIN, R_MAX, CACHE = 2, 8, 2


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A tiny MAEMI package (random 2-layer LM, untrained ViT), trained range [2, 8], cache 2."""
    import torch

    from maemi_core.model.maemi_model import build_model, save_package
    from maemi_core.vision.classifiers import vit_dir
    from maemi_core.vision.vit import PaperViT, PaperViTConfig

    root = tmp_path_factory.mktemp("served")
    profile = root / "profile.yaml"
    profile.write_text(yaml.safe_dump({
        "dataset": {"name": "ranktest", "kind": "imagefolder", "root": "images", "prompt_pack": "elpv",
                    "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "workdir": "work",
        "vision": {"encoder": "vit", "image_size": 224},
        "model": {"lm_profile": "tiny", "xattn_every": 1, "xattn_heads": 2, "xattn_head_dim": 16, "r_min": R_MIN,
                  "r_max": R_MAX, "alpha": 8.0, "max_new_tokens": 2, "served_rank_cache": CACHE},
    }))
    cfg = load_config(profile)
    torch.manual_seed(0)
    PaperViT(PaperViTConfig(num_classes=2)).save(vit_dir(cfg), ["defective", "functional"])
    return save_package(build_model(cfg, vit_dir(cfg)), cfg, root / "package")


@pytest.fixture(scope="module")
def served(package):
    from maemi_core.registry.maemi_pyfunc import MaemiPyfunc

    pyfunc = MaemiPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"package": str(package)}))
    return pyfunc


def _rows(*ranks) -> pd.DataFrame:
    b64 = base64.b64encode(list_elpv()[0].path.read_bytes()).decode()
    return pd.DataFrame({"image": [b64] * len(ranks), "question": ["Describe the cell."] * len(ranks),
                         "rank": list(ranks)})


@pytest.mark.parametrize("rank", [R_MIN - 1, R_MAX + 1, 1000, -3, 2.5, "abc"])
def test_a_rank_outside_the_trained_range_is_refused_before_any_row_is_answered(served, monkeypatch, rank):
    import maemi_core.model.generation as generation

    calls = []
    monkeypatch.setattr(generation, "generate_answers", lambda *a, **k: calls.append(k) or ["x"])
    with pytest.raises(MlflowException) as err:
        served.predict(None, _rows(R_MIN, rank))       # a valid row first: nothing is answered
    assert err.value.error_code == "INVALID_PARAMETER_VALUE" and err.value.get_http_status_code() == 400
    assert f"from {R_MIN} to {R_MAX}" in err.value.message and repr(rank) in err.value.message
    assert calls == []


def test_merged_weights_are_kept_for_at_most_the_configured_ranks(served):
    from maemi_core.model.dyqlora_fa import dylora_layers

    layers = dylora_layers(served.model)
    assert layers and all(m.merged_cache_size == CACHE for m in layers)
    out = served.predict(None, _rows(2, 3, 4, 3, None, 5))
    assert len(out) == 6 and out["answer"].map(lambda a: isinstance(a, str)).all()
    for m in layers:
        cache = m.__dict__["_w_inference"]
        assert len(cache) <= CACHE
        # Least recently used dropped: the last two ranks asked for (None: the deployment rank, r_max).
        assert [k[0] for k in cache] == [R_MAX, 5]
    # An in-range rank still answers as before: the same weights as a fresh merge at that rank.
    import torch

    m = layers[0]
    w = m._inference_weight(3, torch.float32)
    expected = m.weight_q.float() * m.weight_scale[:, None] + m.delta_weight(3)
    torch.testing.assert_close(w, expected)


def test_the_scoring_server_answers_a_bad_rank_with_400_and_the_reason(package, tmp_path):
    """``mlflow models serve``'s app, in-process: the refusal is a 400 whose message says which
    ranks are served, and a good rank is answered."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from maemi_core.model_registry import PYFUNC_FILE

    mlflow.pyfunc.save_model(str(tmp_path / "model"), python_model=str(PYFUNC_FILE),
                             artifacts={"package": str(package)})
    client = TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(tmp_path / "model"))))
    b64 = base64.b64encode(list_elpv()[0].path.read_bytes()).decode()

    def ask(rank):
        body = {"dataframe_split": {"columns": ["image", "question", "rank"],
                                    "data": [[b64, "Describe the cell.", rank]]}}
        return client.post("/invocations", content=json.dumps(body), headers={"Content-Type": "application/json"})

    bad = ask(R_MAX + 1)
    assert bad.status_code == 400
    assert bad.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert f"from {R_MIN} to {R_MAX}" in bad.json()["message"]
    good = ask(R_MIN)
    assert good.status_code == 200 and set(good.json()["predictions"][0]) == {"answer"}
