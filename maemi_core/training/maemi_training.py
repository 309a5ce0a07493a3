"""Instruction tuning of the MAEMI model (paper A.8).

Next-token cross-entropy on the answer tokens only (the prompt is masked with -100), Adam at
1e-3 on the trainable parameters, micro-batches accumulated to the effective batch, one
DyQLoRA-FA rank sampled per optimizer step, validation at the full rank, the learning rate
halved after ``lr_patience`` epochs without a better validation loss, early stopping, a
checkpoint of the trainable tensors + optimizer after every epoch, and resume after a kill.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from maemi_core.data.transforms import load_resized
from maemi_core.model.dyqlora_fa import sample_rank, set_active_rank, step_within_rank, training_numerics
from maemi_core.model.frozen_activations import use_returning_allocator
from maemi_core.model.maemi_model import ENCODE_TOKEN, IMAGE_TOKEN, MaemiModel
from maemi_core.training.checkpoints import TrainingProgress, load_checkpoint
from maemi_core.training.data_parallel import SINGLE, World


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]
    image_ids: list[str]


def prompt_ids(tokenizer, human: str, plain: bool = False) -> list[int]:
    """The student prompt in the LM's chat template, closed by <Encode> (paper Figure 2).
    ``plain``: the prompt the LM as it ships can read, without the ``<image>`` markers and
    ``<Encode>`` it has never seen (the untuned ``base_lm`` row)."""
    if plain:
        text = " ".join(human.replace(IMAGE_TOKEN, " ").split())
        msgs = [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    msgs = [{"role": "user", "content": f"{human} {ENCODE_TOKEN}"}]
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


def build_examples(records: list[dict], tokenizer, max_len: int) -> tuple[list[Example], int]:
    """Tokenised examples with prompt-masked labels; returns (examples, number dropped as too long)."""
    out, dropped = [], 0
    eos = tokenizer.eos_token or ""
    for r in records:
        p = prompt_ids(tokenizer, r["conversations"][0]["value"])
        a = tokenizer(r["conversations"][-1]["value"] + eos, add_special_tokens=False)["input_ids"]
        if len(p) >= max_len - 8:
            dropped += 1
            continue
        a = a[: max_len - len(p)]
        out.append(Example(r["id"], p + a, [-100] * len(p) + a, list(r["image_ids"])))
    return out, dropped


class ImageStore:
    """Decoded model-input images by id, loaded once."""

    def __init__(self, paths: dict[str, tuple[str, int]], size: int):
        self.paths, self.size = paths, size
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_manifest(cls, manifest, size: int) -> "ImageStore":
        """Every manifest image by id: (path, data-bar rows to crop)."""
        return cls({iid: (path, int(crop or 0)) for iid, path, crop in
                    zip(manifest["image_id"], manifest["path"], manifest["crop_bottom"])}, size)

    def get(self, image_id: str) -> np.ndarray:
        if image_id not in self._cache:
            path, crop = self.paths[image_id]
            self._cache[image_id] = load_resized(path, self.size, crop)
        return self._cache[image_id]


class MediaCache:
    """Visual tokens per image id, computed once by the frozen encoder and reused by every epoch
    and micro-batch (the encoder is frozen and runs without augmentation, so this is exact).
    About 256 KB per image for EfficientNet-Lite0 (50 tokens x 1280). ``capacity``: keep at most
    this many images, the least recently used leave first (None: all)."""

    def __init__(self, model: MaemiModel, images: ImageStore, batch: int = 16, capacity: Optional[int] = None):
        self.model, self.images, self.batch, self.capacity = model, images, batch, capacity
        self._tokens: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0            # images the encoder has run on (a memo hit costs nothing)

    def ensure(self, image_ids) -> None:
        wanted = list(dict.fromkeys(image_ids))
        if self.capacity is not None and len(wanted) > self.capacity:
            raise ValueError(f"{len(wanted)} images at once exceed the visual-token cache's capacity {self.capacity}")
        for i in wanted:
            if i in self._tokens:
                self._tokens.move_to_end(i)
        todo = [i for i in wanted if i not in self._tokens]
        for s in range(0, len(todo), self.batch):
            chunk = todo[s: s + self.batch]
            imgs = torch.from_numpy(np.stack([self.images.get(i) for i in chunk]))[:, None]   # (n, 1, 3, S, S)
            imgs = imgs.to(self.model.new_token_embeddings.device)
            for iid, tok in zip(chunk, self.model.encode_images(imgs)[:, 0]):
                self._tokens[iid] = tok
            self.encoded += len(chunk)
        while self.capacity is not None and len(self._tokens) > self.capacity:
            self._tokens.popitem(last=False)

    def tokens(self, image_ids: list[str]) -> torch.Tensor:
        """(n, N, V) visual tokens of these images, in this order."""
        self.ensure(image_ids)
        return torch.stack([self._tokens[i] for i in image_ids])

    def stacked(self, image_ids: list[list[str]]) -> Optional[torch.Tensor]:
        """(B, M, N, V) visual tokens of B prompts' images, zero-padded to the most images any
        prompt has (M); None when no prompt has an image."""
        m = max((len(ids) for ids in image_ids), default=0)
        if m == 0:
            return None
        self.ensure(i for ids in image_ids for i in ids)
        n, v = next(iter(self._tokens.values())).shape
        out = torch.zeros((len(image_ids), m, n, v))
        for i, ids in enumerate(image_ids):
            for j, iid in enumerate(ids):
                out[i, j] = self._tokens[iid]
        return out

    def media(self, batch: list["Example"]) -> Optional[torch.Tensor]:
        return self.stacked([e.image_ids for e in batch])


def fit_media_statistics(model: MaemiModel, train: list["Example"], media: MediaCache, max_images: int = 512) -> int:
    """Fit the visual-token standardisation (``model.media_standardize``) on up to ``max_images``
    train images (a stable choice: the smallest image ids, i.e. content hashes). Returns how many."""
    ids = sorted({i for e in train for i in e.image_ids})[:max_images]
    if ids:
        model.fit_media_statistics(media.tokens(ids))
    return len(ids)


def length_buckets(order: list[int], lengths: list[int], micro_batch: int, gen: torch.Generator,
                   window: int = 16) -> list[list[int]]:
    """Micro-batches of similar length (less padding): the shuffled order is cut into windows of
    ``window`` micro-batches, sorted by length inside each window, cut into micro-batches, and
    the micro-batches shuffled again."""
    span = micro_batch * window
    micro = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s: s + span], key=lambda i: lengths[i])
        micro += [chunk[i: i + micro_batch] for i in range(0, len(chunk), micro_batch)]
    return [micro[i] for i in torch.randperm(len(micro), generator=gen).tolist()]


def collate(batch: list[Example], pad_id: int, images: ImageStore,
            media: Optional[MediaCache] = None) -> dict[str, torch.Tensor]:
    t = max(len(e.input_ids) for e in batch)
    m = max(len(e.image_ids) for e in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), t), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), t), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    if media is not None:
        return {"input_ids": ids, "labels": labels, "attention_mask": attn, "images_u8": None,
                "media": media.media(batch)}
    imgs = torch.zeros((len(batch), m, 3, images.size, images.size), dtype=torch.uint8)
    for i, e in enumerate(batch):
        for j, iid in enumerate(e.image_ids):
            imgs[i, j] = torch.from_numpy(images.get(iid))
    return {"input_ids": ids, "labels": labels, "attention_mask": attn, "images_u8": imgs}


@dataclass
class MaemiTrainingConfig:
    lr: float = 1e-3
    micro_batch: int = 4
    effective_batch: int = 32
    max_epochs: int = 50
    early_stopping_patience: int = 10
    lr_patience: int = 5
    lr_factor: float = 0.5
    seed: int = 0
    low_memory_allocator: bool = False   # mmap large tensors: peak RSS 0.59x of peft LoRA, ~40% slower steps
    gate_lr_multiplier: float = 1.0      # learning rate of the cross-attention gates / lr


@dataclass
class MaemiEpoch:
    epoch: int
    train_loss: float
    val_loss: float
    lr: float
    tokens_per_s: float
    steps: int


MaemiTrainingResult = TrainingProgress


def _to_model(batch: dict, model: MaemiModel) -> dict:
    device = model.new_token_embeddings.device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model: MaemiModel, examples: list[Example], pad_id: int, images: ImageStore, micro_batch: int,
                  exact: bool = True, media: Optional[MediaCache] = None, world: World = SINGLE) -> float:
    """Token-weighted mean answer loss at the deployment rank, with the training numerics
    (int8 weights, fp32 activations): what early stopping and the best epoch are chosen on.
    ``exact=False`` measures the layers' inference kernel instead (for the kernel decision)."""
    from contextlib import nullcontext

    model.eval()
    total, count = 0.0, 0
    with training_numerics(model) if exact else nullcontext():
        for i in list(range(0, len(examples), micro_batch))[world.rank::world.size]:   # this process's share
            batch = _to_model(collate(examples[i: i + micro_batch], pad_id, images, media), model)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    total, count = world.sum(total, count)
    return total / max(count, 1)


