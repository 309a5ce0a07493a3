"""Where images come from: the ELPV package and ImageFolder trees (``<root>/<class>/<file>``).

A source only lists candidate files with their label; validation, hashing and splitting
happen in :mod:`maemi_core.data.manifest`, the same way for every source.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from maemi_core.config import ConfigError

# The ELPV defect-probability buckets, named so that text models can talk about them.
ELPV_LABELS = {
    0.0: "functional",
    1 / 3: "possibly_defective",
    2 / 3: "likely_defective",
    1.0: "defective",
}

# Files that are never images and never worth a line in the rejected table.
_IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "_complete", ".complete"}


@dataclass
class Candidate:
    path: Path
    label: Optional[str]  # None: the file is not inside a class folder
    source: str
    forced_split: Optional[str] = None  # "test" for files under dataset.test_root
    extra: dict = field(default_factory=dict)
    # (reason, detail) when the source lists the file only to refuse it (e.g. ``link_outside_root``):
    # the manifest puts it in the rejected table without opening it.
    rejected: Optional[tuple[str, str]] = None


def elpv_root() -> Path:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "dataset.kind is 'elpv' but the elpv-dataset package is not installed: "
            "run `make venv` (or `pip install elpv-dataset`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def elpv_label(probability: float) -> str:
    return min(ELPV_LABELS.items(), key=lambda kv: abs(kv[0] - probability))[1]


def list_elpv() -> list[Candidate]:
    """The 2,624 ELPV cells, read from the package's own labels.csv (no copy is made)."""
    data_dir = elpv_root()
    out = []
    with open(data_dir / "labels.csv") as f:
        for row in csv.reader(f, delimiter=" ", skipinitialspace=True):
            if not row:
                continue
            rel, prob, cell_type = row[0], float(row[1]), row[2]
            out.append(
                Candidate(
                    path=data_dir / rel,
                    label=elpv_label(prob),
                    source="elpv",
                    extra={"defect_probability": round(prob, 4), "cell_type": cell_type},
                )
            )
    return out


def link_outside(path: Path, real_root: Path) -> Optional[Path]:
    """Where ``path`` leads when it is a symbolic link out of ``real_root`` (a resolved folder),
    else None."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    return None if target.is_relative_to(real_root) else target


def list_imagefolder(root: Path, source: str, forced_split: Optional[str] = None,
                     confine_links: bool = False) -> list[Candidate]:
    """Every file under ``root/<class>/`` (nested folders allowed); files directly in ``root``
    have no class and are reported as such by the manifest. Links to folders are not followed.
    ``confine_links`` (the drop folder): a link that leads out of ``root`` is never followed; it is
    listed as rejected with reason ``link_outside_root``."""
    if not root.is_dir():
        raise ConfigError(
            f"dataset root {root} does not exist or is not a folder: point dataset.root "
            f"(or dataset.test_root) at a folder laid out as <root>/<class>/<image files>"
        )
    real_root = root.resolve()
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.name.lower() in _IGNORED_NAMES or any(part.startswith(".") for part in rel.parts):
            continue
        label = rel.parts[0] if len(rel.parts) > 1 else None
        if confine_links and (target := link_outside(path, real_root)) is not None:
            out.append(Candidate(path=path, label=label, source=source, forced_split=forced_split,
                                 rejected=("link_outside_root", f"a link to {target}, outside {root}: copy the "
                                                                "file into the folder instead")))
            continue
        if path.is_file():
            out.append(Candidate(path=path, label=label, source=source, forced_split=forced_split))
    return out


def empty_class_folders(root: Path) -> list[str]:
    """Class folders (``root/<class>/``) that hold no file at all: a class that was meant to be
    there and silently is not."""
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and not any(p.is_file() and p.name.lower() not in _IGNORED_NAMES for p in d.rglob("*")))

