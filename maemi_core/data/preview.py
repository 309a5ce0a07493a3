"""A grid of sample images per class: what people look at before they read any table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from maemi_core.data.image_io import load_rgb_uint8


def load_display_image(row: pd.Series, size: int) -> Image.Image:
    arr = load_rgb_uint8(row["path"])
    crop = int(row.get("crop_bottom", 0) or 0)
    if crop:
        arr = arr[: arr.shape[0] - crop]
    im = Image.fromarray(arr)
    im.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), (32, 32, 32))
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def preview_grid(manifest: pd.DataFrame, out_path: str | Path, per_class: int = 4, tile: int = 128) -> Path:
    """Save a PNG with one row per class (first ``per_class`` images by hash) and return its path."""
    out_path = Path(out_path)
    classes = sorted(manifest["label"].unique())
    label_w, pad = 150, 4
    width = label_w + per_class * (tile + pad) + pad
    height = max(1, len(classes)) * (tile + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, label in enumerate(classes):
        rows = manifest[manifest["label"] == label].sort_values("image_id").head(per_class)
        y = pad + r * (tile + pad)
        n = int((manifest["label"] == label).sum())
        draw.text((pad, y + tile // 2 - 12), f"{label}", fill=(0, 0, 0), font=font)
        draw.text((pad, y + tile // 2 + 2), f"n={n}", fill=(90, 90, 90), font=font)
        for c, (_, row) in enumerate(rows.iterrows()):
            grid.paste(load_display_image(row, tile), (label_w + pad + c * (tile + pad), y))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return out_path
