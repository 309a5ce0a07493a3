"""The paper's Tables 7 and 8 from the rows' results, beside MAEMI's rows.

Each row's result lives in ``<workdir>/paper_baselines/<method>/<fingerprint>/`` (the
fingerprint covers the data version, the code and the ``paper_baselines`` profile section, so a
changed input never reuses an old result and two runs of the same row write the same folder):
``result.json`` when it trained, ``failed.json`` (the error) when it failed, with
``test_scores.npy`` and ``test_ids.json`` (its scores on every test image of the manifest).

The tables score every row on the same test images: those of the benchmark's classification
table when ``benchmark_tables`` has run on the same data (its MAEMI zero-/few-shot rows and
the project's probes are then copied beside the baselines), else every test image. Rows that
did not produce a result are listed with their status (``failed: ...``, ``not run``,
``cannot run here: ...``): nothing is dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from maemi_core.vision.paper_baselines.baseline_training import score
from maemi_core.vision.paper_baselines.zoo import ROWS

COLUMNS = ["method", "family", "source", "status", "top1", "top1_ci_low", "top1_ci_high", "top5", "top5_ci_low",
           "top5_ci_high", "top5_k", "macro_f1", "balanced_accuracy", "n_test", "train_minutes", "epochs", "params",
           "citation"]
MAEMI_ROWS = ("maemi_zero_shot", "maemi_few_shot")


def results_root(cfg) -> Path:
    return cfg.workdir_path / "paper_baselines"


def result_dir(cfg, method: str, fingerprint: str) -> Path:
    return results_root(cfg) / method / fingerprint


def write_result(folder: Path, result: dict, test_ids: list[str]) -> None:
    """Publish a row's result folder atomically: written aside, then renamed into place."""
    (folder / "test_ids.json").write_text(json.dumps(test_ids))
    (folder / "failed.json").unlink(missing_ok=True)
    tmp = folder / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=float))
    tmp.replace(folder / "result.json")


def write_failure(folder: Path, method: str, error: BaseException) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failed.json").write_text(json.dumps({"method": method, "error": f"{type(error).__name__}: {error}"[:500]}))


def _benchmark_images(reports: Optional[Path]) -> Optional[list[str]]:
    path = reports / "samples" / "classification_maemi_zero_shot.csv" if reports else None
    if path is None or not path.is_file():
        return None
    return list(pd.read_csv(path)["image_id"].astype(str))


def build_tables(cfg, fingerprints: dict[str, str], class_names: list[str], test_labels: dict[str, int],
                 out: Path, reports: Optional[Path] = None) -> dict[str, Path]:
    """``fingerprints``: method -> the fingerprint its current result must have; ``test_labels``:
    image id -> class index of the manifest's test images. Writes both tables (CSV and
    Markdown) and the bar chart under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    common = _benchmark_images(reports)
    if common is not None and not set(common) <= set(test_labels):
        common = None                   # the benchmark read other data: compare on every test image
    ids = common if common is not None else sorted(test_labels)
    y = np.array([test_labels[i] for i in ids])
    rows = []
    for r in ROWS:
        base = {"method": r.method, "family": r.family, "source": r.source, "citation": r.citation}
        if r.unavailable:
            rows.append(base | {"status": f"cannot run here: {r.unavailable}"})
            continue
        folder = result_dir(cfg, r.method, fingerprints.get(r.method, ""))
        if (folder / "result.json").is_file():
            res = json.loads((folder / "result.json").read_text())
            scores = np.load(folder / "test_scores.npy")
            pos = {iid: k for k, iid in enumerate(json.loads((folder / "test_ids.json").read_text()))}
            rows.append(base | {k: res.get(k) for k in ("train_minutes", "epochs", "params")}
                        | score(scores[[pos[i] for i in ids]], y, class_names) | {"status": "ok"})
        elif (folder / "failed.json").is_file():
            rows.append(base | {"status": "failed: " + json.loads((folder / "failed.json").read_text())["error"]})
        else:
            rows.append(base | {"status": "not run (materialize its partition of paper_baseline)"})
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    beside = _maemi_rows(reports) if common is not None else pd.DataFrame(columns=COLUMNS)
    paths = {}
    families = {7: ("convnet", "vsl", "vit"), 8: ("gnn", "gcl")}
    names = {7: "table7_vision_baselines", 8: "table8_graph_baselines"}
    for t, fams in families.items():
        part = pd.concat([table[table["family"].isin(fams)], beside], ignore_index=True)
        part.to_csv(out / f"{names[t]}.csv", index=False)
        intro = (f"Paper Table {t}, on {len(ids)} test images ("
                 + ("the benchmark's classification images" if common is not None else "every test image of the manifest")
                 + f"). Each baseline trained from scratch on the train split, selected on val, at "
                 f"{cfg.paper_baselines.image_size} px, {cfg.paper_baselines.model_size} size, at most "
                 f"{cfg.paper_baselines.epochs} epochs or {cfg.paper_baselines.minutes:g} minutes; top-1 and top-k "
                 "(k = min(5, classes)) with 95% bootstrap intervals over the test images.")
        shown = part.drop(columns=["citation"]).copy()
        shown["status"] = shown["status"].fillna("").str.replace("|", "/")
        (out / f"{names[t]}.md").write_text(f"# {names[t]} ({cfg.dataset.name})\n\n{intro}\n\n"
                                            + shown.to_markdown(index=False, floatfmt=".3f") + "\n")
        paths[f"table{t}_csv"], paths[f"table{t}_md"] = out / f"{names[t]}.csv", out / f"{names[t]}.md"
        paths[f"table{t}_figure"] = _bar_chart(part, f"Paper Table {t} ({cfg.dataset.name}, {len(ids)} test images)",
                                               out / f"{names[t]}.png")
    return paths


def _maemi_rows(reports: Path) -> pd.DataFrame:
    """MAEMI's zero-/few-shot rows and the project's vision rows from the benchmark's table."""
    path = reports / "classification.csv"
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    c = pd.read_csv(path)
    keep = c[c["method"].isin(MAEMI_ROWS) | ~c["method"].str.contains(r"maemi|:|\[|majority", regex=True)]
    out = keep.rename(columns={"n_images": "n_test"}).assign(
        family=lambda d: np.where(d["method"].str.startswith("maemi"), "maemi", "project_probe"),
        source="benchmark_tables (reports/classification.csv)", status="ok")
    return out.reindex(columns=COLUMNS)


def _bar_chart(table: pd.DataFrame, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["status"] == "ok"].sort_values("top1")
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(ok) + 1)))
    err = np.array([ok["top1"] - ok["top1_ci_low"], ok["top1_ci_high"] - ok["top1"]], dtype=float)
    colors = ["tab:red" if f == "maemi" else "tab:gray" if f == "project_probe" else "tab:blue" for f in ok["family"]]
    ax.barh(ok["method"], ok["top1"].astype(float), xerr=np.nan_to_num(err), color=colors, capsize=2)
    ax.set_xlim(0, 1)
    ax.set_xlabel("test top-1 (95% bootstrap interval)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
