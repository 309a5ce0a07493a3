"""Which int8 numerics a trained model serves with, decided by measurement.

Training runs every adapted layer as int8 weights dequantised to fp32 with fp32 activations
(:func:`~maemi_core.model.dyqlora_fa.training_numerics`). Inference can instead use PyTorch's
dynamic-quantisation kernel on the same int8 weights, which also rounds each layer's input to
8 bits: faster per token, but a different function. It serves only where it is shown to give
the same answers: on the validation records, greedy answers under both numerics are compared
token by token and the answer loss is computed under both. ``auto`` keeps the fast kernel when
the loss moves by at most ``max_loss_delta`` and at least ``min_exact_match`` of the greedy
answers are identical; otherwise the package serves the training numerics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from maemi_core.model.dyqlora_fa import EXACT_KERNEL as EXACT
from maemi_core.model.dyqlora_fa import FAST_KERNEL as FAST
from maemi_core.model.dyqlora_fa import training_numerics
MAX_LOSS_DELTA = 0.02
MIN_EXACT_MATCH = 0.9


@dataclass
class KernelAgreement:
    val_loss_training_numerics: float
    val_loss_fast_kernel: float
    exact_match: float            # fraction of greedy answers identical under both numerics
    token_agreement: float        # mean fraction of leading greedy tokens that agree
    prompts: int
    chosen: str

    @property
    def loss_delta(self) -> float:
        return self.val_loss_fast_kernel - self.val_loss_training_numerics

    def as_dict(self) -> dict:
        return asdict(self) | {"loss_delta": self.loss_delta}


def _common_prefix(a: list[int], b: list[int]) -> float:
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k / n


def measure_agreement(model, loss_fn, questions: list[str], images: list[list[np.ndarray]], max_new_tokens: int,
                      requested: str = "auto") -> KernelAgreement:
    """``loss_fn()`` returns the validation loss of ``model`` in its current numerics; the
    greedy answers to ``questions`` are decoded under both numerics. Leaves the model in the
    chosen numerics (``set_fast_kernel``)."""
    from maemi_core.model.dyqlora_fa import set_fast_kernel
    from maemi_core.model.generation import generate_answers

    if requested not in ("auto", FAST, EXACT):
        raise ValueError(f"model.inference_kernel must be auto, {FAST} or {EXACT}, got {requested!r}")
    set_fast_kernel(model, True)
    tok = model.tokenizer
    loss_fast = loss_fn(fast=True)
    loss_exact = loss_fn(fast=False)
    fast_ids, exact_ids = [], []
    if questions:
        fast = generate_answers(model, questions, images, max_new_tokens=max_new_tokens)
        with training_numerics(model):
            exact = generate_answers(model, questions, images, max_new_tokens=max_new_tokens)
        fast_ids = [tok(a, add_special_tokens=False)["input_ids"] for a in fast]
        exact_ids = [tok(a, add_special_tokens=False)["input_ids"] for a in exact]
    exact_match = float(np.mean([a == b for a, b in zip(fast_ids, exact_ids)])) if fast_ids else float("nan")
    token_agree = float(np.mean([_common_prefix(a, b) for a, b in zip(fast_ids, exact_ids)])) if fast_ids else float("nan")
    if requested == "auto":
        ok = abs(loss_fast - loss_exact) <= MAX_LOSS_DELTA and (not fast_ids or exact_match >= MIN_EXACT_MATCH)
        chosen = FAST if ok else EXACT
    else:
        chosen = requested
    set_fast_kernel(model, chosen == FAST)
    return KernelAgreement(loss_exact, loss_fast, exact_match, token_agree, len(fast_ids), chosen)
