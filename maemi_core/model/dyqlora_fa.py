"""DyQLoRA-FA (paper A.1): dynamic-rank LoRA with frozen A on an 8-bit frozen base.

    y = x W0^T + (alpha / b) * dropout(x) A[:, :b] B[:b, :]

- ``W0`` (d_out x d_in) is stored as int8 with one fp32 scale per output row (symmetric
  absmax), frozen: the base costs 1 byte per weight instead of 4.
- ``A`` (d_in x r_max) is drawn once from N(0, 1/d_in) and frozen; ``B`` (r_max x d_out)
  starts at zero and is the only trained tensor (LoRA-FA).
- At every training step a rank ``b`` in [r_min, r_max] is sampled (:func:`sample_rank`) and
  the adapter runs truncated to its leading ``b`` columns of A / rows of B, with scaling
  alpha / b (rank normalisation), so the trained adapter can be deployed at any rank.
- ``matmul_dtype`` bfloat16 (training only): the frozen base's two matmuls per layer (``x W0^T``
  forward, ``g W0`` backward) run in bf16 on the int8 values, which bf16 holds exactly, with
  the per-row scale applied after: the activations (gradients) are rounded to bf16 on their
  way in and the product (accumulated in fp32) on its way out, about 2^-9 relative each;
  everything else (adapter, norms, attention, residual stream, optimizer) stays fp32.
  On CPUs with native bf16 dot products (AVX512-BF16, AMX) that
  matmul runs ~4x faster than fp32 (``bench/training_efficiency.py``).
- The custom autograd function keeps only the r-dimensional ``dropout(x) A`` for backward.
  Neither ``x`` nor the dropout mask is stored: the mask is regenerated from its seed, and
  the gradient with respect to ``x`` needs only the weights. Stock LoRA keeps ``x``
  (d_in wide) in every adapted layer; that is the activation memory LoRA-FA removes.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
import torch.nn as nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``(w_int8 (out, in), scale (out,))`` with w ~ w_int8 * scale."""
    scale = weight.detach().abs().amax(dim=1).clamp_min(1e-8) / 127.0
    q = torch.clamp(torch.round(weight.detach() / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale.float()


_SCRATCH = threading.local()   # per thread: concurrent requests in one server never share a buffer
_CALL = threading.local()      # per thread: the deployment rank of the request being answered
_MERGED_LOCK = threading.Lock()  # guards every layer's cache of merged weights (concurrent requests)
DEFAULT_MERGED_CACHE = 2       # merged weights kept per layer (ranks x dtypes), least recently used dropped


@contextmanager
def call_rank(rank: Optional[int]):
    """Inside the block, on this thread only, every adapter runs at ``rank`` (None: each
    layer's deployment rank). Concurrent requests in one process each keep their own rank."""
    before = getattr(_CALL, "rank", None)
    _CALL.rank = rank
    try:
        yield
    finally:
        _CALL.rank = before


def _scratch(slot: str, shape: torch.Size, dtype: torch.dtype, device) -> torch.Tensor:
    """A reusable buffer per (slot, dtype, device), grown to the largest shape asked for. The
    transient dequantised weight and dropout mask of every layer live here instead of being
    allocated (and, under a returning allocator, mapped and unmapped) at every call. Only for
    values consumed before the next call of the same slot."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (slot, dtype, str(device))
    n = math.prod(shape)
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def _dequantized(w_q: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = _scratch("weight", w_q.shape, dtype, w_q.device)
    torch.mul(w_q, w_scale[:, None].to(dtype), out=w)
    return w


def native_bf16() -> bool:
    """Whether this machine multiplies bf16 natively: a CUDA device that supports it, or a CPU
    whose flags list AVX512-BF16 or AMX-BF16 (elsewhere bf16 matmuls are emulated, often slower
    than fp32). Linux CPU flags only; False where they cannot be read."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_matmul_dtype(name: str) -> str:
    """``auto`` -> ``bfloat16`` where :func:`native_bf16`, else ``float32``; other names as given."""
    if name == "auto":
        return "bfloat16" if native_bf16() else "float32"
    if name not in MATMUL_DTYPES:
        raise ValueError(f"matmul dtype {name!r}: use auto, float32 or bfloat16")
    return name


def _dropout_mask(shape: torch.Size, p: float, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    mask = _scratch("dropout", shape, torch.float32, device)
    mask.uniform_(generator=gen)
    return mask.ge_(p).div_(1.0 - p)


def _low_mm(x: torch.Tensor, w_low: torch.Tensor) -> torch.Tensor:
    """``x W^T`` with ``W`` held in a low-precision dtype (bf16): ``x`` rounded to it on the way
    in, the product (accumulated in fp32 by the kernel) rounded to it on the way out (torch's CPU
    ``mm`` has no fp32-output bf16 overload), returned in ``x``'s dtype."""
    return (x.to(w_low.dtype) @ w_low.T).to(x.dtype)


def _adapted(x, w_q, w_scale, bias, xa, b, scaling: float, w_low=None) -> torch.Tensor:
    """``x W0^T + bias + scaling * xa B``, the layer's output from its input and the adapter's
    r-dimensional ``xa``; the training step's forward and bf16 serving both compute it here.
    ``w_low`` (``W0``'s int8 values in bf16): the base matmul in bf16, the row scale after;
    else on the dequantised fp32 ``W0``. Every step after the base matmul works in place on its
    output (one (tokens, d_out) tensor written, not four)."""
    if w_low is not None:
        y = _low_mm(x, w_low).mul_(w_scale.to(x.dtype))
    else:
        y = x @ _dequantized(w_q, w_scale, x.dtype).T                # transient dequantised W0
    if bias is not None:
        y.add_(bias)
    y.view(-1, y.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]), b, alpha=scaling)
    return y


class _DyQLoRAFAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_q, w_scale, bias, a, b, scaling: float, p: float, seed: int, w_low=None):
        # x (..., d_in); w_q (d_out, d_in) int8; a (d_in, r); b (r, d_out); w_low: w_q in bf16 or None
        xd = x * _dropout_mask(x.shape, p, seed, x.device) if p > 0 else x
        xa = xd @ a                                                      # (..., r): all that is kept
        y = _adapted(x, w_q, w_scale, bias, xa, b, scaling, w_low)
        ctx.save_for_backward(xa, w_q, w_scale, a, b)
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, p, seed, x.shape
        ctx.w_low = w_low
        return y

    @staticmethod
    def backward(ctx, gy):
        xa, w_q, w_scale, a, b = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[5]:
            grad_b = ctx.scaling * xa.reshape(-1, xa.shape[-1]).T @ gy.reshape(-1, gy.shape[-1])   # (r, d_out)
        if ctx.needs_input_grad[0]:
            g_adapter = ctx.scaling * (gy @ b.T) @ a.T                                          # (..., d_in)
            if ctx.p > 0:
                g_adapter = g_adapter * _dropout_mask(ctx.x_shape, ctx.p, ctx.seed, gy.device)
            if ctx.w_low is not None:
                base = ((gy * w_scale.to(gy.dtype)).to(ctx.w_low.dtype) @ ctx.w_low).to(gy.dtype)
            else:
                base = gy @ _dequantized(w_q, w_scale, gy.dtype)
            grad_x = base + g_adapter
        return grad_x, None, None, None, None, grad_b, None, None, None, None


