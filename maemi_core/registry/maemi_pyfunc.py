"""The MLflow pyfunc model of MAEMI (models-from-code: MLflow logs this file, not a pickle).

Input: a DataFrame with ``image`` (base64-encoded image bytes, or a list of them for
multi-image prompts), ``question`` (``<image>`` markers are added in front when the question
has none) and optional ``rank`` (DyQLoRA-FA deployment rank, an integer in the trained range
[r_min, r_max]; anything else is refused with INVALID_PARAMETER_VALUE, HTTP 400 from
``mlflow models serve``, before any row is answered). Output: a DataFrame with ``answer``.
"""

from __future__ import annotations

import base64

import mlflow
import numpy as np
import pandas as pd

from maemi_core.model.prompts import IMAGE_TOKEN, with_image_markers  # noqa: F401 (chat page, tests)


def requested_ranks(model_input: pd.DataFrame, r_min: int, r_max: int) -> list:
    """The ``rank`` of every row (None: the package's deployment rank), checked before any row is
    answered: a client may only choose a whole number in [r_min, r_max] (each rank served costs a
    merged copy of the weights)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    if "rank" not in model_input.columns:
        return [None] * len(model_input)
    out = []
    for i, value in enumerate(model_input["rank"].tolist()):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            out.append(None)
            continue
        try:
            rank = int(value)
            whole = not isinstance(value, bool) and float(value) == rank
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole or not r_min <= rank <= r_max:
            raise MlflowException(f"rank {value!r} (row {i}) is not allowed: this model serves whole ranks from "
                                  f"{r_min} to {r_max} (its trained range), or no rank for its deployment rank",
                                  error_code=INVALID_PARAMETER_VALUE)
        out.append(rank)
    return out


def decode_image(b64: str, size: int, crop_databar: bool = False) -> np.ndarray:
    """A base64 image as the model sees it: the same decoding as training and the benchmark
    (``maemi_core.data.transforms.model_input``), the data bar detected and removed when the
    model was trained on cropped images (``crop_databar``, from the package)."""
    from maemi_core.data.transforms import model_input

    return model_input(base64.b64decode(b64), size, find_databar=crop_databar)


def crops_databar(model) -> bool:
    """Whether ``model`` was trained with the instrument data bar removed (the profile's
    ``dataset.crop_databar``, stored in its package)."""
    return bool((getattr(model, "package_meta", None) or {}).get("crop_databar", False))


class MaemiPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from maemi_core.model.maemi_model import load_package

        self.model = load_package(context.artifacts["package"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from maemi_core.model.generation import generate_answers

        size = self.model.cfg.image_size
        ranks = requested_ranks(model_input, self.model.cfg.r_min, self.model.cfg.r_max)
        answers = []
        for (_, row), rank in zip(model_input.iterrows(), ranks):
            imgs = row["image"] if isinstance(row["image"], (list, tuple, np.ndarray)) else [row["image"]]
            arrays = [decode_image(b, size, crops_databar(self.model)) for b in imgs]
            q = with_image_markers(str(row["question"]), len(arrays))
            answers += generate_answers(self.model, [q], [arrays], max_new_tokens=self.model.max_new_tokens,
                                        rank=rank)
        return pd.DataFrame({"answer": answers})


mlflow.models.set_model(MaemiPyfunc())
