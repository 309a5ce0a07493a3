"""The serving numerics decision (maemi_core/model/inference_kernel.py): a faster numerics
serves only where its validation loss and greedy answers agree with the training numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maemi_core.model import generation, inference_kernel
from maemi_core.model.dyqlora_fa import BF16_KERNEL, EXACT_KERNEL, FAST_KERNEL, dylora_layers
from tests.test_maemi_model import tiny_model


def _numerics(model) -> set[str]:
    return {FAST_KERNEL if m.fast_kernel else BF16_KERNEL if m.serve_dtype == torch.bfloat16 else EXACT_KERNEL
            for m in dylora_layers(model)}


def _loss_by_numerics(model, losses: dict[str, float]):
    def loss() -> float:
        (now,) = _numerics(model)
        return losses[now]
    return loss


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_takes_the_first_candidate_that_agrees_and_leaves_the_model_in_it(monkeypatch, bf16):
    monkeypatch.setattr(inference_kernel, "native_bf16", lambda: bf16)
    model = tiny_model().eval()
    # the int8-activation kernel moves the loss by 0.5: refused; bf16 by 0.01: within 0.02
    losses = {EXACT_KERNEL: 1.00, FAST_KERNEL: 1.50, BF16_KERNEL: 1.01}
    got = inference_kernel.measure_agreement(model, _loss_by_numerics(model, losses), [], [], 4)
    assert [c.kernel for c in got.candidates] == [FAST_KERNEL] + ([BF16_KERNEL] if bf16 else [])
    assert not got.candidates[0].accepted and got.candidates[0].loss_delta == pytest.approx(0.5)
    assert got.chosen == (BF16_KERNEL if bf16 else EXACT_KERNEL) and _numerics(model) == {got.chosen}
    flat = got.as_dict()
    assert flat["chosen"] == got.chosen and flat["dynamic_int8_accepted"] is False
    assert flat["val_loss_training_numerics"] == 1.0 and ("weight_only_int8_bf16_val_loss" in flat) == bf16


def test_a_different_greedy_answer_refuses_a_candidate_whose_loss_agrees(monkeypatch):
    monkeypatch.setattr(inference_kernel, "native_bf16", lambda: True)
    model = tiny_model().eval()
    seen = []

    def answers(m, questions, images, max_new_tokens):
        seen.append(_numerics(m))
        # the second prompt's answer differs under bf16 in its last word
        return ["a crack", "no defect" if _numerics(m) != {BF16_KERNEL} else "no crack"]

    monkeypatch.setattr(generation, "generate_answers", answers)
    losses = {EXACT_KERNEL: 1.0, FAST_KERNEL: 1.0, BF16_KERNEL: 1.0}
    img = np.zeros((3, 224, 224), np.uint8)
    got = inference_kernel.measure_agreement(model, _loss_by_numerics(model, losses), ["<image>\nq1", "<image>\nq2"],
                                             [[img], [img]], 4)
    assert seen == [{EXACT_KERNEL}, {FAST_KERNEL}]     # the first candidate agreed: nothing else measured
    assert got.chosen == FAST_KERNEL and got.candidates[0].exact_match == 1.0

    seen.clear()
    losses[FAST_KERNEL] = 2.0
    got = inference_kernel.measure_agreement(model, _loss_by_numerics(model, losses), ["<image>\nq1", "<image>\nq2"],
                                             [[img], [img]], 4)
    bf16 = got.candidates[1]
    assert bf16.kernel == BF16_KERNEL and bf16.exact_match == 0.5 and 0.5 < bf16.token_agreement < 1
    assert not bf16.accepted and got.chosen == EXACT_KERNEL and _numerics(model) == {EXACT_KERNEL}
    assert "refused" in got.summary() and "weight_only_int8_bf16" in got.summary()


def test_a_fixed_choice_is_measured_and_served_even_where_it_disagrees(monkeypatch):
    model = tiny_model().eval()
    losses = {EXACT_KERNEL: 1.0, FAST_KERNEL: 1.0, BF16_KERNEL: 9.0}
    got = inference_kernel.measure_agreement(model, _loss_by_numerics(model, losses), [], [], 4, requested=BF16_KERNEL)
    assert got.chosen == BF16_KERNEL and got.candidates[0].loss_delta == pytest.approx(8.0)
    got = inference_kernel.measure_agreement(model, _loss_by_numerics(model, losses), [], [], 4,
                                             requested=EXACT_KERNEL)
    assert got.chosen == EXACT_KERNEL and got.candidates == []
    with pytest.raises(ValueError, match="weight_only_int8_bf16"):
        inference_kernel.measure_agreement(model, _loss_by_numerics(model, losses), [], [], 4, requested="fp16")
