"""Decode and validate one image file; read the pixel size SEM instruments write into TIFFs.

Supported: png, jpg/jpeg, tif/tiff, bmp; 1/8/16/32-bit greyscale, RGB and RGBA. A file that
cannot be fully decoded raises :class:`ImageRejected` with a reason a person can act on.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# PIL mode -> bits per channel.
_BIT_DEPTH = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8,
              "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}

# Decompression-bomb guard: big SEM montages are fine, absurd headers are not.
Image.MAX_IMAGE_PIXELS = 400_000_000


class ImageRejected(Exception):
    """The file is not a usable image; ``reason`` is a short machine-friendly code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str
    bit_depth: int
    pixel_size_nm: Optional[float]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inspect_image(path: str | Path) -> ImageInfo:
    """Fully decode ``path`` (so truncation is caught) and describe it."""
    path = Path(path)
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise ImageRejected(
            "unsupported_type",
            f"extension {path.suffix or '(none)'} is not one of {', '.join(SUPPORTED_EXTENSIONS)}",
        )
    if path.stat().st_size == 0:
        raise ImageRejected("empty_file", "the file has zero bytes; copy it again from the instrument")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # forces a full decode: truncated files fail here
                width, height = im.size
                mode = im.mode
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("undecodable", f"not a readable image ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        reason = "truncated" if "truncated" in msg.lower() or "end of file" in msg.lower() else "undecodable"
        raise ImageRejected(reason, f"decoding failed ({msg}); the file is probably incomplete") from exc
    if width < 8 or height < 8:
        raise ImageRejected("too_small", f"{width}x{height} pixels is too small to analyse")
    return ImageInfo(
        width=width,
        height=height,
        mode=mode,
        bit_depth=_BIT_DEPTH.get(mode, 8),
        pixel_size_nm=read_pixel_size_nm(path) if path.suffix.lower() in (".tif", ".tiff") else None,
    )


_UNIT_TO_NM = {"m": 1e9, "mm": 1e6, "um": 1e3, "µm": 1e3, "μm": 1e3, "nm": 1.0, "pm": 1e-3}


def read_pixel_size_nm(path: str | Path) -> Optional[float]:
    """Pixel size in nm from FEI/Thermo (tag 34682) or Zeiss (tag 34118) SEM TIFF metadata.

    Returns None when the file carries neither. tifffile parses both vendor formats.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            fei = tif.fei_metadata
            if fei:
                # FEI/Thermo: [Scan] PixelWidth in metres.
                scan = fei.get("Scan") or fei.get("EScan") or {}
                value = scan.get("PixelWidth")
                if value:
                    return float(value) * 1e9
            sem = tif.sem_metadata
            if sem:
                return _zeiss_pixel_size_nm(sem)
    except Exception:  # metadata is optional; a broken tag must not reject a good image
        return None
    return None


def _zeiss_pixel_size_nm(sem: dict) -> Optional[float]:
    # tifffile gives e.g. {'ap_pixel_size': ('Pixel Size', 2.233, 'nm'), ...}
    for key in ("ap_pixel_size", "ap_image_pixel_size"):
        entry = sem.get(key)
        if isinstance(entry, (tuple, list)) and len(entry) >= 3:
            value, unit = entry[1], str(entry[2]).strip()
            try:
                return float(value) * _UNIT_TO_NM[unit]
            except (KeyError, TypeError, ValueError):
                continue
        if isinstance(entry, str):
            m = re.search(r"([0-9.eE+-]+)\s*(pm|nm|um|µm|μm|mm|m)\b", entry)
            if m:
                return float(m.group(1)) * _UNIT_TO_NM[m.group(2)]
    return None


def load_gray_array(path: str | Path) -> np.ndarray:
    """The image as float32 greyscale in [0, 1], whatever its mode or bit depth."""
    with Image.open(path) as im:
        return to_gray_array(im)


def to_gray_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit detectors rarely use their full range (12- and 14-bit ADCs are
        # common): stretch the occupied range instead of dividing by 65535.
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return np.clip((arr - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA").convert("RGB")
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def load_rgb_uint8(path: str | Path) -> np.ndarray:
    """HxWx3 uint8, for previews and model input: 16-bit greyscale is rescaled, alpha dropped."""
    with Image.open(path) as im:
        if im.mode in ("RGB",):
            return np.asarray(im)
        if im.mode in ("RGBA", "LA", "P", "CMYK", "1", "L"):
            return np.asarray(im.convert("RGB"))
        gray = (to_gray_array(im) * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)
