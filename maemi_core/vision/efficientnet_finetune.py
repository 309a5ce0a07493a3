"""Fine-tuning the last blocks of the pretrained EfficientNet-Lite0 (a ``vit_classifier`` row,
``vision.baselines: [..., efficientnet_lite0_finetune]``).

The frozen probe reads ImageNet features; electroluminescence cells and micrographs are far from
ImageNet, so the last blocks may do better when they adapt. On a CPU only the last blocks are
affordable: the frozen trunk (stem + every MBConv block before the last ``finetune_blocks``)
runs **once** per image and its feature maps are cached (float16, per data version); the last
blocks, the head convolution and a new linear classifier are then trained on those maps with
the project's classifier loop (class-weighted cross-entropy, lr halving and early stopping on
the sample-disjoint validation split, a checkpoint per epoch, resume after a kill).

Augmentation is orientation-free, as for the ViT, but applied to the cached maps: a random
rotation by a multiple of 90 degrees and flip of each map. That approximates transforming the
pixels (the trunk's strided convolutions pad asymmetrically, so the two are close, not equal);
transforming the pixels would need one trunk pass per view and epoch. Random crops are not
applied (a 7x7 map has no room for them). BatchNorm statistics stay those of ImageNet (eval
mode, a few hundred images are too few to re-estimate them); their scale and shift train.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from maemi_core.data.transforms import standardize
from maemi_core.vision.efficientnet_lite0 import FEATURE_DIM, INFERENCE_CHUNK, EfficientNetLite0Encoder
from maemi_core.vision.multiscale_views import DIHEDRAL, dihedral


def first_tuned_block(encoder: EfficientNetLite0Encoder, blocks: int) -> int:
    n = len(encoder.net._blocks)
    if not 1 <= blocks <= n:
        raise ValueError(f"vision.finetune_blocks must be between 1 and {n} (EfficientNet-Lite0 has {n} blocks), "
                         f"got {blocks}")
    return n - blocks


def _drop_connect_rate(net, idx: int):
    rate = net._global_params.drop_connect_rate
    return rate * float(idx) / len(net._blocks) if rate else None


@torch.no_grad()
def trunk_features(encoder: EfficientNetLite0Encoder, images_u8: np.ndarray, first_block: int) -> np.ndarray:
    """(N, C, H, W) float16 output of the frozen stem and blocks ``[0, first_block)``."""
    net = encoder.inference_net()   # the frozen copy: batch norms folded, channels-last (same function)
    out = []
    for i in tqdm(range(0, len(images_u8), INFERENCE_CHUNK), desc="efficientnet trunk", unit="chunk", mininterval=2):
        x = standardize(torch.from_numpy(np.asarray(images_u8[i: i + INFERENCE_CHUNK])))
        x = net._swish(net._bn0(net._conv_stem(x.contiguous(memory_format=torch.channels_last))))
        for idx, block in enumerate(net._blocks[:first_block]):
            x = block(x, drop_connect_rate=_drop_connect_rate(net, idx))
        out.append(x.contiguous().to(torch.float16).numpy())
    return np.concatenate(out) if out else np.empty((0,), np.float16)


class TunedTop(nn.Module):
    """The last EfficientNet-Lite0 blocks + head convolution (copies of the pretrained ones, trained)
    and a linear classifier on their global-average feature."""

    def __init__(self, encoder: EfficientNetLite0Encoder, first_block: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        net = encoder.net
        self.blocks = nn.ModuleList(copy.deepcopy(list(net._blocks[first_block:])))
        self.conv_head, self.bn1, self.act = (copy.deepcopy(net._conv_head), copy.deepcopy(net._bn1),
                                              copy.deepcopy(net._swish))
        self.rates = [_drop_connect_rate(net, first_block + k) for k in range(len(self.blocks))]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        for p in self.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():                    # ImageNet running statistics stay
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) trunk maps -> (B, 1280) pooled features (the probe's, before any training)."""
        for block, rate in zip(self.blocks, self.rates):
            x = block(x, drop_connect_rate=rate)
        return self.act(self.bn1(self.conv_head(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def map_inputs(batch: np.ndarray) -> torch.Tensor:
    """Cached float16 trunk maps -> the float32 batch :class:`TunedTop` reads."""
    return torch.from_numpy(np.asarray(batch, dtype=np.float32))


def dihedral_maps(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each (C, H, W) map under a random one of the 8 dihedral transforms (rotations by multiples
    of 90 degrees, with and without a flip): :func:`multiscale_views.dihedral` per map."""
    ks = torch.randint(0, DIHEDRAL, (len(batch),), generator=generator).tolist()
    return torch.cat([dihedral(batch[i: i + 1], k) for i, k in enumerate(ks)]) if ks else batch.clone()


@torch.no_grad()
def pooled(model: TunedTop, maps: np.ndarray, batch_size: int = 128) -> np.ndarray:
    model.eval()
    out = [model.features(map_inputs(maps[i: i + batch_size])).numpy() for i in range(0, len(maps), batch_size)]
    return np.concatenate(out) if out else np.empty((0, FEATURE_DIM), np.float32)


def cached_trunk_features(images_u8: np.ndarray, cache_dir, key: str, first_block: int) -> np.ndarray:
    """:func:`trunk_features` of every image, memoised on disk per data version and split point."""
    from maemi_core.data.transforms import save_cache_npy

    path = Path(cache_dir) / f"efficientnet_trunk_b{first_block}_{key}.npy"
    if path.is_file():
        maps = np.load(path, mmap_mode="r")
        if len(maps) == len(images_u8):
            return maps
    maps = trunk_features(EfficientNetLite0Encoder(), images_u8, first_block)
    save_cache_npy(path, maps, "efficientnet_trunk_*.npy")
    return maps