class _FrozenLowPrecisionLinear(torch.autograd.Function):
    """``x W^T`` for a frozen ``W`` held in bf16: input and output in ``x``'s dtype, the gradient
    flows to ``x`` only. Nothing but the weight is kept for backward."""

    @staticmethod
    def forward(ctx, x, w_low):
        ctx.save_for_backward(w_low)
        return _low_mm(x, w_low)

    @staticmethod
    def backward(ctx, gy):
        (w_low,) = ctx.saved_tensors
        return (gy.to(w_low.dtype) @ w_low).to(gy.dtype), None


def _low_copy(owner: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``, kept on ``owner`` outside its state dict and rebuilt when the
    weight is replaced or written in place (its storage or version counter moves) or another
    dtype is asked for."""
    key = (weight.data_ptr(), weight._version, dtype)
    cached = owner.__dict__.get("_w_low")
    if cached is None or cached[0] != key:
        cached = owner.__dict__["_w_low"] = (key, weight.detach().to(dtype).contiguous())
    return cached[1]


def frozen_linear(x: torch.Tensor, layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """A frozen, bias-free ``nn.Linear`` (the LM head on the answer positions) with its matmuls in
    ``dtype`` (training's ``matmul_dtype``): the bf16 copy of the weight is made once per weight
    version and kept beside it, outside the state dict."""
    if dtype == torch.float32 or layer.bias is not None or layer.weight.requires_grad:
        return layer(x)
    return _FrozenLowPrecisionLinear.apply(x, _low_copy(layer, layer.weight, dtype))


class DyLoRAFALinear(nn.Module):
    """A frozen (8-bit) linear layer with a dynamic-rank LoRA-FA adapter."""

    # How many merged inference weights (one per rank and dtype, 4 bytes per weight each) a layer
    # keeps; the least recently used goes first. Served models take it from their package.
    merged_cache_size: int = DEFAULT_MERGED_CACHE

    def __init__(self, base: nn.Linear, r_min: int = 4, r_max: int = 16, alpha: float = 16.0,
                 dropout: float = 0.05, quantize: bool = True, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not 1 <= r_min <= r_max:
            raise ValueError(f"need 1 <= r_min <= r_max, got {r_min}, {r_max}")
        d_out, d_in = base.weight.shape
        self.in_features, self.out_features = d_in, d_out
        self.r_min, self.r_max, self.alpha, self.dropout = r_min, r_max, alpha, dropout
        self.quantized = quantize
        if quantize:
            q, s = quantize_int8(base.weight)
        else:
            q, s = base.weight.detach().clone(), torch.ones(d_out)
        self.register_buffer("weight_q", q)            # int8 (or fp32 when quantize=False), frozen
        self.register_buffer("weight_scale", s)
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.register_buffer("lora_A", torch.randn(d_in, r_max, generator=generator) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(torch.zeros(r_max, d_out))
        self.rank = r_max                 # the deployment rank used outside training
        self.active_rank: Optional[int] = None   # set per training step by set_active_rank
        # Inference in the training numerics (int8 weights dequantised, fp32 activations) unless
        # PyTorch's dynamic-quantisation kernel (int8 activations too) was shown to agree and
        # switched on (model/inference_kernel.py).
        self.fast_kernel = False
        # Training's frozen-base matmuls: fp32 on the dequantised weight, or bf16 (module docstring).
        self.matmul_dtype = torch.float32
        # Inference's frozen-base matmul (when not the fast kernel): fp32 on the merged weight, or
        # bf16 on the int8 values with the scale and the fp32 adapter after, as a bf16 training
        # step computes its forward (the BF16_KERNEL numerics, chosen by inference_kernel.py).
        self.serve_dtype = torch.float32

    def _low_precision_weight(self, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        """``weight_q`` in ``dtype`` (default: training's ``matmul_dtype``; int8 values are exact
        in bf16, 2 bytes per weight), built once per weight version and kept outside the state
        dict; None for fp32."""
        dtype = self.matmul_dtype if dtype is None else dtype
        if dtype == torch.float32:
            return None
        return _low_copy(self, self.weight_q, dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank=[{self.r_min},{self.r_max}], "
                f"alpha={self.alpha}, dropout={self.dropout}, int8={self.quantized}")

    def current_rank(self) -> int:
        if self.training and self.active_rank:
            return self.active_rank
        r = getattr(_CALL, "rank", None)
        if r is not None:
            if not self.r_min <= r <= self.r_max:
                raise ValueError(f"rank {r} outside the trained range [{self.r_min}, {self.r_max}]")
            return r
        return self.rank

    def _packed_int8(self):
        """The same int8 weights and scales, prepacked for PyTorch's dynamic-quantisation
        kernels (fbgemm / x86 / qnnpack), built on first inference call. None where the
        quantized engine is unavailable."""
        if getattr(self, "_packed", None) is None and self.quantized:
            try:
                import warnings

                with warnings.catch_warnings():  # quantized tensor creation warns of a future deprecation
                    warnings.simplefilter("ignore", UserWarning)
                    qw = torch._make_per_channel_quantized_tensor(
                        self.weight_q, self.weight_scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                    self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)
            except (RuntimeError, NotImplementedError):
                self._packed = False
        packed = getattr(self, "_packed", None)
        return None if packed is None or packed is False else packed

    def _inference_weight(self, r: int, dtype: torch.dtype) -> torch.Tensor:
        """For inference in the training numerics: the frozen base dequantised (int8 x per-row
        scale, the values training computes at every call) with the adapter at rank ``r`` merged
        in, ``W0 + (alpha / r) (A[:, :r] B[:r])^T``. One matmul per layer and decoded token
        instead of a dequantisation and three matmuls; the same function up to float rounding
        (4 bytes per weight while serving). Rebuilt when the rank or ``B`` changes (``B``'s
        version counter moves at every optimizer step). At most ``merged_cache_size`` merges are
        kept (least recently used dropped), so clients choosing ranks cannot grow memory without
        bound."""
        key = (r, self.lora_B._version, dtype)
        with _MERGED_LOCK:
            cache = self.__dict__.setdefault("_w_inference", OrderedDict())
            w = cache.get(key)
            if w is not None:
                cache.move_to_end(key)
                return w
        base = self.weight_q.to(dtype) * self.weight_scale[:, None].to(dtype)
        w = (base + ((self.alpha / r) * (self.lora_A[:, :r] @ self.lora_B[:r]).T).to(dtype)).contiguous()
        with _MERGED_LOCK:
            for k in [k for k in cache if k[1] != key[1]]:   # B changed: older merges are stale
                cache.pop(k, None)
            cache[key] = w
            cache.move_to_end(key)
            while len(cache) > max(1, self.merged_cache_size):
                cache.popitem(last=False)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.current_rank()
        inference = not self.training and not torch.is_grad_enabled()
        if inference and not self.fast_kernel:
            w_low = self._low_precision_weight(self.serve_dtype) if x.dtype == torch.float32 else None
            if w_low is not None:
                # bf16 base on the int8 values, row scale after; the adapter in fp32 (not merged:
                # bf16 would round the small update into the base's last bits).
                return _adapted(x, self.weight_q, self.weight_scale, self.bias, x @ self.lora_A[:, :r],
                                self.lora_B[:r], self.alpha / r, w_low)
            return torch.nn.functional.linear(x, self._inference_weight(r, x.dtype), self.bias)
        if self.fast_kernel and inference and x.dtype == torch.float32:
            packed = self._packed_int8()
            if packed is not None:
                # Inference: int8 x int8 matmul with dynamically quantised activations reads a quarter
                # of fp32's weight bytes per token (4.5x faster than fp32 for one token on x86 here).
                # reduce_range: 7-bit activations. On CPUs without VNNI (AVX2 only) the kernel's
                # u8 x s8 pair sums saturate int16 and full-range activations were off by 20% of
                # the output's scale here; PyTorch's default x86 dynamic qconfig sets it too.
                y = torch.ops.quantized.linear_dynamic(x.contiguous(), packed, True)
                return y + (self.alpha / r) * ((x @ self.lora_A[:, :r]) @ self.lora_B[:r])
        p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**62, (1,))) if p > 0 else 0
        return _DyQLoRAFAFunction.apply(x, self.weight_q, self.weight_scale, self.bias, self.lora_A[:, :r],
                                        self.lora_B[:r], self.alpha / r, p, seed, self._low_precision_weight())

    def base_weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.weight_scale[:, None]

    def delta_weight(self, rank: Optional[int] = None) -> torch.Tensor:
        """The adapter as a (d_out, d_in) matrix at ``rank`` (deploy-any-rank, merging)."""
        r = rank or self.rank
        return (self.alpha / r) * (self.lora_A[:, :r] @ self.lora_B[:r]).T


@contextmanager
def training_numerics(model: nn.Module):
    """Within the block every adapted layer computes with int8 weights dequantised to fp32 and
    fp32 activations (training's numerics with ``matmul_dtype`` float32; with bfloat16 training
    rounds its frozen-base matmuls, these do not), also in eval mode under ``no_grad``:
    validation loss, early stopping and the best-epoch choice then measure the trained function
    as served, not the dynamic-quantisation kernel that also rounds activations to int8."""
    layers = dylora_layers(model)
    saved = [(m.fast_kernel, m.serve_dtype) for m in layers]
    try:
        for m in layers:
            m.fast_kernel, m.serve_dtype = False, torch.float32
        yield model
    finally:
        for m, (fast, dtype) in zip(layers, saved):
            m.fast_kernel, m.serve_dtype = fast, dtype


# The numerics a package may serve with (its ``inference_kernel``; chosen by inference_kernel.py).
FAST_KERNEL = "dynamic_int8"          # int8 weights and activations (torch.ops.quantized.linear_dynamic)
EXACT_KERNEL = "weight_only_int8"     # the training numerics: int8 weights, fp32 activations
BF16_KERNEL = "weight_only_int8_bf16"  # int8 weights multiplied in bf16 (a bf16 training step's forward)
INFERENCE_KERNELS = (FAST_KERNEL, EXACT_KERNEL, BF16_KERNEL)


def set_fast_kernel(model: nn.Module, enabled: bool) -> None:
    for m in dylora_layers(model):
        m.fast_kernel = enabled


def set_inference_kernel(model: nn.Module, name: str) -> None:
    """Every adapted layer serves in the numerics ``name`` (one of :data:`INFERENCE_KERNELS`)."""
    if name not in INFERENCE_KERNELS:
        raise ValueError(f"inference kernel {name!r}: use one of {', '.join(INFERENCE_KERNELS)}")
    for m in dylora_layers(model):
        m.fast_kernel = name == FAST_KERNEL
        m.serve_dtype = torch.bfloat16 if name == BF16_KERNEL else torch.float32


def step_within_rank(optimizer: torch.optim.Optimizer, model: nn.Module, rank: int) -> None:
    """``optimizer.step()`` that updates only ``B[:rank]`` of every adapter (paper A.1: a step of
    rank b trains the leading b rows). Rows past ``rank`` get zero gradient, but a stateful
    optimizer (Adam's momentum and second moment) would still move them with what earlier,
    higher-rank steps left in its state; here those rows and their optimizer state are restored
    bit for bit after the step. Adam's step count stays per tensor, so the bias correction of
    a rarely trained row assumes more updates than it had (it moves a little more cautiously)."""
    saved = []
    for m in dylora_layers(model):
        p = m.lora_B
        if rank >= p.shape[0]:
            continue
        state = optimizer.state.get(p, {})
        moments = {k: (v[rank:].clone() if torch.is_tensor(v) and v.shape == p.shape else None)
                   for k, v in state.items()}
        saved.append((p, p.detach()[rank:].clone(), moments))
    optimizer.step()
    with torch.no_grad():
        for p, rows, moments in saved:
            p[rank:] = rows
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    before = moments.get(k)
                    v[rank:] = 0 if before is None else before   # state created by this step: as if never touched


def sample_rank(r_min: int, r_max: int, generator: Optional[torch.Generator] = None,
                probs: Optional[torch.Tensor] = None) -> int:
    """A rank from the categorical distribution over [r_min, r_max] (uniform by default)."""
    n = r_max - r_min + 1
    probs = torch.full((n,), 1.0 / n) if probs is None else probs
    return r_min + int(torch.multinomial(probs, 1, generator=generator))


def dylora_layers(model: nn.Module) -> list[DyLoRAFALinear]:
    return [m for m in model.modules() if isinstance(m, DyLoRAFALinear)]


def set_matmul_dtype(model: nn.Module, name: str) -> str:
    """Every adapted layer's training matmul dtype (``auto``, ``float32``, ``bfloat16``); returns
    the resolved name. Inference is unaffected (its numerics are the inference kernel's)."""
    resolved = resolve_matmul_dtype(name)
    for m in dylora_layers(model):
        m.matmul_dtype = MATMUL_DTYPES[resolved]
    return resolved


def set_merged_cache_size(model: nn.Module, size: int) -> None:
    """Keep at most ``size`` merged inference weights per adapted layer (see
    :meth:`DyLoRAFALinear._inference_weight`); extra ones are dropped now."""
    if size < 1:
        raise ValueError(f"the merged-weight cache holds at least 1 entry, got {size}")
    for m in dylora_layers(model):
        m.merged_cache_size = size
        with _MERGED_LOCK:
            cache = m.__dict__.get("_w_inference")
            while cache and len(cache) > size:
                cache.popitem(last=False)


def set_active_rank(model: nn.Module, rank: Optional[int]) -> None:
    """One rank for every adapter in this training step (None: use the deployment rank)."""
    for m in dylora_layers(model):
        m.active_rank = rank


def set_deploy_rank(model: nn.Module, rank: int) -> None:
    for m in dylora_layers(model):
        if not m.r_min <= rank <= m.r_max:
            raise ValueError(f"rank {rank} outside the trained range [{m.r_min}, {m.r_max}]")
        m.rank = rank


def apply_dyqlora_fa(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, r_min: int = 4, r_max: int = 16,
                     alpha: float = 16.0, dropout: float = 0.05, quantize: bool = True, seed: int = 0) -> int:
    """Replace every ``nn.Linear`` whose name ends with one of ``targets`` in place; returns the
    number replaced. Freezes nothing else: the caller decides what else trains."""
    gen = torch.Generator().manual_seed(seed)
    targets = tuple(targets)
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, DyLoRAFALinear(child, r_min, r_max, alpha, dropout, quantize, gen))
                replaced += 1
    return replaced
