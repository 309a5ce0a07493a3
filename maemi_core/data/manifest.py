"""The validated image manifest behind the ``raw_images`` asset.

One row per distinct image (``image_id`` = sha256 of the file bytes) with its label,
split, geometry, mode, bit depth, source and pixel size; files that cannot be used go to
a ``rejected`` table with the reason (and a copy into the quarantine folder), duplicates
to a ``duplicates`` table. Nothing here is fatal for a single bad file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
from tqdm.auto import tqdm

from maemi_core.config import ConfigError, MaemiConfig
from maemi_core.data.databar import detect_databar
from maemi_core.data.image_io import ImageRejected, inspect_image, load_gray_array, sha256_file
from maemi_core.data.incoming import incoming_candidates
from maemi_core.data.sources import Candidate, list_elpv, list_imagefolder
from maemi_core.data.sample_groups import AUTO_GROUPS, earlier_group_ids, group_ids, relative_path, sample_names
from maemi_core.data.splits import SPLITS, assign_split
from maemi_core.run_isolation import stage_dir

MANIFEST_COLUMNS = [
    "image_id", "path", "label", "split", "width", "height", "mode", "bit_depth",
    "source", "pixel_size_nm", "crop_bottom",
]
REJECTED_COLUMNS = ["path", "label", "source", "reason", "detail"]
DUPLICATE_COLUMNS = ["path", "label", "image_id", "duplicate_of"]


@dataclass
class ManifestResult:
    manifest: pd.DataFrame
    rejected: pd.DataFrame
    duplicates: pd.DataFrame
    n_candidates: int
    empty_classes: list[str] = field(default_factory=list)   # class folders without any file

    @property
    def rejected_fraction(self) -> float:
        return len(self.rejected) / self.n_candidates if self.n_candidates else 0.0

    @property
    def data_version(self) -> str:
        return manifest_hash(self.manifest)


def list_candidates(cfg: MaemiConfig) -> list[Candidate]:
    """The configured dataset's files plus those of every ingested fab batch (incoming.py)."""
    ds = cfg.dataset
    if ds.kind == "elpv":
        cands = list_elpv()
    else:
        cands = list_imagefolder(cfg.resolve(ds.root), source="imagefolder")
        if ds.test_root:
            cands += list_imagefolder(cfg.resolve(ds.test_root), source="imagefolder_test", forced_split="test")
    return cands + incoming_candidates(cfg)



def manifest_hash(manifest: pd.DataFrame) -> str:
    """Content version of a manifest: which images, with which labels, in which splits."""
    keyed = manifest[["image_id", "label", "split", "crop_bottom"]].sort_values("image_id")
    return hashlib.sha256(keyed.to_csv(index=False).encode()).hexdigest()[:16]


