"""The MLflow pyfunc model of MAEMI (models-from-code: MLflow logs this file, not a pickle).

Input: a DataFrame with ``image`` (base64-encoded image bytes, or a list of them for
multi-image prompts), ``question`` (``<image>`` markers are added in front when the question
has none) and optional ``rank`` (DyQLoRA-FA deployment rank). Output: a DataFrame with
``answer``.
"""

from __future__ import annotations

import base64
import io

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

IMAGE_TOKEN = "<image>"


def decode_image(b64: str, size: int) -> np.ndarray:
    raw = base64.b64decode(b64)
    with Image.open(io.BytesIO(raw)) as im:
        from maemi_core.data.image_io import to_gray_array

        if im.mode in ("RGB", "RGBA", "L", "P", "LA", "1"):
            rgb = im.convert("RGB")
        else:  # 16/32-bit greyscale
            g = (to_gray_array(im) * 255 + 0.5).astype(np.uint8)
            rgb = Image.fromarray(g).convert("RGB")
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


class MaemiPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from maemi_core.model.maemi_model import load_package

        self.model = load_package(context.artifacts["package"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from maemi_core.model.generation import generate_answers

        size = self.model.cfg.image_size
        answers = []
        for _, row in model_input.iterrows():
            imgs = row["image"] if isinstance(row["image"], (list, tuple, np.ndarray)) else [row["image"]]
            arrays = [decode_image(b, size) for b in imgs]
            q = str(row["question"])
            if IMAGE_TOKEN not in q:
                q = IMAGE_TOKEN * len(arrays) + "\n" + q
            rank = row.get("rank") if "rank" in model_input.columns else None
            rank = int(rank) if rank is not None and not pd.isna(rank) else None
            answers += generate_answers(self.model, [q], [arrays], max_new_tokens=self.model.max_new_tokens,
                                        rank=rank)
        return pd.DataFrame({"answer": answers})


mlflow.models.set_model(MaemiPyfunc())