def make_optimizer(model: MaemiModel, cfg: MaemiTrainingConfig) -> torch.optim.Adam:
    """Adam on the trainable tensors; the cross-attention gates (scalars starting at 0, so that the
    untrained model is its LM) get ``gate_lr_multiplier`` times the learning rate. Adam moves a
    parameter by about the learning rate per step whatever its gradient, so at 1e-3 a gate needs
    hundreds of steps before tanh(gate) lets the image through; a CPU budget has tens."""
    gates = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(("attn_gate", "ff_gate"))]
    ids = {id(p) for p in gates}
    rest = [p for p in model.trainable_parameters() if id(p) not in ids]
    groups = [{"params": rest, "lr": cfg.lr}]
    if gates:
        groups.append({"params": gates, "lr": cfg.lr * cfg.gate_lr_multiplier})
    return torch.optim.Adam(groups, lr=cfg.lr)


def optimizer_step(model: MaemiModel, opt: torch.optim.Optimizer, micro_batches: list[list[Example]], pad_id: int,
                   images: ImageStore, media: Optional[MediaCache], gen: torch.Generator,
                   world: World = SINGLE) -> tuple[float, int]:
    """One optimizer step over ``micro_batches`` (gradient accumulation) at one sampled rank;
    returns (summed token loss, answer tokens). With several processes (``world``) each takes
    every ``world.size``-th micro-batch and the gradients are summed across them: the step is
    the same token-weighted mean over all its micro-batches, and the rank the same everywhere."""
    rank = world.broadcast_int(sample_rank(model.cfg.r_min, model.cfg.r_max, gen))
    set_active_rank(model, rank)
    n_tok = sum(sum(1 for lab in e.labels[1:] if lab != -100) for mb in micro_batches for e in mb)
    # LoRA dropout masks come from torch's global generator: seed it per micro-batch from the step's
    # shared generator, so micro-batch j gets the same masks whichever process runs it.
    dropout_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    opt.zero_grad(set_to_none=True)
    total, tokens = 0.0, 0
    for j, mb in enumerate(micro_batches):
        if j % world.size != world.rank:
            continue
        torch.manual_seed(dropout_seed + j)
        batch = _to_model(collate(mb, pad_id, images, media), model)
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**batch).loss
        (loss * n / max(n_tok, 1)).backward()     # token-weighted mean over the whole step
        total += float(loss.detach()) * n
        tokens += n
    world.all_reduce_grads(model.trainable_parameters())
    total, tokens = world.sum(total, tokens)
    step_within_rank(opt, model, rank)      # only B[:rank] moves, Adam state included
    set_active_rank(model, None)
    return total, int(tokens)


