"""Asking a registered MAEMI version questions (``maemi ask`` / ``maemi classify``; the chat
page, maemi_core/registry/chat.py, builds on the same pieces).

Both resolve ``models:/<name>@<alias>`` in the project's MLflow store (the profile's
``mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the embedded store) in a fresh
process. ``ask`` goes through the registered pyfunc, exactly what ``mlflow models serve``
runs; ``classify`` loads the package to rank the categories by likelihood as well.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from maemi_core.config import MaemiConfig
from maemi_core.model_registry import registered_model_name
from maemi_core.tracking import resolve_tracking_uri


def use_project_store(cfg: MaemiConfig) -> str:
    import mlflow

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.project_root)[0]
    mlflow.set_tracking_uri(uri)
    return uri


def default_model_uri(cfg: MaemiConfig, alias: str = "champion") -> str:
    return f"models:/{registered_model_name(cfg.dataset.name)}@{alias}"


def _check_images(paths: list[str]) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"image {p} does not exist")
        out.append(path)
    return out


def ask(model_uri: str, image_paths: list[str], question: str, rank: Optional[int] = None) -> str:
    import mlflow

    paths = _check_images(image_paths)
    model = mlflow.pyfunc.load_model(model_uri)
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    frame = pd.DataFrame({"image": [b64 if len(b64) > 1 else b64[0]], "question": [question]})
    if rank is not None:
        frame["rank"] = [rank]
    return str(model.predict(frame)["answer"].iloc[0])


def load_registered(model_uri: str):
    """The MAEMI model of a registered version (``models:/<name>@<alias>``, ``models:/<name>/<n>``
    or any model URI MLflow resolves), loaded from its package."""
    import mlflow

    from maemi_core.model.maemi_model import load_package

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        return load_package(local / "artifacts" / "package")


def classify_prompt(model, model_uri: str) -> tuple[list[str], str]:
    """(category names, zero-shot classification question) the version was tuned with."""
    meta = model.package_meta
    classes, question = meta.get("class_names"), meta.get("classify_question")
    if not classes or not question:
        raise ValueError(f"{model_uri} was registered without category names: re-run maemi_model to classify")
    return classes, question


def category_probabilities(model, model_uri: str, arrays: list[np.ndarray],
                           rank: Optional[int] = None) -> tuple[list[str], str, np.ndarray]:
    """(category names, scoring, (len(arrays), C) probabilities): per image ((3, S, S) uint8), a
    softmax over the model's category scores, compared the way the benchmark measured them
    (the package's ``category_scoring``: raw, length-normalised, calibrated or fitted log-likelihoods,
    or the head on the answer-position state,
    see maemi_core/model/category_scoring.py)."""
    from maemi_core.model.category_scoring import package_scoring, score
    from maemi_core.model.generation import candidate_log_likelihoods

    classes, question = classify_prompt(model, model_uri)
    questions, images = [question] * len(arrays), [[a] for a in arrays]
    raw, hidden = candidate_log_likelihoods(model, questions, images, classes, rank=rank, return_hidden=True)
    scoring = package_scoring(model)
    ll = score(model, questions, classes, scoring, raw, rank=rank, hidden=hidden)
    probs = np.exp(ll - ll.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return classes, scoring, probs


def read_images(model, image_paths: list[str]) -> list[np.ndarray]:
    """Each image file as the model sees it: (3, S, S) uint8, decoded the way the served model
    decodes its base64 input."""
    from maemi_core.registry.maemi_pyfunc import crops_databar, decode_image

    size = model.cfg.image_size
    return [decode_image(base64.b64encode(p.read_bytes()).decode(), size, crops_databar(model))
            for p in _check_images(image_paths)]


def classify(model_uri: str, image_paths: list[str], rank: Optional[int] = None) -> pd.DataFrame:
    """Per image: the category parsed from the model's answer, and a probability per category
    (:func:`category_probabilities`; column ``scoring``)."""
    from maemi_core.evaluation.category_parser import parse_category
    from maemi_core.model.generation import generate_answers

    paths = _check_images(image_paths)
    model = load_registered(model_uri)
    classes, question = classify_prompt(model, model_uri)
    arrays = read_images(model, image_paths)
    answers = generate_answers(model, [question] * len(paths), [[a] for a in arrays], max_new_tokens=24, rank=rank)
    classes, scoring, probs = category_probabilities(model, model_uri, arrays, rank)
    rows = []
    for p, a, pr in zip(paths, answers, probs):
        rows.append({"image": str(p), "category": parse_category(a, classes) or "(unparsed)",
                     **{c: float(v) for c, v in zip(classes, pr)}, "scoring": scoring, "answer": a})
    return pd.DataFrame(rows)
