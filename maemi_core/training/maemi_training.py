"""Instruction tuning of the MAEMI model (paper A.8).

Next-token cross-entropy on the answer tokens only (the prompt is masked with -100), Adam at
1e-3 on the trainable parameters, micro-batches accumulated to the effective batch, one
DyQLoRA-FA rank sampled per optimizer step, validation at the full rank; a budget of tokens,
minutes or epochs with a warmup-stable-decay learning rate (the recipe ``bench/learning_curve.py``
measures), checkpoints of the whole state during the run, and resume mid-budget after a kill.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from maemi_core.data.transforms import apply_view, load_resized, split_view
from maemi_core.model.dyqlora_fa import sample_rank, set_active_rank, step_within_rank, training_numerics
from maemi_core.allocator import use_returning_allocator
from maemi_core.model.maemi_model import MaemiModel
from maemi_core.model.prompts import prompt_ids
from maemi_core.checkpoints import load_checkpoint, save_checkpoint
from maemi_core.training.process_group import SINGLE, World
from maemi_core.threads import subnormals_flushed


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]
    image_ids: list[str]


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
    """Decoded model-input images by id, loaded once. An id may name a fixed view of an image
    (``<image id>|hflip``, :func:`maemi_core.data.transforms.view_id`): the image, mirrored."""

    def __init__(self, paths: dict[str, tuple[str, int]], size: int):
        self.paths, self.size = paths, size
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_manifest(cls, manifest, size: int) -> "ImageStore":
        """Every manifest image by id: (path, data-bar rows to crop)."""
        return cls({iid: (path, int(crop or 0)) for iid, path, crop in
                    zip(manifest["image_id"], manifest["path"], manifest["crop_bottom"])}, size)

    def get(self, image_id: str) -> np.ndarray:
        base, view = split_view(image_id)
        if view != "none":          # derived on demand, not kept: the encoder reads each view once
            return apply_view(self.get(base), view)
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
    train images (a stable choice: the smallest image ids, i.e. content hashes; the images as they
    are, not their training views). Returns how many."""
    ids = sorted({split_view(i)[0] for e in train for i in e.image_ids})[:max_images]
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
    """The training recipe (paper A.8 with a CPU-sized schedule). The budget is exactly one of
    ``budget_tokens`` / ``budget_minutes`` / ``budget_epochs`` (see ``maemi_core.config.TrainBudget``)."""
    lr: float = 1e-3
    micro_batch: int = 4
    effective_batch: int = 32
    budget_tokens: Optional[int] = None
    budget_minutes: Optional[float] = None
    budget_epochs: Optional[float] = None
    decay_fraction: float = 0.25         # linear cooldown to 0 over the last fraction of the budget
    warmup_steps: int = 0                # linear warmup over the first steps
    eval_points: int = 4                 # validation loss + checkpoint at this many even points of the budget
    checkpoint_minutes: float = 5.0      # and a checkpoint after this much training time (0: every step)
    seed: int = 0
    low_memory_allocator: bool = False   # mmap large tensors: peak RSS 0.59x of peft LoRA, ~40% slower steps
    gate_lr_multiplier: float = 1.0      # learning rate of the cross-attention gates / lr

    def __post_init__(self) -> None:
        given = [v for v in (self.budget_tokens, self.budget_minutes, self.budget_epochs) if v is not None]
        if len(given) != 1 or given[0] <= 0:
            raise ValueError("MaemiTrainingConfig needs exactly one positive budget: budget_tokens, budget_minutes "
                             "or budget_epochs")

    @classmethod
    def from_budget(cls, budget, **kw) -> "MaemiTrainingConfig":
        """From a profile's ``TrainBudget``."""
        return cls(budget_tokens=budget.tokens, budget_minutes=budget.minutes, budget_epochs=budget.epochs,
                   decay_fraction=budget.decay_fraction, warmup_steps=budget.warmup_steps,
                   eval_points=budget.eval_points, checkpoint_minutes=budget.checkpoint_minutes, **kw)

    @property
    def budget(self) -> tuple[str, float]:
        """(unit, amount) of the budget."""
        for unit, v in (("tokens", self.budget_tokens), ("minutes", self.budget_minutes), ("epochs", self.budget_epochs)):
            if v is not None:
                return unit, float(v)
        raise AssertionError("no budget")


@dataclass
class TrainingPoint:
    """One evaluation point of a run: where it stands in the budget and the losses there."""
    step: int
    epoch: int
    tokens: int
    minutes: float
    train_loss: float        # token-weighted mean answer loss since the previous point
    val_loss: float
    lr: float
    tokens_per_s: float


