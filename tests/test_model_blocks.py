"""DyQLoRA-FA layers and gated cross-attention: the properties the paper's method relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from maemi_core.model.dyqlora_fa import (
    DyLoRAFALinear, apply_dyqlora_fa, frozen_linear, quantize_int8, resolve_matmul_dtype, sample_rank, set_active_rank,
    set_deploy_rank, set_matmul_dtype,
)
from maemi_core.model.gated_cross_attention import GatedCrossAttention, media_attention_mask


def test_int8_quantisation_is_close_and_compact():
    w = torch.randn(64, 128)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6


def test_untrained_adapter_is_the_quantised_base():
    base = nn.Linear(32, 16)
    layer = DyLoRAFALinear(base, 4, 8).eval()
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), x @ layer.base_weight().T + base.bias)


def test_only_b_trains_and_int8_weights_stay_bit_identical():
    model = nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))
    layer = DyLoRAFALinear(model[0], 2, 6, dropout=0.1)
    model[0] = layer
    for p in model[2].parameters():
        p.requires_grad_(False)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_B"]
    w_before, a_before = layer.weight_q.clone(), layer.lora_A.clone()
    opt = torch.optim.Adam([layer.lora_B], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 24), torch.randint(0, 4, (64,))
    losses = []
    for _ in range(30):
        set_active_rank(model, sample_rank(2, 6, gen))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert torch.equal(layer.weight_q, w_before) and torch.equal(layer.lora_A, a_before)
    assert layer.lora_B.abs().sum() > 0 and losses[-1] < losses[0]


def test_gradients_match_autograd_reference():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    layer = DyLoRAFALinear(base, 2, 8, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    set_active_rank(layer, 5)
    x = torch.randn(4, 20, requires_grad=True)
    layer(x).pow(2).sum().backward()
    gx, gb = x.grad.clone(), layer.lora_B.grad.clone()

    x2 = x.detach().clone().requires_grad_(True)
    b2 = layer.lora_B.detach().clone().requires_grad_(True)
    y2 = x2 @ layer.base_weight().T + layer.bias + (8 / 5) * (x2 @ layer.lora_A[:, :5]) @ b2[:5]
    y2.pow(2).sum().backward()
    torch.testing.assert_close(gx, x2.grad)
    torch.testing.assert_close(gb, b2.grad)
    assert gb[5:].abs().sum() == 0  # truncation: rows beyond the sampled rank get no gradient


def test_bf16_base_matmuls_stay_within_bf16_rounding_and_leave_the_adapter_and_serving_in_fp32():
    torch.manual_seed(0)
    layer = DyLoRAFALinear(nn.Linear(64, 48), 2, 8, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    set_active_rank(layer, 8)
    x = torch.randn(5, 64, requires_grad=True)
    gy = torch.randn(5, 48)

    def run(dtype):
        set_matmul_dtype(layer, dtype)
        x.grad, layer.lora_B.grad = None, None
        y = layer(x)
        y.backward(gy)
        return y.detach(), x.grad.clone(), layer.lora_B.grad.clone()

    y32, gx32, gb32 = run("float32")
    y16, gx16, gb16 = run("bfloat16")
    assert y16.dtype == gx16.dtype == torch.float32
    # bf16 rounds the activations on their way in and the product on its way out (fp32 accumulation):
    # about 2^-9 relative each, never more than 1% of the output.
    for got, ref in ((y16, y32), (gx16, gx32)):
        err = float((got - ref).norm() / ref.norm())
        assert 0 < err < 1e-2
    torch.testing.assert_close(gb16, gb32)            # the adapter's own matmuls stay fp32
    assert (y16 - y32).norm() / y32.norm() < 1e-2 and (y16 - y32).norm() > 0
    assert "_w_low" not in str(list(layer.state_dict()))   # the bf16 copy never reaches a checkpoint
    layer.eval()
    with torch.no_grad():                              # inference keeps the merged fp32 weight by default
        torch.testing.assert_close(layer(x), y32, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        resolve_matmul_dtype("float16")
    assert resolve_matmul_dtype("auto") in ("float32", "bfloat16")


def test_bf16_serving_computes_what_a_bf16_training_step_computes_and_training_numerics_undo_it():
    from maemi_core.model.dyqlora_fa import BF16_KERNEL, EXACT_KERNEL, set_inference_kernel, training_numerics

    torch.manual_seed(0)
    layer = DyLoRAFALinear(nn.Linear(64, 48), 2, 8, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 64)
    set_matmul_dtype(layer, "bfloat16")
    set_active_rank(layer, 8)
    step = layer.train()(x).detach()                  # a bf16 training step's forward at rank 8
    set_matmul_dtype(layer, "float32")
    exact_step = layer(x).detach()
    layer.eval()
    set_inference_kernel(layer, BF16_KERNEL)
    with torch.no_grad():
        served = layer(x)
        with training_numerics(layer):                # validation loss and the reference: fp32
            reference = layer(x)
        assert layer.serve_dtype == torch.bfloat16    # restored after the block
    assert torch.equal(served, step)                  # the same operations in the same order
    assert 0 < float((served - reference).norm() / reference.norm()) < 1e-2
    torch.testing.assert_close(reference, exact_step, rtol=1e-5, atol=1e-5)
    set_inference_kernel(layer, EXACT_KERNEL)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="weight_only_int8_bf16"):
        set_inference_kernel(layer, "float16")
    # An in-place change of the int8 weight (a reload into the same tensor) rebuilds the bf16 copy.
    set_inference_kernel(layer, BF16_KERNEL)
    with torch.no_grad():
        layer.weight_q.mul_(-1)
        flipped = layer(x)
    adapter = (layer.alpha / 8) * (x @ layer.lora_A) @ layer.lora_B
    torch.testing.assert_close(flipped - layer.bias - adapter, -(served - layer.bias - adapter), rtol=1e-5, atol=1e-5)


def test_frozen_linear_in_bf16_sends_the_gradient_to_its_input_only():
    torch.manual_seed(0)
    head = nn.Linear(32, 100, bias=False).requires_grad_(False)
    x = torch.randn(6, 32, requires_grad=True)
    y = frozen_linear(x, head, torch.bfloat16)
    y.sum().backward()
    ref_y, ref_g = x.detach() @ head.weight.T, torch.ones(6, 100) @ head.weight
    for got, ref in ((y.detach(), ref_y), (x.grad, ref_g)):
        assert got.dtype == torch.float32 and 0 < float((got - ref).norm() / ref.norm()) < 1e-2
    assert head.weight.grad is None
    with torch.no_grad():
        head.weight.mul_(2)                            # a new weight version: the bf16 copy is rebuilt
    torch.testing.assert_close(frozen_linear(x, head, torch.bfloat16), 2 * y.detach(), rtol=1e-2, atol=1e-2)


def test_dropout_mask_is_regenerated_not_stored():
    torch.manual_seed(1)
    layer = DyLoRAFALinear(nn.Linear(16, 8), 2, 4, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 16, requires_grad=True)
    torch.manual_seed(7)
    layer(x).sum().backward()
    g1 = x.grad.clone()
    # Same seed, explicit reference with the same mask: the gradient must agree.
    from maemi_core.model.dyqlora_fa import _dropout_mask

    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)))
    mask = _dropout_mask(x.shape, 0.5, seed, x.device)
    r = layer.current_rank()
    ref = layer.base_weight().sum(0) + (layer.alpha / r) * (layer.lora_B[:r].sum(1) @ layer.lora_A[:, :r].T) * mask
    torch.testing.assert_close(g1, ref)


def _saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    params = {t.data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params and t.untyped_storage().data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return total


@pytest.mark.parametrize("d_in", [64, 256])
def test_saved_activations_scale_with_rank_not_input_width(d_in):
    x = torch.randn(8, 32, d_in, requires_grad=True)
    sizes = {}
    for r in (4, 16):
        layer = DyLoRAFALinear(nn.Linear(d_in, 64), r, r, dropout=0.05).train()
        sizes[r] = _saved_activation_bytes(layer, x)
    tokens = 8 * 32
    assert sizes[4] == tokens * 4 * 4 and sizes[16] == tokens * 16 * 4   # exactly X A, fp32
    # Reference: peft-style LoRA keeps X itself (d_in wide).
    lora = nn.Sequential(nn.Dropout(0.05), nn.Linear(d_in, 16, bias=False), nn.Linear(16, 64, bias=False)).train()
    assert _saved_activation_bytes(lora, x) >= tokens * d_in * 4


def test_rank_sampling_covers_the_range_and_deploys_at_any_rank():
    gen = torch.Generator().manual_seed(0)
    seen = {sample_rank(4, 16, gen) for _ in range(500)}
    assert seen == set(range(4, 17))
    model = nn.Sequential(nn.Linear(8, 8))
    model.q_proj = nn.Linear(8, 8)
    assert apply_dyqlora_fa(model, targets=("q_proj",), r_min=4, r_max=8) == 1
    with torch.no_grad():
        model.q_proj.lora_B.normal_()
    model.eval()
    outs = {}
    for r in (4, 6, 8):
        set_deploy_rank(model, r)
        outs[r] = model.q_proj(torch.ones(1, 8))
    assert not torch.allclose(outs[4], outs[8])
    with pytest.raises(ValueError):
        set_deploy_rank(model, 9)


def test_closed_gates_are_the_identity_and_masking_follows_the_latest_image():
    block = GatedCrossAttention(dim=32, vis_dim=16, heads=2, head_dim=8)
    x = torch.randn(2, 7, 32)
    media = torch.randn(2, 2, 5, 16)
    positions = torch.tensor([[1, 4], [2, -1]])
    mask = media_attention_mask(positions, 7, 2)
    torch.testing.assert_close(block(x, media, mask), x)
    assert mask[0, 0].tolist() == [False, False]                     # before any image
    assert mask[0, 2].tolist() == [True, False] and mask[0, 5].tolist() == [False, True]
    assert mask[1, 6].tolist() == [True, False]                      # padding image never attended
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    out = block(x, media, mask)
    torch.testing.assert_close(out[:, 0], x[:, 0])                  # no image yet: unchanged
    assert not torch.allclose(out[0, 2:], x[0, 2:])
    media2 = media.clone()
    media2[0, 1] += 1.0                                               # change only image 2 of sample 0
    out2 = block(x, media2, mask)
    torch.testing.assert_close(out2[0, :4], out[0, :4])              # tokens before image 2 do not see it
    assert not torch.allclose(out2[0, 4:], out[0, 4:])


def test_inference_uses_the_int8_kernel_on_the_same_weights():
    torch.manual_seed(0)
    layer = DyLoRAFALinear(nn.Linear(96, 48), 4, 8).eval()
    assert not layer.fast_kernel                        # only where it was shown to agree
    layer.fast_kernel = True
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
        x = torch.randn(3, 5, 96)
        fast = layer(x)
        assert layer._packed_int8() is not None
        ref = x @ layer.base_weight().T + layer.bias + (layer.alpha / 8) * (x @ layer.lora_A) @ layer.lora_B
    # Only the activations are quantised on the fly (per tensor, 8 bits): a small relative error.
    assert (fast - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.equal(layer.weight_q, quantize_int8(layer.base_weight())[0])


def test_cached_visual_keys_values_give_the_same_decoding_output():
    torch.manual_seed(0)
    from maemi_core.model.gated_cross_attention import GatedCrossAttention, GatedXAttnDecoderLayer

    xa = GatedCrossAttention(16, 12, heads=2, head_dim=8, ff_mult=2)
    with torch.no_grad():
        xa.attn_gate.fill_(0.7)
        xa.ff_gate.fill_(0.3)
    layer = GatedXAttnDecoderLayer(xa, torch.nn.Identity())
    media = torch.randn(2, 3, 5, 12)
    mask = torch.ones(2, 4, 3, dtype=torch.bool)
    x = torch.randn(2, 4, 16)
    expected = xa(x, media, mask)
    layer.condition(media, mask)
    with torch.no_grad():
        first = layer(x)
        again = layer(x)          # second call reuses the projected keys/values
    assert layer._kv is not None
    assert torch.allclose(first, expected, atol=1e-6) and torch.allclose(again, expected, atol=1e-6)
    layer.condition(None, None)
    assert layer._kv is None


def test_lean_swiglu_matches_autograd_and_keeps_two_tensors():
    from maemi_core.model.frozen_activations import SwiGLU, use_lean_swiglu
    from maemi_core.model.language_model import load_language_model

    torch.manual_seed(0)
    g = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (g, u))
    lm, _ = load_language_model("tiny")
    ids = torch.randint(0, 1000, (2, 7))
    ref = lm(input_ids=ids).logits
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lm(input_ids=ids).logits.sum().backward()
    n_before = len(saved)
    assert use_lean_swiglu(lm) == len(lm.model.layers)
    assert torch.allclose(lm(input_ids=ids).logits, ref, atol=1e-5)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lm(input_ids=ids).logits.sum().backward()
    assert len(saved) == n_before - len(lm.model.layers)     # one tensor fewer per MLP


def test_a_step_of_rank_b_leaves_rows_past_b_and_their_adam_state_bit_identical():
    from maemi_core.model.dyqlora_fa import step_within_rank

    torch.manual_seed(0)
    model = nn.Sequential(DyLoRAFALinear(nn.Linear(16, 16), 2, 8, dropout=0.0), nn.ReLU(), nn.Linear(16, 3))
    for p in model[2].parameters():
        p.requires_grad_(False)
    layer = model[0]
    opt = torch.optim.Adam([layer.lora_B], lr=1e-2)
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))

    def step(rank):
        set_active_rank(model, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        step_within_rank(opt, model, rank)

    step(3)                                  # first step creates Adam's state at rank 3
    assert torch.count_nonzero(layer.lora_B[3:]) == 0
    assert torch.count_nonzero(opt.state[layer.lora_B]["exp_avg"][3:]) == 0
    step(8)                                  # full rank: every row has momentum now
    b_before = layer.lora_B.detach().clone()
    m_before = {k: v.clone() for k, v in opt.state[layer.lora_B].items() if k != "step"}
    step(2)
    assert torch.equal(layer.lora_B[2:], b_before[2:])                     # plain Adam would move them
    for k, v in m_before.items():
        assert torch.equal(opt.state[layer.lora_B][k][2:], v[2:])
    assert not torch.equal(layer.lora_B[:2], b_before[:2])
    # The same step with a plain optimizer.step() does move the rows past b (the bug it fixes).
    opt.zero_grad()
    set_active_rank(model, 2)
    nn.functional.cross_entropy(model(x), y).backward()
    before = layer.lora_B.detach().clone()
    opt.step()
    assert not torch.equal(layer.lora_B[2:], before[2:])


def test_training_numerics_turns_the_activation_quantising_kernel_off():
    from maemi_core.model.dyqlora_fa import training_numerics

    torch.manual_seed(0)
    layer = DyLoRAFALinear(nn.Linear(96, 48), 4, 8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    x = torch.randn(3, 5, 96)
    train_out = layer.train()(x).detach()             # the function training optimises
    layer.eval()
    layer.fast_kernel = True
    with torch.no_grad():
        fast = layer(x)
        with training_numerics(layer):
            exact = layer(x)
        assert layer.fast_kernel                          # restored after the block
    assert torch.allclose(exact, train_out, atol=1e-5)
    assert not torch.allclose(fast, train_out, atol=1e-5)