def build_manifest(
    cfg: MaemiConfig,
    candidates: Optional[list[Candidate]] = None,
    log: Callable[[str], None] = lambda msg: None,
) -> ManifestResult:
    """Validate every candidate image of the configured dataset and assign splits."""
    ds = cfg.dataset
    candidates = list_candidates(cfg) if candidates is None else candidates
    if not candidates:
        raise ConfigError(
            f"dataset '{ds.name}' has no files: put images under <root>/<class>/ "
            f"(root = {ds.root!r}) or choose another profile with MAEMI_CONFIG"
        )
    has_official_test = any(c.forced_split == "test" for c in candidates)
    log(f"{len(candidates)} candidate files in dataset '{ds.name}'")

    rejected: list[dict] = []
    hashed: list[tuple[Candidate, str]] = []
    for cand in tqdm(candidates, desc="hashing", unit="file", mininterval=2):
        if cand.rejected is not None:       # refused by its source (a link out of the drop folder, ...)
            rejected.append(_reject(cand, *cand.rejected))
            continue
        if cand.label is None:
            rejected.append(_reject(cand, "no_class_folder",
                                    "file sits directly in the dataset root; move it into <root>/<class>/"))
            continue
        try:
            hashed.append((cand, sha256_file(cand.path)))
        except OSError as exc:
            rejected.append(_reject(cand, "unreadable", f"cannot read the file ({exc})"))

    if ds.max_per_class is not None:
        # The slice applies to the base dataset; new fab batches always come in whole.
        fab = [h for h in hashed if h[0].source.startswith("incoming:")]
        hashed = _stable_slice([h for h in hashed if not h[0].source.startswith("incoming:")], ds.max_per_class,
                               cfg, has_official_test) + fab
        log(f"max_per_class={ds.max_per_class}: kept {len(hashed)} files ({len(fab)} from fab batches)")
    n_candidates = len(hashed) + len(rejected)

    rows: list[dict] = []
    for cand, image_id in tqdm(hashed, desc="validating", unit="img", mininterval=2):
        try:
            info = inspect_image(cand.path)
        except ImageRejected as exc:
            rejected.append(_reject(cand, exc.reason, exc.detail))
            continue
        crop = detect_databar(load_gray_array(cand.path)) if ds.crop_databar else 0
        rows.append({
            "image_id": image_id,
            "path": str(cand.path.resolve()),
            "label": cand.label,
            "forced_split": cand.forced_split,
            "width": info.width,
            "height": info.height - crop,
            "mode": info.mode,
            "bit_depth": info.bit_depth,
            "source": cand.source,
            "pixel_size_nm": info.pixel_size_nm if info.pixel_size_nm is not None else ds.pixel_size_nm,
            "crop_bottom": crop,
            **cand.extra,
        })

    manifest, duplicates, conflicts = _collapse_duplicates(pd.DataFrame(rows))
    rejected.extend(conflicts)
    if manifest.empty:
        raise ConfigError(
            f"none of the {n_candidates} files of dataset '{ds.name}' could be used; "
            f"see the rejected table for the reasons"
        )
    # Sample groups: every image of one sample shares the split of its group (hash of the group id).
    if ds.group_by == AUTO_GROUPS:      # near copies by their pixels; ids kept from the last manifest
        from maemi_core.data.near_copies import near_copy_group_ids

        manifest["group_id"], manifest["sample"] = near_copy_group_ids(manifest, cfg, earlier_group_ids(cfg), log)
    else:
        manifest["sample"] = sample_names([relative_path(p, s, cfg) for p, s in zip(manifest["path"], manifest["source"])],
                                          ds.group_by)
        manifest["group_id"] = group_ids(list(manifest["image_id"]), list(manifest["sample"]))
    test_groups = set(manifest.loc[manifest["forced_split"] == "test", "group_id"])
    manifest["split"] = [
        "test" if forced == "test" else assign_split(
            gid, ds.split.train, ds.split.val, ds.split.test, has_official_test=has_official_test)
        for gid, forced in zip(manifest["group_id"], manifest["forced_split"])
    ]
    # An official test set forces its images to test; images in root of the same sample would
    # leak it into train/val: reported, and removed when the profile says so.
    test_siblings = manifest["group_id"].isin(test_groups) & (manifest["split"] != "test")
    if test_siblings.any():
        log(f"WARNING: {int(test_siblings.sum())} images in root belong to a sample of the official test set"
            + (" (removed from training)" if ds.drop_test_samples_from_training else
               " (kept; dataset.drop_test_samples_from_training: true removes them)"))
        if ds.drop_test_samples_from_training:
            for _, r in manifest[test_siblings].iterrows():
                rejected.append({"path": r["path"], "label": r["label"], "source": r["source"],
                                 "reason": "same_sample_as_test",
                                 "detail": f"sample {r['sample']!r} is in the official test set"})
            manifest = manifest[~test_siblings].reset_index(drop=True)
            test_siblings = pd.Series(False, index=manifest.index)
    manifest["test_sample_in_training"] = test_siblings.to_numpy()
    empty = []
    if ds.kind == "imagefolder":
        from maemi_core.data.sources import empty_class_folders

        empty = sorted(set(empty_class_folders(cfg.resolve(ds.root)))
                       | (set(empty_class_folders(cfg.resolve(ds.test_root))) if ds.test_root else set()))
        if empty:
            log(f"WARNING: class folders without any file: {', '.join(empty)}")
    labels = sorted(manifest["label"].unique())
    if len(labels) < 2:
        where = f"under {cfg.resolve(ds.root)}" if ds.kind == "imagefolder" else f"in dataset '{ds.name}'"
        raise ConfigError(
            f"dataset '{ds.name}' has {len(labels)} usable class ({', '.join(labels) or 'none'}) {where}"
            + (f"; empty class folders: {', '.join(empty)}" if empty else "")
            + ": classification and MAEMI's tuning need at least two classes. Add a folder of images for each "
            "further class (<root>/<class>/<image files>)")
    extra_cols = [c for c in manifest.columns if c not in MANIFEST_COLUMNS and c != "forced_split"]
    manifest = manifest[MANIFEST_COLUMNS + extra_cols].sort_values(["label", "image_id"]).reset_index(drop=True)
    rejected_df = pd.DataFrame(rejected, columns=REJECTED_COLUMNS)
    log(f"manifest: {len(manifest)} images, {len(rejected_df)} rejected, {len(duplicates)} duplicates")
    return ManifestResult(manifest, rejected_df, duplicates, n_candidates, empty)


def _reject(cand: Candidate, reason: str, detail: str) -> dict:
    return {"path": str(cand.path), "label": cand.label, "source": cand.source, "reason": reason, "detail": detail}