@dataclass
class MaemiTrainingResult:
    history: list = field(default_factory=list)      # TrainingPoint per evaluation point
    steps: int = 0
    tokens: int = 0
    minutes: float = 0.0
    resumed_from_step: int = 0
    final_val_loss: float = float("nan")


def lr_factor(progress: float, decay_fraction: float, step: int = 0, warmup_steps: int = 0) -> float:
    """Warmup-stable-decay: linear warmup over ``warmup_steps`` optimizer steps, then 1 until
    ``1 - decay_fraction`` of the budget is spent, then linear to 0 at the end of the budget."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay_fraction <= 0 or progress <= 1 - decay_fraction:
        return warm
    return warm * max(0.0, (1 - progress) / decay_fraction)


def _to_model(batch: dict, model: MaemiModel) -> dict:
    device = model.new_token_embeddings.device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model: MaemiModel, examples: list[Example], pad_id: int, images: ImageStore, micro_batch: int,
                  exact: bool = True, media: Optional[MediaCache] = None, world: World = SINGLE) -> float:
    """Token-weighted mean answer loss at the deployment rank, with the training numerics
    (int8 weights, fp32 activations, also when training multiplies in bf16): what early stopping and
    the best epoch are chosen on.
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


class _Run:
    """The resumable state of a budgeted run: position in the data and in the budget."""

    def __init__(self):
        self.step = self.tokens = self.epoch = 0
        self.seconds = 0.0
        self.queue: list = []              # the current epoch's remaining optimizer-step groups
        self.epoch_groups = 0              # groups the current epoch started with
        self.evaluated_at = 0.0            # budget spent (in its unit) at the last evaluation point
        self.loss_sum, self.loss_tokens, self.seg_tokens, self.seg_seconds = 0.0, 0, 0, 0.0
        self.history: list[dict] = []

    def spent(self, unit: str) -> float:
        """How much of a budget in ``unit`` the run has used."""
        if unit == "tokens":
            return float(self.tokens)
        if unit == "minutes":
            return self.seconds / 60
        return self.epoch - 1 + (self.epoch_groups - len(self.queue)) / max(self.epoch_groups, 1) if self.epoch else 0.0

    def progress(self, cfg: MaemiTrainingConfig) -> float:
        """Fraction of the budget spent."""
        unit, amount = cfg.budget
        return self.spent(unit) / amount

    def state(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@subnormals_flushed()
def train_maemi(model: MaemiModel, train: list[Example], val: list[Example], images: ImageStore,
                cfg: MaemiTrainingConfig, checkpoint_path: str | Path, fingerprint: str,
                on_point: Callable[[TrainingPoint], None] = lambda p: None,
                stop_after_steps: Optional[int] = None, world: World = SINGLE,
                points: Optional[list[float]] = None) -> MaemiTrainingResult:
    """The one training recipe of the MAEMI model (the ``maemi_model`` step, ``bench/learning_curve.py``
    and the data-parallel processes all call it). Trains in place until the budget is spent; on
    return the model holds the final weights.

    The train examples are streamed: shuffled each epoch (length-bucketed micro-batches, one
    DyQLoRA-FA rank sampled per optimizer step), as many epochs as the budget takes. The learning
    rate follows :func:`lr_factor` over the fraction of the budget spent. At ``eval_points`` even
    points of the budget the validation loss is measured, ``on_point`` is called and the whole
    state (trained tensors, Adam moments, the data order, random states, position in the budget)
    is checkpointed atomically, as it is after every ``checkpoint_minutes`` of training: a killed
    run started again with the same ``fingerprint`` continues from its last checkpoint and ends
    with the weights of an uninterrupted run (same threads). A finished run is not trained again;
    given a larger budget (and the same fingerprint) it continues. ``points``: the evaluation
    points in the budget's unit instead of even ones (the learning curve's budgets).
    ``stop_after_steps``: return after this many optimizer steps (checkpoint written), as a kill would.
    With ``world`` (one of several data-parallel processes) only process 0 writes the checkpoint."""
    if cfg.low_memory_allocator:
        use_returning_allocator()   # freed activations go back to the OS between steps
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    if not train:
        raise ValueError("no train examples: nothing to tune on (check model.train_tasks and the instruction set)")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    accum = max(1, cfg.effective_batch // cfg.micro_batch)
    media = MediaCache(model, images)       # the frozen encoder runs once per image, not per micro-batch
    lengths = [len(e.input_ids) for e in train]
    run = _Run()
    result = MaemiTrainingResult()
    state = load_checkpoint(checkpoint_path, fingerprint)
    if state is not None:
        model.load_state_dict(state["weights"], strict=False)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        run.__dict__.update(state["run"])
        result.resumed_from_step = run.step
    if model.cfg.media_standardize and not model.media_statistics_fitted:
        fit_media_statistics(model, train, media)   # before the first step; a checkpoint carries them

    def checkpoint(finished: bool = False) -> None:
        if world.main:
            save_checkpoint({"fingerprint": fingerprint, "weights": model.trainable_state_dict(),
                             "optimizer": opt.state_dict(), "generator": gen.get_state(),
                             "torch_rng": torch.get_rng_state(), "run": run.state(), "finished": finished},
                            checkpoint_path)

    unit, amount = cfg.budget
    marks = sorted(points) if points else [amount * k / cfg.eval_points for k in range(1, cfg.eval_points + 1)]

    def due() -> bool:
        spent = run.spent(unit)
        return any(run.evaluated_at < p <= spent + 1e-9 for p in marks)

    def evaluation_point() -> None:
        val_loss = (evaluate_loss(model, val, pad_id, images, cfg.micro_batch, media=media, world=world) if val
                    else run.loss_sum / max(run.loss_tokens, 1))
        point = TrainingPoint(run.step, run.epoch, run.tokens, run.seconds / 60, run.loss_sum / max(run.loss_tokens, 1),
                              val_loss, opt.param_groups[0]["lr"], run.seg_tokens / max(run.seg_seconds, 1e-9))
        run.history.append(asdict(point))
        run.loss_sum, run.loss_tokens, run.seg_tokens, run.seg_seconds = 0.0, 0, 0, 0.0
        run.evaluated_at = run.spent(unit)
        on_point(point)

    last_save = time.perf_counter()
    bar = tqdm(total=100, initial=min(100, int(100 * run.progress(cfg))), desc=f"maemi training ({amount:g} {unit})",
               unit="%", leave=False, mininterval=2, disable=not world.main)
    steps_here = 0
    while run.progress(cfg) < 1:
        model.train()
        model.vision.eval()
        if not run.queue:
            run.epoch += 1
            order = torch.randperm(len(train), generator=gen).tolist()
            micro = length_buckets(order, lengths, cfg.micro_batch, gen)
            run.queue = [micro[s: s + accum] for s in range(0, len(micro), accum)]
            run.epoch_groups = len(run.queue)
        group = run.queue.pop(0)
        factor = lr_factor(run.progress(cfg), cfg.decay_fraction, run.step, cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        t0 = time.perf_counter()
        loss_sum, n = optimizer_step(model, opt, [[train[i] for i in mb] for mb in group], pad_id, images, media, gen,
                                     world)
        dt = time.perf_counter() - t0
        if unit == "minutes":       # every process stops at the same step: process 0's clock decides
            dt = world.broadcast_int(int(dt * 1e6)) / 1e6
        seq_tokens = sum(len(train[i].input_ids) for mb in group for i in mb)
        run.step += 1
        run.tokens += seq_tokens
        run.seconds += dt
        run.loss_sum += loss_sum
        run.loss_tokens += n
        run.seg_tokens += seq_tokens
        run.seg_seconds += dt
        steps_here += 1
        bar.n = min(100, int(100 * run.progress(cfg)))
        bar.set_postfix(loss=f"{run.loss_sum / max(run.loss_tokens, 1):.3f}", lr=f"{opt.param_groups[0]['lr']:.2g}",
                        tok_s=f"{run.seg_tokens / max(run.seg_seconds, 1e-9):.0f}")
        done = run.progress(cfg) >= 1
        if due() and not done:
            evaluation_point()
            checkpoint()
            last_save = time.perf_counter()
        elif time.perf_counter() - last_save >= cfg.checkpoint_minutes * 60 and not done:
            checkpoint()
            last_save = time.perf_counter()
        if stop_after_steps is not None and steps_here >= stop_after_steps and not done:
            checkpoint()
            bar.close()
            break
    else:
        bar.close()
        if not run.history or run.history[-1]["step"] != run.step:
            evaluation_point()       # the final point: the model as it is returned
            checkpoint(finished=True)
    result.history = [TrainingPoint(**h) for h in run.history]
    result.steps, result.tokens, result.minutes = run.step, run.tokens, run.seconds / 60
    result.final_val_loss = result.history[-1].val_loss if result.history else float("nan")
    return result
