"""Vision self-supervised rows of the paper's Table 7: pretrain an encoder on the training images
without their labels, then read it with a linear probe (``baseline_training.linear_probe``).

``lightly`` implements these methods, but its import needs torchvision, which does not load
beside the project's CPU torch; the objectives are short, so they are written here from their
papers, with the losses PyGCL publishes (``GCL.losses``) wherever they are the same function:

- SimCLR (Chen et al., 2020): two augmented views, a projection head, InfoNCE between the views
  (``GCL.losses.InfoNCE``, temperature 0.2; every other image of the batch is a negative).
- Barlow Twins (Zbontar et al., 2021): the cross-correlation of the two views' standardised
  projections pushed to the identity (``GCL.losses.BarlowTwins``).
- BYOL (Grill et al., 2020): an online encoder + projector + predictor regresses a momentum
  (EMA, 0.99) target's projection of the other view: ``2 - 2 cos`` via ``GCL.losses.BootstrapLatent``.
- MoCo v2 (He et al., 2020; Chen et al., 2020): a momentum key encoder and a queue of past keys
  as negatives (InfoNCE, temperature 0.2).
- SimSiam (Chen & He, 2021): predictor and stop-gradient without a momentum encoder (negative
  cosine, ``BootstrapLatent``).
- DINO (Caron et al., 2021): self-distillation of a ViT (vit-pytorch's ``ViT``): a momentum
  teacher's centred, sharpened (0.04) softmax over 256 prototypes is the student's (0.1) target.
- SMIM / SimMIM (Xie et al., 2021): vit-pytorch's ``SimMIM`` (masked patches, pixel regression).

The views are the project's own orientation-free augmentation (``data.transforms.augment``: random
resized crops, dihedral transforms, contrast jitter). Encoders: the zoo's ResNet (transformers)
for the first five, the zoo's ViT for DINO and SimMIM.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maemi_core.data.transforms import augment
from maemi_core.vision.paper_baselines.library_modules import import_submodule
from maemi_core.threads import subnormals_flushed

RESNET_METHODS = ("Barlowtwins", "SimCLR", "byol", "moco", "simsiam")


class Encoder(nn.Module):
    """images -> (B, dim) features."""

    def __init__(self, kind: str, image_size: int, size: str):
        super().__init__()
        self.kind = kind
        if kind == "resnet":
            from transformers import ResNetConfig, ResNetModel

            cfg = ResNetConfig(embedding_size=32 if size != "tiny" else 8,
                               hidden_sizes=[32, 64, 128, 256] if size != "tiny" else [8, 16],
                               depths=[2, 2, 2, 2] if size != "tiny" else [1, 1], layer_type="basic")
            self.net = ResNetModel(cfg)
            self.dim = cfg.hidden_sizes[-1]
        else:
            from maemi_core.vision.paper_baselines.zoo import _vit_kw

            kw = _vit_kw(size)
            p = 8 if image_size % 8 == 0 else 4
            self.net = import_submodule("vit_pytorch", "vit").ViT(image_size=image_size, patch_size=p, num_classes=1, **kw)
            self.net.mlp_head = nn.Identity()       # the CLS token's features
            self.dim = kw["dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "resnet":
            return self.net(pixel_values=x).pooler_output.flatten(1)
        return self.net(x)


def _mlp(din: int, hidden: int, dout: int, last_bn: bool = False) -> nn.Sequential:
    layers = [nn.Linear(din, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dout)]
    return nn.Sequential(*layers, *([nn.BatchNorm1d(dout, affine=False)] if last_bn else []))


@torch.no_grad()
def _ema(target: nn.Module, online: nn.Module, m: float) -> None:
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(m).add_(o.detach(), alpha=1 - m)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


class _BatchedPositions(nn.Module):
    """vit-pytorch's ``SimMIM`` reads ``encoder.pos_embedding`` as (1, tokens, dim), as its ``ViT``
    once stored it; the current ``ViT`` stores (tokens, dim). The same parameter, seen batched."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.to_patch_embedding, self.transformer = vit.to_patch_embedding, vit.transformer

    @property
    def pos_embedding(self) -> torch.Tensor:
        return self.vit.pos_embedding[None]


