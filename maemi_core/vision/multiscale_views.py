"""More views of one micrograph for a frozen encoder: multi-scale tiles and test-time augmentation.

The encoder sees 224x224 pixels. A 1024x700 SEM micrograph squashed to that loses the structure
a microscopist looks for (beads on a fibre, a crack tip), so:

- **Tiles** (``tile_features``): at each scale s in ``vision.tile_scales`` the image (data bar
  removed, aspect ratio kept) is resized so that its short side is s x 224 pixels and covered by
  224x224 tiles (evenly spaced, overlapping where the side is not a multiple of 224); the tiles'
  pooled features are averaged. The image's feature is the whole-image feature followed by one
  average per scale (1280 x (1 + scales) values), so a linear probe can weigh the scales.
- **Test-time augmentation** (``dihedral_views``): micrographs have no canonical orientation, so
  the 8 rotations/flips of an image are the same micrograph; a classifier's scores are averaged
  over them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from maemi_core.data.image_io import load_rgb_uint8
from maemi_core.data.transforms import standardize

DIHEDRAL = 8


def dihedral(batch: torch.Tensor, k: int) -> torch.Tensor:
    """Transform ``k`` (0-7) of the dihedral group on (B, C, H, W): ``k % 4`` quarter turns, then a
    horizontal flip when ``k >= 4``. ``k = 0`` is the identity."""
    out = torch.rot90(batch, k % 4, dims=(2, 3)) if k % 4 else batch
    return torch.flip(out, dims=(3,)) if k >= 4 else out


def tile_starts(length: int, tile: int) -> list[int]:
    """Evenly spaced starts of ``ceil(length / tile)`` tiles covering ``[0, length)``."""
    if length <= tile:
        return [0]
    n = math.ceil(length / tile)
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def scaled_tiles(rgb: np.ndarray, scale: int, tile: int = 224) -> np.ndarray:
    """(n, 3, tile, tile) uint8 tiles of an (H, W, 3) image resized (aspect kept) so that its short
    side is ``scale * tile`` pixels."""
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("an empty image has no tiles")
    f = scale * tile / min(h, w)
    nh, nw = max(tile, round(h * f)), max(tile, round(w * f))
    big = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BICUBIC), dtype=np.uint8)
    tiles = [big[t: t + tile, s: s + tile] for t in tile_starts(nh, tile) for s in tile_starts(nw, tile)]
    return np.stack(tiles).transpose(0, 3, 1, 2).copy()


@torch.no_grad()
def tile_features(encoder, paths: Sequence[str], crops: Sequence[int], scales: Sequence[int],
                  whole: np.ndarray, tile: int = 224, batch_size: int = 32, desc: str = "tile features") -> np.ndarray:
    """(N, d x (1 + len(scales))) float32: ``whole`` (the (N, d) whole-image features) followed by
    the mean pooled feature of each scale's tiles. ``encoder.encode`` returns (tokens, pooled)."""
    if any(int(s) < 1 for s in scales):
        raise ValueError(f"vision.tile_scales {list(scales)}: every scale must be an integer >= 1")
    out = np.zeros((len(paths), whole.shape[1] * (1 + len(scales))), np.float32)
    out[:, : whole.shape[1]] = whole
    for i, (path, crop) in enumerate(tqdm(list(zip(paths, crops)), desc=desc, unit="img", mininterval=2)):
        rgb = load_rgb_uint8(path)
        if crop:
            rgb = rgb[: rgb.shape[0] - int(crop)]
        for j, s in enumerate(scales):
            tiles = scaled_tiles(rgb, int(s), tile)
            pooled = torch.cat([encoder.encode(standardize(torch.from_numpy(tiles[b: b + batch_size])))[1]
                                for b in range(0, len(tiles), batch_size)])
            d = whole.shape[1]
            out[i, d * (j + 1): d * (j + 2)] = pooled.mean(0).numpy()
    return out


@torch.no_grad()
def dihedral_features(encoder, images_u8: np.ndarray, batch_size: int = 64,
                      desc: str = "dihedral features") -> np.ndarray:
    """(8, N, d) pooled features of every dihedral transform of (N, 3, S, S) uint8 images."""
    views = []
    for k in tqdm(range(DIHEDRAL), desc=desc, unit="view", mininterval=2):
        views.append(torch.cat([encoder.encode(dihedral(standardize(torch.from_numpy(
            np.array(images_u8[i: i + batch_size]))), k))[1] for i in range(0, len(images_u8), batch_size)]).numpy())
    return np.stack(views)
