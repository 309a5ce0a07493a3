"""L2-normalised image embeddings (``h_cls``) from the configured encoder, for every image.

The encoder is ``vision.encoder``: the paper's ViT trained by ``vit_classifier``, or the
frozen pretrained EfficientNet-Lite0. Both expose ``encode(images) -> (patch_tokens, h_cls)``,
which is also what the vision-language model consumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from maemi_core.config import MaemiConfig
from maemi_core.data.manifest import manifest_hash
from maemi_core.data.transforms import cached_image_array, standardize
from maemi_core.run_isolation import stage_dir


class ImageEncoder(Protocol):
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def load_encoder(cfg: MaemiConfig) -> torch.nn.Module:
    """The configured encoder in eval mode, frozen."""
    if cfg.vision.encoder == "efficientnet_lite0":
        from maemi_core.vision.efficientnet_lite0 import EfficientNetLite0Encoder

        encoder = EfficientNetLite0Encoder()
    else:
        from maemi_core.vision.vit import PaperViT

        from maemi_core.vision.classifiers import vit_dir

        directory = vit_dir(cfg)
        if not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(f"no trained ViT in {directory}: materialize vit_classifier first")
        encoder, _ = PaperViT.load(directory)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()


@torch.no_grad()
def embed_images(encoder: ImageEncoder, images_u8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, d) float32 unit-norm ``h_cls`` for (N, 3, S, S) uint8 images, in batches, no gradients."""
    out = []
    for i in tqdm(range(0, len(images_u8), batch_size), desc="embedding", unit="batch", mininterval=2):
        h_cls = encoder.encode(standardize(torch.from_numpy(np.array(images_u8[i: i + batch_size]))))[1]
        out.append(torch.nn.functional.normalize(h_cls, dim=1).numpy())
    return np.concatenate(out).astype(np.float32)


def embeddings_dir(cfg: MaemiConfig) -> Path:
    return stage_dir(cfg, "embeddings")


def compute_embeddings(cfg: MaemiConfig, manifest: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """``(index, matrix)``: index rows (image_id, split, label) align with matrix rows."""
    key = manifest_hash(manifest)
    images = cached_image_array(manifest, cfg.vision.image_size, cfg.workdir_path / "cache", key)
    if cfg.vision.encoder == "efficientnet_lite0":  # h_cls = the pooled feature map, shared with the probe
        from maemi_core.vision.efficientnet_lite0 import cached_pooled_features

        feats = cached_pooled_features(images, cfg.workdir_path / "cache", key, cfg.vision.embed_batch_size)
        matrix = (feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    else:
        matrix = embed_images(load_encoder(cfg), images, cfg.vision.embed_batch_size)
    index = manifest[["image_id", "split", "label"]].reset_index(drop=True)
    return index, matrix


def save_embeddings(cfg: MaemiConfig, index: pd.DataFrame, matrix: np.ndarray) -> Path:
    out = embeddings_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    index.assign(encoder=cfg.vision.encoder).to_parquet(out / "index.parquet", index=False)
    np.save(out / "embeddings.npy", matrix)
    return out


def load_embeddings(cfg: MaemiConfig) -> tuple[pd.DataFrame, np.ndarray]:
    out = embeddings_dir(cfg)
    if not (out / "embeddings.npy").is_file():
        raise FileNotFoundError(f"no embeddings in {out}: materialize image_embeddings first")
    return pd.read_parquet(out / "index.parquet"), np.load(out / "embeddings.npy")
