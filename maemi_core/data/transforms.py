"""Images as model input: resize, orientation-free augmentation, standardisation.

Written with PIL, numpy and torch (torchvision does not import beside the project's torch).
Images are decoded once into a uint8 array cache; augmentation runs on whole batches.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from maemi_core.data.image_io import load_rgb_uint8


def model_input(source: "str | Path | bytes", size: int, crop_bottom: int = 0,
                find_databar: bool = False) -> np.ndarray:
    """The one decoding of an image into the model's input, shared by training, the benchmark,
    ``maemi ask`` / ``classify``, the chat page and the served model: (3, size, size) uint8, any
    mode or bit depth (16-bit greyscale stretched over its occupied range), the instrument data
    bar removed (``crop_bottom`` rows, as the manifest recorded, or ``find_databar``: detected here
    exactly as the manifest detects it), the whole field of view squashed to a square
    (micrographs are analysed as a whole; centre-cropping could cut away the defect).
    ``source``: a path or the file's bytes."""
    import io

    from maemi_core.data.databar import detect_databar
    from maemi_core.data.image_io import load_gray_array

    opened = (lambda: io.BytesIO(source)) if isinstance(source, (bytes, bytearray)) else (lambda: source)
    arr = load_rgb_uint8(opened())
    if find_databar:
        crop_bottom = detect_databar(load_gray_array(opened()))
    if crop_bottom:
        arr = arr[: arr.shape[0] - crop_bottom]
    im = Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_resized(path: str, size: int, crop_bottom: int = 0) -> np.ndarray:
    """A manifest image as the model sees it (:func:`model_input` with the recorded crop)."""
    return model_input(path, size, crop_bottom)


def build_image_array(manifest: pd.DataFrame, size: int, desc: str = "decoding") -> np.ndarray:
    """(N, 3, size, size) uint8 for the manifest's rows, in order."""
    out = np.empty((len(manifest), 3, size, size), dtype=np.uint8)
    crops = manifest["crop_bottom"] if "crop_bottom" in manifest else pd.Series(0, index=manifest.index)
    for i, (path, crop) in enumerate(tqdm(list(zip(manifest["path"], crops)), desc=desc, unit="img", mininterval=2)):
        out[i] = load_resized(path, size, int(crop or 0))
    return out


def standardize(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]: mean 0.5 / std 0.5 per channel (paper A.8)."""
    return batch_u8.float().div_(255.0).sub_(0.5).div_(0.5)


def augment(batch: torch.Tensor, generator: Optional[torch.Generator] = None,
            scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
            jitter: float = 0.1) -> torch.Tensor:
    """Orientation-free augmentation of a standardised batch (B, C, H, W).

    Micrographs have no canonical orientation, so every dihedral transform (90-degree
    rotations and flips) is equally valid; random resized crops vary the magnification;
    a mild brightness/contrast jitter follows detector gain changes.
    """
    b, _, h, w = batch.shape
    g = generator
    out = torch.empty_like(batch)
    for i in range(b):
        area = h * w * _uniform(*scale, g)
        log_r = _uniform(math.log(ratio[0]), math.log(ratio[1]), g)
        ar = math.exp(log_r)
        ch = min(h, max(8, int(round(math.sqrt(area / ar)))))
        cw = min(w, max(8, int(round(math.sqrt(area * ar)))))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        crop = batch[i: i + 1, :, top: top + ch, left: left + cw]
        img = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        k = int(torch.randint(0, 4, (1,), generator=g))
        if k:
            img = torch.rot90(img, k, dims=(1, 2))
        if bool(torch.randint(0, 2, (1,), generator=g)):
            img = torch.flip(img, dims=(2,))
        if jitter:
            contrast = 1.0 + _uniform(-jitter, jitter, g)
            brightness = _uniform(-jitter, jitter, g)
            mean = img.mean()
            img = ((img - mean) * contrast + mean + brightness).clamp_(-1.0, 1.0)
        out[i] = img
    return out


def _uniform(lo: float, hi: float, g: Optional[torch.Generator]) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def cached_image_array(manifest: pd.DataFrame, size: int, cache_dir, key: str) -> np.ndarray:
    """``build_image_array`` memoised on disk (memory-mapped on reuse).

    ``key`` must change whenever the rows change (the manifest's data version does); every
    vision step of a run then decodes each image once.
    """
    from pathlib import Path

    cache_dir = Path(cache_dir)
    path = cache_dir / f"images_{size}_{key}.npy"
    if path.is_file():
        arr = np.load(path, mmap_mode="r")
        if arr.shape == (len(manifest), 3, size, size):
            return arr
    arr = build_image_array(manifest, size)
    save_cache_npy(path, arr, f"images_{size}_*.npy")
    return arr


def save_cache_npy(path: Path, arr: np.ndarray, family: str, keep: int = 2) -> None:
    """Write a cache file atomically (a unique temporary name, then rename: concurrent runs never
    read a half-written or interleaved file) and drop all but the ``keep`` newest of its
    ``family`` (glob) - a run still reading an older one keeps its open file."""
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    tmp.replace(path)
    from maemi_core.run_isolation import mtime_or_zero

    others = sorted((p for p in path.parent.glob(family) if p != path), key=mtime_or_zero, reverse=True)
    for old in others[keep - 1:]:
        old.unlink(missing_ok=True)


# Fixed, label-preserving views of an image that a training stream may show in place of it
# (``model.train_task_views``): mirror images and the half turn. An image id names a view as
# ``<image id>|<view>``; image ids are content hashes, so the separator never occurs in one.
VIEWS = ("none", "hflip", "vflip", "rot180")
VIEW_SEP = "|"


def view_id(image_id: str, view: str) -> str:
    """The id under which ``view`` of ``image_id`` is looked up (``none``: the image id itself)."""
    if view not in VIEWS:
        raise ValueError(f"unknown image view {view!r}: one of {VIEWS}")
    return image_id if view == "none" else f"{image_id}{VIEW_SEP}{view}"


def split_view(image_id: str) -> tuple[str, str]:
    """(image id, view) of an id from :func:`view_id`."""
    base, _, view = image_id.partition(VIEW_SEP)
    return base, view or "none"


def apply_view(image: np.ndarray, view: str) -> np.ndarray:
    """``view`` of a (C, H, W) image, as a new contiguous array (``none``: the image itself)."""
    if view == "none":
        return image
    if view == "hflip":
        return np.ascontiguousarray(image[:, :, ::-1])
    if view == "vflip":
        return np.ascontiguousarray(image[:, ::-1, :])
    if view == "rot180":
        return np.ascontiguousarray(image[:, ::-1, ::-1])
    raise ValueError(f"unknown image view {view!r}: one of {VIEWS}")
