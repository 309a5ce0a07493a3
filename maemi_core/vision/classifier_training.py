"""Supervised training of an image classifier (the paper's ViT, A.8).

Adam (lr 1e-3), batch 32, up to 50 epochs, class-weighted cross-entropy against
imbalance, learning rate halved after ``lr_patience`` epochs without a better validation
loss, early stopping after ``early_stopping_patience``; the weights of the best validation
epoch are kept. A checkpoint is written after every epoch and a killed run resumes from it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from maemi_core.config import ClassifierTrainingConfig
from maemi_core.data.transforms import augment, standardize
from maemi_core.checkpoints import TrainingProgress, load_checkpoint
from maemi_core.threads import subnormals_flushed


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    lr: float
    images_per_s: float


TrainingResult = TrainingProgress


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """n / (k * n_c): each class contributes equally to the loss; absent classes get 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def image_inputs(batch: np.ndarray) -> torch.Tensor:
    """uint8 images (B, 3, S, S) -> the standardised float batch the classifiers read."""
    return standardize(torch.from_numpy(np.asarray(batch)))


@torch.no_grad()
def predict_logits(model: nn.Module, images_u8: np.ndarray, batch_size: int = 64,
                   inputs: Callable[[np.ndarray], torch.Tensor] = image_inputs) -> torch.Tensor:
    model.eval()
    out = [model(inputs(images_u8[i: i + batch_size])) for i in range(0, len(images_u8), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


@subnormals_flushed()
def train_classifier(
    model: nn.Module,
    train_images: np.ndarray, train_labels: np.ndarray,
    val_images: np.ndarray, val_labels: np.ndarray,
    cfg: ClassifierTrainingConfig,
    checkpoint_path: str | Path,
    fingerprint: str,
    on_epoch: Callable[[EpochRecord], None] = lambda rec: None,
    stop_after_epoch: Optional[int] = None,
    inputs: Callable[[np.ndarray], torch.Tensor] = image_inputs,
    augment_batch: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = augment,
    max_minutes: Optional[float] = None,
    extra_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None,
) -> TrainingResult:
    """Train ``model`` in place; on return it holds the best-validation weights.

    ``stop_after_epoch`` ends the process-equivalent of a kill after that epoch's
    checkpoint (used by tests of resume). ``inputs`` turns a slice of the training arrays into
    the model's input batch (default: uint8 images, standardised) and ``augment_batch`` augments
    it when ``cfg.augment`` (default: the orientation-free image augmentation); a model trained
    on cached features passes its own. ``max_minutes`` ends training after the epoch that
    reaches it (wall time of this call: a resumed run starts a new clock); ``extra_loss(model)``
    is added to each step's loss (a model's own auxiliary objective).
    """
    num_classes = int(getattr(model, "num_classes", None) or model.head.out_features)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    weights = class_weights(train_labels, num_classes) if cfg.class_weighting else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    result = TrainingProgress()
    best_state = copy.deepcopy(model.state_dict())
    start_epoch = 0

    state = load_checkpoint(checkpoint_path, fingerprint)
    if state is not None and not state.get("finished"):
        model.load_state_dict(state["weights"])
        best_state = state["best"]
        start_epoch = result.restore(state, opt, sched, gen, EpochRecord)

    y_train = torch.from_numpy(train_labels.astype(np.int64))
    y_val = torch.from_numpy(val_labels.astype(np.int64))
    n = len(train_images)
    for epoch in range(start_epoch + 1, cfg.max_epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        total, seen, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(range(0, n, cfg.batch_size), desc=f"epoch {epoch}/{cfg.max_epochs}", unit="batch",
                   leave=False, mininterval=2)
        for start in bar:
            idx = order[start: start + cfg.batch_size]
            x = inputs(train_images[idx.numpy()])
            if cfg.augment:
                x = augment_batch(x, gen)
            loss = F.cross_entropy(model(x), y_train[idx], weight=weights, label_smoothing=cfg.label_smoothing)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        ips = seen / max(time.perf_counter() - t0, 1e-9)

        logits = predict_logits(model, val_images, inputs=inputs)
        val_loss = float(F.cross_entropy(logits, y_val, weight=weights)) if len(y_val) else total / seen
        val_acc = float((logits.argmax(1) == y_val).float().mean()) if len(y_val) else float("nan")
        sched.step(val_loss)
        rec = EpochRecord(epoch, total / seen, val_loss, val_acc, opt.param_groups[0]["lr"], ips)
        best_state, stop = result.end_epoch(rec, val_loss, cfg.early_stopping_patience, cfg.max_epochs,
                                            checkpoint_path, fingerprint, opt, sched, gen, best_state,
                                            lambda: copy.deepcopy(model.state_dict()))
        on_epoch(rec)
        if stop:
            break
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        if max_minutes is not None and (time.perf_counter() - t_start) / 60 >= max_minutes:
            break
    model.load_state_dict(best_state)
    return result
