"""Detect and crop the instrument data bar that SEM images carry along the bottom.

FEI/Thermo, Zeiss, JEOL and Hitachi instruments burn a band of text (HV, magnification,
working distance, scale bar) under the micrograph. Its height differs by instrument and
resolution, so it is found, not hard-coded: the band is a run of rows at the bottom whose
pixels are almost all at the two extremes (flat black or white background with
anti-aliased text), set off from the micrograph by a sharp step in the row statistics.
"""

from __future__ import annotations

import numpy as np

# A data-bar row: at least this fraction of pixels near black or white.
_EXTREME_FRACTION = 0.75
# Never search above this fraction of the height: the bar is a strip, not the image.
_MAX_BAR_FRACTION = 0.35
# Shorter than this many rows is noise, not a bar.
_MIN_BAR_ROWS = 4


def detect_databar(gray: np.ndarray) -> int:
    """Height in rows of the data bar at the bottom of ``gray`` (HxW in [0, 1]); 0 if none."""
    h = gray.shape[0]
    if h < 32:
        return 0
    lo, hi = np.percentile(gray, 1), np.percentile(gray, 99)
    span = max(hi - lo, 1e-6)
    near = 0.08 * span
    extreme = ((gray <= lo + near) | (gray >= hi - near)).mean(axis=1)  # (H,)
    flat = gray.std(axis=1) < 0.02  # uniform separator lines also belong to the bar

    bar_row = (extreme >= _EXTREME_FRACTION) | flat
    limit = int(h * (1 - _MAX_BAR_FRACTION))
    top = h
    # Walk up from the bottom while rows look like the bar, tolerating a few text-dense rows.
    misses = 0
    for r in range(h - 1, limit - 1, -1):
        if bar_row[r]:
            top = r
            misses = 0
        else:
            misses += 1
            if misses > 3:
                break
    height = h - top
    if height < _MIN_BAR_ROWS:
        return 0
    # The micrograph above the bar must look different: a real bar is a step, not a trend.
    above = gray[max(0, top - height): top]
    if above.size == 0 or np.mean(extreme[max(0, top - height): top]) >= _EXTREME_FRACTION:
        return 0
    return height


def crop_databar(gray: np.ndarray) -> tuple[np.ndarray, int]:
    """``(image without the bar, bar height)``."""
    height = detect_databar(gray)
    return (gray[: gray.shape[0] - height] if height else gray), height
