"""What the frozen base keeps for backward.

DyQLoRA-FA's adapters keep only ``X A`` (r numbers per token), but the frozen base layers
around them still keep activations for the gradient that flows through them to earlier
adapters. The measure here is exact (no approximation, no recomputation of matmuls):

- **SwiGLU** (``down(silu(gate(x)) * up(x))``, the MLP of Llama-family LMs): autograd keeps
  ``gate(x)``, ``silu(gate(x))`` and ``up(x)``; :class:`SwiGLU` keeps ``gate(x)`` and ``up(x)``
  and recomputes the element-wise ``silu`` in backward (1536 of 4608 floats per token and
  layer fewer for SmolLM2).
The allocator that gives freed activations back to the OS (the lowest peak) and the one that
keeps them for reuse (speed) are in :mod:`maemi_core.allocator`.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(torch.autograd.Function):
    """``silu(g) * u`` keeping only ``g`` and ``u`` for backward."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, u = ctx.saved_tensors
        sig = torch.sigmoid(g)
        silu = g * sig
        grad_g = grad * u * (sig * (1 + g * (1 - sig))) if ctx.needs_input_grad[0] else None
        grad_u = grad * silu if ctx.needs_input_grad[1] else None
        return grad_g, grad_u


def _lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def use_lean_swiglu(model: nn.Module) -> int:
    """Route every Llama-style MLP (``gate_proj``/``up_proj``/``down_proj`` with SiLU) through
    :class:`SwiGLU`; returns how many were changed. Outputs are unchanged."""
    n = 0
    for module in model.modules():
        act = getattr(module, "act_fn", None)
        is_silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"   # torch's or transformers'
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) and is_silu:
            module.forward = types.MethodType(_lean_mlp_forward, module)
            n += 1
    return n
