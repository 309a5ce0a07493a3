"""Detect and crop the instrument data bar that SEM images carry along the bottom.

FEI/Thermo, Zeiss, JEOL and Hitachi instruments burn a band of text (HV, magnification,
working distance, scale bar) under the micrograph. Its height differs by instrument and
resolution, so it is found, not hard-coded. A bar is a run of bottom rows on a flat black
or white background (micrograph rows are never flat: they carry shot noise and texture),
it contains text or a scale bar in the opposite tone, and it starts with a sharp step
from the micrograph above it.
"""

from __future__ import annotations

import numpy as np

_BG_TOLERANCE = 0.04     # pixels this close to the background level count as background
_BAR_ROW_BG = 0.55       # a bar row is at least this much background (text fills the rest)
_MAX_BAR_FRACTION = 0.35  # the bar is a strip along the bottom, not the image
_MIN_BAR_ROWS = 4
_MIN_INK = 0.003         # text/scale-bar pixels in the opposite tone, as a fraction of the band
_MAX_BG_ABOVE = 0.3      # the micrograph just above the bar is not background-coloured


def detect_databar(gray: np.ndarray) -> int:
    """Height in rows of the data bar at the bottom of ``gray`` (HxW, values in [0, 1]); 0 if none."""
    h = gray.shape[0]
    if h < 32:
        return 0
    bg_level = float(np.median(gray[-1]))
    if 0.12 < bg_level < 0.88:  # not a black or white background: no bar
        return 0
    is_bg = np.abs(gray - bg_level) < _BG_TOLERANCE          # (H, W)
    bg_frac = is_bg.mean(axis=1)                              # (H,)
    uniform = gray.std(axis=1) < 0.02                         # separator lines inside the bar
    bar_row = (bg_frac >= _BAR_ROW_BG) | uniform

    limit = int(h * (1 - _MAX_BAR_FRACTION))
    top, misses = h, 0
    # Walk up from the bottom; a few dense text rows (large font) may interrupt the background.
    for r in range(h - 1, limit - 1, -1):
        if bar_row[r]:
            top, misses = r, 0
        else:
            misses += 1
            if misses > 3:
                break
    height = h - top
    if height < _MIN_BAR_ROWS or top < limit + 1:
        return 0  # nothing, or the "bar" runs into the search limit: it is the image itself
    band = gray[top:]
    ink = (np.abs(band - bg_level) > 0.5).mean()
    above = bg_frac[max(0, top - 4): top]
    if ink < _MIN_INK or above.size == 0 or above.max() > _MAX_BG_ABOVE:
        return 0
    return height


def crop_databar(gray: np.ndarray) -> tuple[np.ndarray, int]:
    """``(image without the bar, bar height)``."""
    height = detect_databar(gray)
    return (gray[: gray.shape[0] - height] if height else gray), height