def _stable_slice(hashed: list[tuple[Candidate, str]], n: int, cfg: MaemiConfig,
                  has_official_test: bool) -> list[tuple[Candidate, str]]:
    """At most ``n`` files per class, split by the configured fractions: in every
    (class, split) cell the files with the smallest hashes. A slice that never reshuffles
    and, unlike a plain per-class cut, leaves no class missing from val or test."""
    fr = cfg.dataset.split
    quota = {name: (max(1, round(n * f)) if f > 0 else 0)
             for name, f in (("train", fr.train), ("val", fr.val), ("test", fr.test))}
    cells: dict[tuple[str, str], list[tuple[Candidate, str]]] = {}
    for cand, iid in hashed:
        split = cand.forced_split or assign_split(iid, fr.train, fr.val, fr.test, has_official_test)
        cells.setdefault((cand.label, split), []).append((cand, iid))
    return [item for (label, split), items in sorted(cells.items())
            for item in sorted(items, key=lambda it: it[1])[: quota[split]]]


def _collapse_duplicates(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Keep one row per hash. Same bytes under two labels is a labelling error: every copy
    is rejected so that neither label is trusted. Copies from an official test set win, so
    test content never reaches training."""
    if df.empty:
        return df.assign(forced_split=None), pd.DataFrame(columns=DUPLICATE_COLUMNS), []
    df = df.assign(_test_first=df["forced_split"].ne("test")).sort_values(["image_id", "_test_first", "path"])
    conflicts: list[dict] = []
    labels_per_hash = df.groupby("image_id")["label"].nunique()
    bad = set(labels_per_hash[labels_per_hash > 1].index)
    for _, row in df[df["image_id"].isin(bad)].iterrows():
        others = sorted(set(df.loc[df["image_id"] == row["image_id"], "label"]) - {row["label"]})
        conflicts.append({"path": row["path"], "label": row["label"], "source": row["source"],
                          "reason": "conflicting_labels",
                          "detail": f"identical bytes also filed under {', '.join(others)}; keep one copy in the right class"})
    df = df[~df["image_id"].isin(bad)]
    first = df.drop_duplicates("image_id", keep="first")
    dup_mask = df.duplicated("image_id", keep="first")
    keeper = first.set_index("image_id")["path"]
    duplicates = df[dup_mask][["path", "label", "image_id"]].assign(
        duplicate_of=lambda d: d["image_id"].map(keeper)).reset_index(drop=True)
    return first.drop(columns="_test_first").reset_index(drop=True), duplicates, conflicts


def split_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per class (rows) and split (columns), with totals."""
    table = pd.crosstab(manifest["label"], manifest["split"]).reindex(columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return table


def imbalance_ratio(manifest: pd.DataFrame) -> float:
    counts = manifest["label"].value_counts()
    return float(counts.max() / counts.min()) if len(counts) else 0.0


def leaked_images(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows whose content appears in more than one split (must be empty)."""
    splits_per_id = manifest.groupby("image_id")["split"].nunique()
    return manifest[manifest["image_id"].isin(splits_per_id[splits_per_id > 1].index)]


# --- persistence -------------------------------------------------------------------------

def manifest_dir(cfg: MaemiConfig) -> Path:
    return stage_dir(cfg, "raw_images")


def save_manifest(result: ManifestResult, out_dir: Path) -> dict[str, Path]:
    """Write manifest/rejected/duplicates parquet, copy rejected files to quarantine/."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "manifest": out_dir / "manifest.parquet",
        "rejected": out_dir / "rejected.parquet",
        "duplicates": out_dir / "duplicates.parquet",
        "summary": out_dir / "summary.json",
    }
    result.manifest.to_parquet(paths["manifest"], index=False)
    result.rejected.to_parquet(paths["rejected"], index=False)
    result.duplicates.to_parquet(paths["duplicates"], index=False)
    quarantine = out_dir / "quarantine"
    for _, row in result.rejected.iterrows():
        src = Path(row["path"])
        if src.is_file() and not src.is_symlink():     # never copy through a link
            dst = quarantine / row["reason"] / f"{hashlib.sha1(str(src).encode()).hexdigest()[:8]}_{src.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                shutil.copy2(src, dst)
    paths["summary"].write_text(json.dumps({
        "data_version": result.data_version,
        "n_images": len(result.manifest),
        "n_rejected": len(result.rejected),
        "n_duplicates": len(result.duplicates),
        "rejected_fraction": result.rejected_fraction,
        "imbalance_ratio": imbalance_ratio(result.manifest),
        "empty_class_folders": result.empty_classes,
    }, indent=2))
    return paths


def load_manifest(cfg: MaemiConfig) -> pd.DataFrame:
    path = manifest_dir(cfg) / "manifest.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest at {path}: materialize the raw_images asset first (make demo, or the Dagster UI)"
        )
    return pd.read_parquet(path)