class Objective(nn.Module):
    """One self-supervised method: ``loss(view1, view2)`` and the encoder it trains."""

    def __init__(self, method: str, image_size: int, size: str):
        super().__init__()
        self.method = method
        losses = import_submodule("GCL", "losses")
        self.encoder = Encoder("vit" if method in ("Dino", "SMIM") else "resnet", image_size, size)
        d, hidden, out = self.encoder.dim, 256 if size != "tiny" else 32, 128 if size != "tiny" else 16
        if method == "SMIM":
            self.simmim = import_submodule("vit_pytorch", "simmim").SimMIM(encoder=_BatchedPositions(self.encoder.net),
                                                                              masking_ratio=0.5)
            return
        self.projector = _mlp(d, hidden, out, last_bn=method == "Barlowtwins")
        if method in ("byol", "simsiam"):
            self.predictor = _mlp(out, hidden, out)
        if method in ("byol", "moco", "Dino"):
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        if method == "moco":
            self.register_buffer("queue", F.normalize(torch.randn(1024 if size != "tiny" else 64, out), dim=1))
            self.queue_ptr = 0
        if method == "Dino":
            self.register_buffer("center", torch.zeros(1, out))
        self.infonce = losses.InfoNCE(tau=0.2)
        self.barlow = losses.BarlowTwins()
        self.bootstrap = losses.BootstrapLatent()

    def _pairs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.infonce(anchor=a, sample=b, pos_mask=torch.eye(len(a)), neg_mask=1 - torch.eye(len(a)))

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        m = self.method
        if m == "SMIM":
            return self.simmim(torch.cat([x1, x2]))
        z1, z2 = self.projector(self.encoder(x1)), self.projector(self.encoder(x2))
        if m == "SimCLR":
            return 0.5 * (self._pairs(z1, z2) + self._pairs(z2, z1))
        if m == "Barlowtwins":
            return self.barlow(anchor=z1, sample=z2)
        eye = torch.eye(len(x1))
        if m == "simsiam":
            p1, p2 = self.predictor(z1), self.predictor(z2)
            return -0.5 * (self.bootstrap(anchor=p1, sample=z2.detach(), pos_mask=eye)
                           + self.bootstrap(anchor=p2, sample=z1.detach(), pos_mask=eye))
        with torch.no_grad():
            t1 = self.target_projector(self.target_encoder(x1))
            t2 = self.target_projector(self.target_encoder(x2))
        if m == "byol":
            p1, p2 = self.predictor(z1), self.predictor(z2)
            return 2 - (self.bootstrap(anchor=p1, sample=t2, pos_mask=eye) + self.bootstrap(anchor=p2, sample=t1, pos_mask=eye))
        if m == "moco":
            q, k = F.normalize(z1, dim=1), F.normalize(t2, dim=1)
            sample = torch.cat([k, self.queue.clone()])
            pos = torch.cat([eye, torch.zeros(len(q), len(self.queue))], 1)
            loss = self.infonce(anchor=q, sample=sample, pos_mask=pos, neg_mask=1 - pos)
            with torch.no_grad():                       # enqueue this batch's keys (a ring buffer)
                n = len(k)
                idx = (torch.arange(n) + self.queue_ptr) % len(self.queue)
                self.queue[idx] = k
                self.queue_ptr = int((self.queue_ptr + n) % len(self.queue))
            return loss
        if m == "Dino":
            def ce(student, teacher):
                t = F.softmax((teacher - self.center) / 0.04, dim=1)
                return -(t * F.log_softmax(student / 0.1, dim=1)).sum(1).mean()

            loss = 0.5 * (ce(z1, t2) + ce(z2, t1))
            with torch.no_grad():
                self.center.mul_(0.9).add_(torch.cat([t1, t2]).mean(0, keepdim=True), alpha=0.1)
            return loss
        raise KeyError(f"unknown self-supervised method {m!r}")

    def after_step(self) -> None:
        if hasattr(self, "target_encoder"):
            m = 0.99 if self.method != "Dino" else 0.996
            _ema(self.target_encoder, self.encoder, m)
            _ema(self.target_projector, self.projector, m)


@subnormals_flushed()
def pretrain(method: str, images: torch.Tensor, image_size: int, size: str, epochs: int, minutes: float,
             batch_size: int, lr: float, seed: int, log: Callable[[str], None] = lambda m: None,
             inputs: Optional[Callable[[np.ndarray], torch.Tensor]] = None) -> tuple[nn.Module, list[dict]]:
    """Pretrain ``method`` on ``images`` (uint8, (N, 3, S, S)) without labels for ``epochs`` or
    ``minutes``, whichever ends first; returns the encoder (eval mode) and the loss history."""
    from maemi_core.vision.classifier_training import image_inputs

    inputs = inputs or image_inputs
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    objective = Objective(method, image_size, size)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    history, t0, n = [], time.perf_counter(), len(images)
    for epoch in range(1, epochs + 1):
        objective.train()
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for start in range(0, n - 1, batch_size):
            idx = order[start: start + batch_size]
            if len(idx) < 2:                        # batch norm and contrast need two images
                continue
            x = inputs(images[idx.numpy()])
            loss = objective.loss(augment(x, gen), augment(x, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            objective.after_step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "minutes": (time.perf_counter() - t0) / 60})
        log(f"{method} pretraining epoch {epoch}: loss {total / max(seen, 1):.4f}")
        if (time.perf_counter() - t0) / 60 >= minutes:
            break
    return objective.encoder.eval(), history
