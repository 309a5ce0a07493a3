"""Demonstration sampling by embedding similarity (paper A.6).

All similarities are cosine similarities of L2-normalised ``h_cls`` embeddings, computed
as matrix products in row chunks (memory O(chunk x n), no Python loop over pairs), so the
SEM dataset's 21k images take seconds.

- Few-shot demonstrations: for every target image (any split) the ``k`` most similar
  *train* images, excluding the target itself and exact duplicates, ordered so that the
  most similar comes last, nearest the question (as open_flamingo's RICES does).
- Inter-class similarity groups: an anchor plus its most similar images from *other*
  categories (one per category while categories last): look-alikes that must be told apart.
- Intra-class dissimilarity groups: images of one category chosen greedily so that each
  new member is the one least similar to the group so far (farthest-point sampling).
- Spatial-heterogeneity groups: images of one category whose content varies most across the
  field of view, by the score of :func:`spatial_heterogeneity`.

Groups are built within one split at a time (train groups for instruction tuning, val/test
groups for evaluation), so no group mixes splits; demonstrations always come from train.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from maemi_core.run_isolation import stage_dir

# Cosine similarity above which two embeddings are treated as the same image.
DUPLICATE_SIMILARITY = 1.0 - 1e-6


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _order_key(image_id: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{image_id}".encode()).hexdigest()


def few_shot_demonstrations(index: pd.DataFrame, emb: np.ndarray, k: int, chunk_size: int = 2048) -> pd.DataFrame:
    """One row per image: ``target_id, target_split, target_label, demo_ids, demo_labels,
    demo_similarities`` (lists, most similar last)."""
    pool = np.flatnonzero(index["split"].to_numpy() == "train")
    if len(pool) == 0:
        raise ValueError("no train images to draw demonstrations from")
    pool_emb = torch.from_numpy(emb[pool])                                     # (P, d)
    pool_ids = index["image_id"].to_numpy()[pool]
    pool_labels = index["label"].to_numpy()[pool]
    pos_in_pool = {iid: j for j, iid in enumerate(pool_ids)}
    k_eff = min(k, len(pool) - 1) if len(pool) > 1 else 0
    rows = []
    for sl in _chunks(len(index), chunk_size):
        sims = torch.from_numpy(emb[sl]) @ pool_emb.T                          # (C, P)
        sims[sims >= DUPLICATE_SIMILARITY] = -float("inf")                     # exact duplicates
        for r, iid in enumerate(index["image_id"].to_numpy()[sl]):
            if iid in pos_in_pool:
                sims[r, pos_in_pool[iid]] = -float("inf")                      # the target itself
        top = sims.topk(k_eff, dim=1) if k_eff else None
        for r in range(sims.shape[0]):
            i = sl.start + r
            if top is None:
                ids, sim = [], []
            else:
                valid = torch.isfinite(top.values[r])
                sel = top.indices[r][valid].flip(0).numpy()                   # most similar last
                ids, sim = pool_ids[sel].tolist(), top.values[r][valid].flip(0).tolist()
            rows.append({
                "target_id": index["image_id"].iat[i], "target_split": index["split"].iat[i],
                "target_label": index["label"].iat[i], "demo_ids": ids,
                "demo_labels": [pool_labels[pos_in_pool[d]] for d in ids], "demo_similarities": sim,
            })
    return pd.DataFrame(rows)


def _mean_pairwise(vectors: torch.Tensor) -> float:
    if len(vectors) < 2:
        return float("nan")
    s = vectors @ vectors.T
    n = len(vectors)
    return float((s.sum() - s.diagonal().sum()) / (n * (n - 1)))


def inter_class_similar(index: pd.DataFrame, emb: np.ndarray, split: str, group_size: int, n_groups: int,
                        chunk_size: int = 2048, candidates: int = 64) -> list[dict]:
    """Groups of highly similar images from different categories, most similar anchors first."""
    rows = np.flatnonzero(index["split"].to_numpy() == split)
    labels = index["label"].to_numpy()[rows]
    if len(rows) < 2 or len(set(labels)) < 2:
        return []
    e = torch.from_numpy(emb[rows])
    lab = torch.from_numpy(pd.factorize(labels)[0])
    m = min(candidates, len(rows) - 1)
    best_sim, best_idx = [], []
    for sl in _chunks(len(rows), chunk_size):
        sims = e[sl] @ e.T                                                     # (C, n)
        sims[lab[sl, None] == lab[None, :]] = -float("inf")                    # other classes only
        top = sims.topk(m, dim=1)
        best_sim.append(top.values)
        best_idx.append(top.indices)
    best_sim, best_idx = torch.cat(best_sim), torch.cat(best_idx)              # (n, m)
    used: set[int] = set()
    groups = []
    for a in torch.argsort(best_sim[:, 0], descending=True).tolist():
        if len(groups) >= n_groups:
            break
        if a in used or not torch.isfinite(best_sim[a, 0]):
            continue
        members, classes = [a], {int(lab[a])}
        for pass_unique in (True, False):  # prefer one image per category, then fill up
            for j, s in zip(best_idx[a].tolist(), best_sim[a].tolist()):
                if len(members) >= group_size:
                    break
                if not np.isfinite(s) or j in used or j in members:
                    continue
                if pass_unique and int(lab[j]) in classes:
                    continue
                members.append(j)
                classes.add(int(lab[j]))
        if len(members) < min(group_size, 2):
            continue
        used.update(members)
        groups.append(_group("inter_class_similar", split, index, rows, members, _mean_pairwise(e[members])))
    return groups


def intra_class_dissimilar(index: pd.DataFrame, emb: np.ndarray, split: str, group_size: int,
                           n_groups: int) -> list[dict]:
    """Per category, farthest-point groups; categories take turns (largest first)."""
    sub = index[index["split"] == split]
    by_class = {label: np.flatnonzero((index["split"] == split).to_numpy() & (index["label"] == label).to_numpy())
                for label in sub["label"].value_counts().index}
    # A fixed, content-derived order of anchors per class.
    anchors = {label: sorted(rows.tolist(), key=lambda r: _order_key(index["image_id"].iat[r], "intra"))
               for label, rows in by_class.items()}
    used: set[int] = set()
    groups: list[dict] = []
    while len(groups) < n_groups:
        progressed = False
        for label, rows in by_class.items():
            if len(groups) >= n_groups:
                break
            free = [r for r in rows if r not in used]
            if len(free) < group_size or len(free) < 2:
                continue
            anchor = next(r for r in anchors[label] if r not in used)
            members = [anchor]
            free_t = torch.tensor([r for r in free if r != anchor])
            free_e = torch.from_numpy(emb[free_t.numpy()])
            max_sim = free_e @ torch.from_numpy(emb[anchor])                   # (F,) similarity to the group
            taken = torch.zeros(len(free_t), dtype=torch.bool)
            while len(members) < group_size:
                cand = torch.where(taken, torch.tensor(float("inf")), max_sim)
                j = int(cand.argmin())
                taken[j] = True
                members.append(int(free_t[j]))
                max_sim = torch.maximum(max_sim, free_e @ torch.from_numpy(emb[int(free_t[j])]))
            used.update(members)
            groups.append(_group("intra_class_dissimilar", split, index, np.arange(len(index)), members,
                                 _mean_pairwise(torch.from_numpy(emb[members]))))
            progressed = True
        if not progressed:
            break
    return groups


def spatial_heterogeneity(images_u8: np.ndarray, grid: int = 4) -> np.ndarray:
    """Score per image of how unevenly its content is spread over the field of view.

    The greyscale image is cut into ``grid x grid`` tiles; for each tile we measure mean
    intensity, local contrast (standard deviation) and edge density (mean Sobel gradient
    magnitude). The score is the mean over those three measures of their coefficient of
    variation across tiles (std / mean). A uniform film scores near 0; an image with a
    cluster of large particles on one side and fine ones elsewhere scores high.
    """
    x = torch.from_numpy(np.array(images_u8)).float().mean(dim=1, keepdim=True) / 255.0  # (N, 1, H, W)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")  # no false edges at the border
    gx = F.conv2d(xp, kx)
    gy = F.conv2d(xp, kx.transpose(2, 3))
    grad = torch.sqrt(gx ** 2 + gy ** 2)
    mean = F.adaptive_avg_pool2d(x, grid)                                       # (N, 1, g, g)
    std = (F.adaptive_avg_pool2d(x ** 2, grid) - mean ** 2).clamp_min(0).sqrt()
    edges = F.adaptive_avg_pool2d(grad, grid)

    def cv(t: torch.Tensor) -> torch.Tensor:
        t = t.flatten(1)
        return t.std(dim=1) / (t.mean(dim=1) + 1e-6)

    return ((cv(mean) + cv(std) + cv(edges)) / 3.0).numpy()


def spatial_heterogeneity_one(gray: np.ndarray, grid: int = 4) -> float:
    """:func:`spatial_heterogeneity` of one greyscale image (HxW in [0, 1]) with numpy only."""
    from scipy import ndimage as ndi

    g = gray.astype(np.float64)
    grad = np.hypot(ndi.sobel(g, axis=1, mode="nearest"), ndi.sobel(g, axis=0, mode="nearest"))
    h, w = g.shape
    cells = [(slice(i * h // grid, (i + 1) * h // grid), slice(j * w // grid, (j + 1) * w // grid))
             for i in range(grid) for j in range(grid)]
    stats = np.array([[g[c].mean(), g[c].std(), grad[c].mean()] for c in cells])  # (tiles, 3)
    return float(np.mean(stats.std(axis=0, ddof=1) / (stats.mean(axis=0) + 1e-6)))


def heterogeneity_groups(index: pd.DataFrame, scores: np.ndarray, split: str, group_size: int,
                         n_groups: int) -> list[dict]:
    """Per category, the most heterogeneous images in groups of ``group_size``; categories take turns."""
    in_split = index["split"].to_numpy() == split
    order = {label: [r for r in np.argsort(-scores) if in_split[r] and index["label"].iat[r] == label]
             for label in index.loc[in_split, "label"].value_counts().index}
    groups: list[dict] = []
    cursor = {label: 0 for label in order}
    while len(groups) < n_groups:
        progressed = False
        for label, rows in order.items():
            if len(groups) >= n_groups:
                break
            start = cursor[label]
            members = rows[start: start + group_size]
            if len(members) < group_size:
                continue
            cursor[label] = start + group_size
            groups.append(_group("spatial_heterogeneity", split, index, np.arange(len(index)), members,
                                 float(np.mean(scores[members]))))
            progressed = True
        if not progressed:
            break
    return groups


def _group(kind: str, split: str, index: pd.DataFrame, rows: np.ndarray, members: list[int], score: float) -> dict:
    ids = [index["image_id"].iat[int(rows[m])] for m in members]
    return {"kind": kind, "split": split, "image_ids": ids,
            "labels": [index["label"].iat[int(rows[m])] for m in members], "score": score}


def build_groups(index: pd.DataFrame, emb: np.ndarray, heterogeneity: np.ndarray, group_size: int,
                 groups_per_split: int, chunk_size: int = 2048) -> pd.DataFrame:
    """All group kinds for every split, with a stable ``group_id``."""
    out: list[dict] = []
    for split in ("train", "val", "test"):
        out += inter_class_similar(index, emb, split, group_size, groups_per_split, chunk_size)
        out += intra_class_dissimilar(index, emb, split, group_size, groups_per_split)
        out += heterogeneity_groups(index, heterogeneity, split, group_size, groups_per_split)
    df = pd.DataFrame(out, columns=["kind", "split", "image_ids", "labels", "score"])
    df.insert(0, "group_id", [f"{k}-{s}-{i:04d}" for i, (k, s) in
                              enumerate(zip(df["kind"], df["split"]))] if len(df) else [])
    return df


# --- the demonstration_sets step -----------------------------------------------------------

def demonstrations_dir(cfg) -> Path:
    return stage_dir(cfg, "demonstrations")


def build_demonstration_sets(cfg, manifest: pd.DataFrame, index: pd.DataFrame, emb: np.ndarray,
                             log=lambda m: None) -> dict:
    """Few-shot demonstrations, the three group kinds and heterogeneity scores, saved as parquet
    under ``<workdir>/demonstrations``; returns the tables and their paths."""
    from maemi_core.data.manifest import manifest_hash
    from maemi_core.data.transforms import cached_image_array

    if list(index["image_id"]) != list(manifest["image_id"]):
        raise ValueError("embeddings are stale (their images differ from the manifest): "
                         "materialize image_embeddings again")
    s = cfg.sampling
    few_shot = few_shot_demonstrations(index, emb, s.k_shot, s.chunk_size)
    log(f"few-shot: {len(few_shot)} targets x {s.k_shot} train demonstrations")
    images = cached_image_array(manifest, cfg.vision.image_size, cfg.workdir_path / "cache", manifest_hash(manifest))
    scores = np.concatenate([spatial_heterogeneity(images[sl]) for sl in _chunks(len(manifest), 256)])
    heterogeneity = pd.DataFrame({"image_id": index["image_id"], "split": index["split"], "label": index["label"],
                                  "heterogeneity": scores})
    groups = build_groups(index, emb, scores, s.group_size, s.groups_per_split, s.chunk_size)
    log("groups: " + ", ".join(f"{k}={n}" for k, n in groups.groupby(["kind", "split"]).size().items()))
    out = demonstrations_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"few_shot": out / "few_shot.parquet", "groups": out / "groups.parquet",
             "heterogeneity": out / "heterogeneity.parquet", "preview": out / "groups_preview.png"}
    few_shot.to_parquet(paths["few_shot"], index=False)
    groups.to_parquet(paths["groups"], index=False)
    heterogeneity.to_parquet(paths["heterogeneity"], index=False)
    groups_preview(manifest, few_shot, groups, paths["preview"])
    return {"few_shot": few_shot, "groups": groups, "heterogeneity": heterogeneity, "paths": paths}


def groups_preview(manifest: pd.DataFrame, few_shot: pd.DataFrame, groups: pd.DataFrame, path, tile: int = 112):
    """One row per sampling kind (first train group; for few-shot a test target and its demos)."""
    from PIL import Image, ImageDraw, ImageFont

    from maemi_core.data.preview import load_display_image

    by_id = manifest.set_index("image_id")
    rows: list[tuple[str, list[str], list[str]]] = []
    fs = few_shot[few_shot["target_split"] == "test"].head(1)
    if len(fs):
        r = fs.iloc[0]
        rows.append(("few-shot (target first, most similar last)",
                     [r["target_id"], *r["demo_ids"]], [f"target: {r['target_label']}", *r["demo_labels"]]))
    for kind in ("inter_class_similar", "intra_class_dissimilar", "spatial_heterogeneity"):
        g = groups[(groups["kind"] == kind) & (groups["split"] == "train")].head(1)
        if len(g):
            rows.append((kind.replace("_", " "), list(g.iloc[0]["image_ids"]), list(g.iloc[0]["labels"])))
    width = 220 + max((len(r[1]) for r in rows), default=1) * (tile + 4)
    canvas = Image.new("RGB", (width, max(1, len(rows)) * (tile + 22) + 4), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, (title, ids, labels) in enumerate(rows):
        y = 4 + i * (tile + 22)
        draw.text((4, y + tile // 2), title, fill="black", font=font)
        for j, (iid, lab) in enumerate(zip(ids, labels)):
            x = 220 + j * (tile + 4)
            canvas.paste(load_display_image(by_id.loc[iid], tile), (x, y))
            draw.text((x, y + tile + 2), str(lab)[:20], fill=(60, 60, 60), font=font)
    canvas.save(path)
    return path
