"""Code versions of the assets, derived from the core code they run, so the Dagster UI marks an
asset (and everything downstream) stale after a change to that code, not only after new data."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

CORE = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def code_version(*parts: str) -> str:
    """sha256 (12 hex digits) over the source of the given ``maemi_core`` subpackages or modules
    (``"data"``, ``"teacher"``, ``"config.py"``...): every .py and .yaml file under them."""
    h = hashlib.sha256()
    for part in sorted(parts):
        target = CORE / part
        files = sorted(f for f in target.rglob("*") if f.suffix in (".py", ".yaml")) if target.is_dir() else [target]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"no core code at {target}")
        for f in files:
            h.update(str(f.relative_to(CORE)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]
