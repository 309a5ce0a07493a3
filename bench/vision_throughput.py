"""Classifier training and embedding throughput on this machine (images/s).

    .venv/bin/python bench/vision_throughput.py [--batches 10] [--threads N]

Measures, on real ELPV cells at 224 px: ViT training steps (forward + backward + Adam,
with and without augmentation), ViT embedding (no grad), EfficientNet-Lite0 embedding,
texture-feature extraction for the classical baseline, the probe options (multi-scale tiles of
a 1024x700 16-bit micrograph, the 8 dihedral views for test-time augmentation), fine-tuning the
last 3 EfficientNet-Lite0 blocks (the trunk pass that is cached once, then training steps on
the cached maps with their dihedral augmentation) and top-K
similarity search over 21,000 synthetic 64-d embeddings (the SEM dataset's size). The peak
resident memory of the process is printed after each row (it only grows).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from maemi_core.data.sources import list_elpv
from maemi_core.data.transforms import augment, build_image_array, standardize
from maemi_core.vision.efficientnet_finetune import (
    TunedTop, dihedral_maps, first_tuned_block, map_inputs, trunk_features,
)
from maemi_core.vision.efficientnet_lite0 import EfficientNetLite0Encoder
from maemi_core.vision.embeddings import embed_images
from maemi_core.vision.multiscale_views import dihedral_features, tile_features
from maemi_core.vision.similarity_sampling import few_shot_demonstrations
from maemi_core.vision.texture_baseline import texture_feature_matrix
from maemi_core.vision.vit import PaperViT, PaperViTConfig
from maemi_core.threads import use_threads


def timed(fn, n_images: int) -> tuple[float, float]:
    """(images/s, peak RSS of the process in GB after the call)."""
    t0 = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - t0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def large_micrographs(cands, n: int, folder: Path) -> list[str]:
    """``n`` real cells upscaled to 1024x700 and saved as 16-bit TIFFs (12-bit values), the size
    and depth of an SEM frame."""
    import tifffile
    from PIL import Image

    paths = []
    for i, c in enumerate(cands[:n]):
        with Image.open(c.path) as im:
            big = np.asarray(im.convert("L").resize((1024, 700), Image.Resampling.BICUBIC), dtype=np.uint16) * 16
        paths.append(str(folder / f"frame{i}.tif"))
        tifffile.imwrite(paths[-1], big)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    use_threads(args.threads)          # subnormals flushed before torch starts its threads
    n = args.batches * args.batch_size
    cands = list_elpv()[:n]
    images = build_image_array(pd.DataFrame({"path": [str(c.path) for c in cands], "crop_bottom": 0}), 224)
    labels = torch.randint(0, 4, (n,))
    print(f"torch {torch.__version__}, {args.threads} threads, {n} real ELPV images at 224 px")

    model = PaperViT(PaperViTConfig(num_classes=4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train(aug: bool):
        model.train()
        gen = torch.Generator().manual_seed(0)
        for i in range(0, n, args.batch_size):
            x = standardize(torch.from_numpy(images[i: i + args.batch_size]))
            if aug:
                x = augment(x, gen)
            loss = F.cross_entropy(model(x), labels[i: i + args.batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()

    train(False)  # warm-up
    rows = [
        ("vit train step, no augmentation", timed(lambda: train(False), n)),
        ("vit train step, with augmentation", timed(lambda: train(True), n)),
        ("vit embedding (no grad)", timed(lambda: embed_images(model.eval(), images, 64), n)),
    ]
    enc = EfficientNetLite0Encoder()

    @torch.no_grad()
    def plain_network():   # the network as loaded: batch norms unfolded, NCHW, batches of 64
        for i in range(0, n, 64):
            enc.net.extract_features(standardize(torch.from_numpy(images[i: i + 64])))

    rows.append(("efficientnet_lite0 embedding, plain network", timed(plain_network, n)))
    rows.append(("efficientnet_lite0 embedding (no grad)", timed(lambda: embed_images(enc, images, 64), n)))
    rows.append(("texture features (LBP/GLCM/HOG, 2 jobs)", timed(lambda: texture_feature_matrix(images[:128]), 128)))
    rows.append(("efficientnet_lite0 8 dihedral views (tta)", timed(lambda: dihedral_features(enc, images[:64]), 64)))
    first = first_tuned_block(enc, 3)
    maps = {}
    rows.append(("efficientnet_lite0 trunk maps (fine-tuning, once)",
                 timed(lambda: maps.setdefault("m", trunk_features(enc, images, first)), n)))
    top = TunedTop(enc, first, 4)
    top_opt = torch.optim.Adam(top.parameters(), lr=3e-4)

    def finetune_epoch():
        top.train()
        gen = torch.Generator().manual_seed(0)
        for i in range(0, n, args.batch_size):
            x = dihedral_maps(map_inputs(maps["m"][i: i + args.batch_size]), gen)
            loss = F.cross_entropy(top(x), labels[i: i + args.batch_size])
            top_opt.zero_grad()
            loss.backward()
            top_opt.step()

    finetune_epoch()   # warm-up
    rows.append(("efficientnet_lite0 fine-tuning step, last 3 blocks", timed(finetune_epoch, n)))
    with tempfile.TemporaryDirectory() as tmp:
        frames = large_micrographs(cands, 16, Path(tmp))
        whole = np.zeros((len(frames), 1280), np.float32)
        for scales in ([2], [2, 4]):
            rows.append((f"tiles of 1024x700 16-bit frames, scales {scales}",
                         timed(lambda: tile_features(enc, frames, [0] * len(frames), scales, whole), len(frames))))

    m = 21_000
    emb = np.random.default_rng(0).normal(size=(m, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = pd.DataFrame({"image_id": [f"i{i}" for i in range(m)], "label": "x",
                          "split": np.where(np.arange(m) % 10 < 7, "train", "test")})
    rows.append(("top-4 similarity search, 21k x 14.7k train", timed(lambda: few_shot_demonstrations(index, emb, 4), m)))

    width = max(len(r[0]) for r in rows)
    for name, (ips, rss) in rows:
        print(f"{name:<{width}}  {ips:10.1f} images/s   peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
