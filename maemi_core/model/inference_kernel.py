"""Which int8 numerics a trained model serves with, decided by measurement.

The reference is the training numerics with fp32 matmuls: int8 weights dequantised to fp32,
fp32 activations, served as one merged fp32 weight per layer
(:func:`~maemi_core.model.dyqlora_fa.training_numerics`, ``weight_only_int8``). Two faster
numerics run on the same int8 weights but compute a slightly different function:

- ``dynamic_int8``: PyTorch's dynamic-quantisation kernel, which also rounds each layer's input
  to 8 bits;
- ``weight_only_int8_bf16``: the int8 weights multiplied in bf16 (exact values; the input and
  the product rounded to bf16, the row scale and the adapter in fp32), the forward of a training
  step with ``model.train_matmul_dtype`` bfloat16. Offered only where the machine multiplies
  bf16 natively (elsewhere it is emulated and slower than fp32).

Each serves only where it is shown to give the same answers: on the validation records, its
greedy answers are compared token by token with the reference's and its answer loss is
computed beside the reference's. ``auto`` keeps the first candidate (in the order above) whose
loss moves by at most ``max_loss_delta`` and whose greedy answers are identical on at least
``min_exact_match`` of the prompts; otherwise the package serves the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from maemi_core.model.dyqlora_fa import BF16_KERNEL as BF16
from maemi_core.model.dyqlora_fa import EXACT_KERNEL as EXACT
from maemi_core.model.dyqlora_fa import FAST_KERNEL as FAST
from maemi_core.model.dyqlora_fa import native_bf16, set_inference_kernel
MAX_LOSS_DELTA = 0.02
MIN_EXACT_MATCH = 0.9


@dataclass
class CandidateAgreement:
    """One candidate numerics against the reference on the validation records."""

    kernel: str
    val_loss: float
    loss_delta: float             # candidate - reference
    exact_match: float            # fraction of greedy answers identical to the reference's
    token_agreement: float        # mean fraction of leading greedy tokens that agree
    accepted: bool


@dataclass
class KernelAgreement:
    val_loss_training_numerics: float
    prompts: int
    chosen: str
    candidates: list[CandidateAgreement] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Flat: ``chosen``, ``prompts``, the reference loss and ``<kernel>_<measure>`` per candidate."""
        out = {"chosen": self.chosen, "prompts": self.prompts,
               "val_loss_training_numerics": self.val_loss_training_numerics}
        for c in self.candidates:
            out |= {f"{c.kernel}_{k}": v for k, v in asdict(c).items() if k != "kernel"}
        return out

    def summary(self) -> str:
        parts = [f"{c.kernel}: val loss {c.val_loss:.4f}, greedy answers identical on {c.exact_match:.0%} "
                 f"(leading tokens {c.token_agreement:.0%}), {'accepted' if c.accepted else 'refused'}"
                 for c in self.candidates]
        return (f"{self.chosen} (val loss {self.val_loss_training_numerics:.4f} in the training numerics; "
                f"{self.prompts} val prompts; " + "; ".join(parts or ["no candidate measured"]) + ")")


def _common_prefix(a: list[int], b: list[int]) -> float:
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k / n


def candidates_for(requested: str) -> list[str]:
    """The numerics ``auto`` tries, fastest first; a fixed choice is measured alone."""
    if requested == "auto":
        return [FAST] + ([BF16] if native_bf16() else [])
    if requested not in (FAST, EXACT, BF16):
        raise ValueError(f"model.inference_kernel must be auto, {FAST}, {BF16} or {EXACT}, got {requested!r}")
    return [] if requested == EXACT else [requested]


def measure_agreement(model, loss_fn: Callable[[], float], questions: list[str], images: list[list[np.ndarray]],
                      max_new_tokens: int, requested: str = "auto") -> KernelAgreement:
    """``loss_fn()`` returns the validation loss of ``model`` in its current numerics; the
    greedy answers to ``questions`` are decoded under the reference and every candidate. Leaves
    the model in the chosen numerics."""
    from maemi_core.model.generation import generate_answers

    candidates = candidates_for(requested)
    tok = model.tokenizer

    def greedy() -> list[list[int]]:
        if not questions:
            return []
        answers = generate_answers(model, questions, images, max_new_tokens=max_new_tokens)
        return [tok(a, add_special_tokens=False)["input_ids"] for a in answers]

    set_inference_kernel(model, EXACT)
    loss_ref, ref_ids = loss_fn(), greedy()
    measured, chosen = [], EXACT
    for kernel in candidates:
        set_inference_kernel(model, kernel)
        loss, ids = loss_fn(), greedy()
        exact_match = float(np.mean([a == b for a, b in zip(ids, ref_ids)])) if ids else float("nan")
        token_agree = float(np.mean([_common_prefix(a, b) for a, b in zip(ids, ref_ids)])) if ids else float("nan")
        ok = abs(loss - loss_ref) <= MAX_LOSS_DELTA and (not ids or exact_match >= MIN_EXACT_MATCH)
        accepted = ok if requested == "auto" else True
        measured.append(CandidateAgreement(kernel, loss, loss - loss_ref, exact_match, token_agree, accepted))
        if accepted:
            chosen = kernel
            break
    set_inference_kernel(model, chosen)
    return KernelAgreement(loss_ref, len(ref_ids), chosen, measured)
