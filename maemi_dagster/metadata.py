"""Helpers that turn core results into Dagster metadata people can look at."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg
import pandas as pd


def image_md(path: str | Path, alt: str = "image") -> dg.MetadataValue:
    """A PNG embedded in markdown, which the Dagster UI renders inline."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


def table_md(df: pd.DataFrame, max_rows: int = 50, index: bool = True) -> dg.MetadataValue:
    shown = df.head(max_rows)
    text = shown.to_markdown(index=index)
    if len(df) > max_rows:
        text += f"\n\n({len(df) - max_rows} more rows not shown)"
    return dg.MetadataValue.md(text)