def train_maemi(model: MaemiModel, train: list[Example], val: list[Example], images: ImageStore,
                cfg: MaemiTrainingConfig, checkpoint_path: str | Path, fingerprint: str,
                on_epoch: Callable[[MaemiEpoch], None] = lambda e: None,
                stop_after_epoch: Optional[int] = None, world: World = SINGLE) -> MaemiTrainingResult:
    """Train in place; on return the model holds the best-validation trainable tensors. With
    ``world`` (one of several data-parallel processes) only process 0 writes the checkpoint."""
    if cfg.low_memory_allocator:
        use_returning_allocator()   # freed activations go back to the OS between steps
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    accum = max(1, cfg.effective_batch // cfg.micro_batch)
    media = MediaCache(model, images)       # the frozen encoder runs once per image, not per micro-batch
    lengths = [len(e.input_ids) for e in train]
    result = TrainingProgress()
    best = model.trainable_state_dict()
    start = 0
    state = load_checkpoint(checkpoint_path, fingerprint)
    if state is not None and not state.get("finished"):
        model.load_state_dict(state["weights"], strict=False)
        best = state["best"]
        start = result.restore(state, opt, sched, gen, MaemiEpoch)
    if model.cfg.media_standardize and not model.media_statistics_fitted:
        fit_media_statistics(model, train, media)   # before the first step; a checkpoint carries them

    for epoch in range(start + 1, cfg.max_epochs + 1):
        model.train()
        model.vision.eval()
        order = torch.randperm(len(train), generator=gen).tolist()
        micro = length_buckets(order, lengths, cfg.micro_batch, gen)
        total, tokens, steps, t0 = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(range(0, len(micro), accum), desc=f"maemi epoch {epoch}/{cfg.max_epochs}", unit="step",
                   leave=False, mininterval=2, disable=not world.main)
        for s in bar:
            loss_sum, n = optimizer_step(model, opt, [[train[i] for i in mb] for mb in micro[s: s + accum]],
                                         pad_id, images, media, gen, world)
            total += loss_sum
            tokens += n
            steps += 1
            bar.set_postfix(loss=f"{total / max(tokens, 1):.3f}",
                            tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        tps = tokens / max(time.perf_counter() - t0, 1e-9)
        val_loss = (evaluate_loss(model, val, pad_id, images, cfg.micro_batch, media=media, world=world) if val
                    else total / max(tokens, 1))
        sched.step(val_loss)
        rec = MaemiEpoch(epoch, total / max(tokens, 1), val_loss, opt.param_groups[0]["lr"], tps, steps)
        best, stop = result.end_epoch(rec, val_loss, cfg.early_stopping_patience, cfg.max_epochs,
                                      checkpoint_path if world.main else None, fingerprint, opt, sched, gen, best,
                                      model.trainable_state_dict)
        on_epoch(rec)
        if stop:
            break
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    model.load_state_dict(best, strict=False)
    return result
