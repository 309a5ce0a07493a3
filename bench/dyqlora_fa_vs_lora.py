"""DyQLoRA-FA against peft LoRA (fp32 base), peft LoRA on a bitsandbytes 8-bit base and full
fine-tuning, on the same LM, batch and sequence length; then generation speed 8-bit vs fp32.

    .venv/bin/python bench/dyqlora_fa_vs_lora.py [--batch 4] [--seq 256] [--steps 3] [--threads 1]

Each training variant runs in its own process so that its peak RSS (ru_maxrss) is its own.
Reported per variant: peak RSS, activation memory kept for backward (bytes packed by
``saved_tensors_hooks`` during one forward, parameters excluded), trainable parameters and
seconds per optimizer step (median of ``--steps`` after a warm-up step). The LM is
SmolLM2-135M-Instruct (the default profile), adapters on every attention and MLP linear,
rank 16, answer-sized loss on the last quarter of each sequence.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("dyqlora_fa_int8", "peft_lora_fp32", "peft_lora_bnb8", "full_finetune")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(variant: str):
    from maemi_core.model.language_model import load_language_model

    lm, _ = load_language_model("default")
    for p in lm.parameters():
        p.requires_grad_(variant == "full_finetune")
    if variant == "dyqlora_fa_int8":
        from maemi_core.model.dyqlora_fa import apply_dyqlora_fa, set_active_rank

        from maemi_core.model.frozen_activations import use_lean_swiglu

        apply_dyqlora_fa(lm.model.layers, TARGETS, r_min=16, r_max=16, alpha=16, dropout=0.05, quantize=True)
        use_lean_swiglu(lm)   # as MaemiModel does: the frozen MLPs keep 2 of 3 activations
        set_active_rank(lm, 16)
    elif variant == "peft_lora_fp32":
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
    elif variant == "peft_lora_bnb8":
        import bitsandbytes as bnb
        import torch.nn as nn
        from peft import LoraConfig, get_peft_model

        for layer in lm.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                                has_fp16_weights=False, threshold=6.0)
                        q.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
                        q = q.to("cpu")
                        setattr(parent, name, q)
        lm = get_peft_model(lm, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
    return lm


def train_variant(variant: str, batch: int, seq: int, steps: int, glibc_default: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    if not glibc_default:   # every variant gets the same allocator setting
        from maemi_core.allocator import use_returning_allocator

        use_returning_allocator()
    lm = build(variant)
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    ids = torch.randint(0, 49152, (batch, seq))
    answer = seq // 4

    def loss_fn():
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        hidden = base.model(input_ids=ids, use_cache=False).last_hidden_state          # (B, T, D)
        logits = base.lm_head(hidden[:, -answer - 1:-1])                                # answer positions only
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, -answer:].reshape(-1))

    # activation memory kept for backward, parameters excluded
    own = {p.data_ptr() for p in lm.parameters()} | {b.data_ptr() for b in lm.buffers()}
    saved = 0

    def pack(t):
        nonlocal saved
        if t.data_ptr() not in own:
            saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "saved_activations_gb": saved / 1e9, "trainable_params": sum(p.numel() for p in params),
            "s_per_step": statistics.median(times)}


def generation_speed(quantize: bool, tokens: int = 32) -> float:
    import torch

    from maemi_core.model.dyqlora_fa import apply_dyqlora_fa
    from maemi_core.model.language_model import load_language_model

    lm, tok = load_language_model("default")
    if quantize:
        from maemi_core.model.dyqlora_fa import set_fast_kernel

        apply_dyqlora_fa(lm.model.layers, TARGETS, r_min=16, r_max=16, quantize=True)
        # the dynamic int8 kernel (models serve with it only where maemi_core/model/inference_kernel.py
        # found it to answer like the training numerics)
        set_fast_kernel(lm, True)
    lm.eval()
    ids = tok("Describe an electron micrograph of silver nanowires.", return_tensors="pt")
    with torch.no_grad():
        lm.generate(**ids, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        out = lm.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return (out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--generation", choices=["int8", "fp32"])
    ap.add_argument("--glibc-default", action="store_true",
                    help="keep glibc's default heap (freed memory stays in the process) for every variant")
    args = ap.parse_args()
    import torch

    from maemi_core.threads import use_threads

    use_threads(args.threads)          # subnormals flushed before torch starts its threads
    if args.variant:
        print(json.dumps(train_variant(args.variant, args.batch, args.seq, args.steps, args.glibc_default)))
        return
    if args.generation:
        print(json.dumps({"tokens_per_s": generation_speed(args.generation == "int8")}))
        return
    common = [sys.executable, __file__, "--batch", str(args.batch), "--seq", str(args.seq), "--steps",
              str(args.steps), "--threads", str(args.threads)] + (["--glibc-default"] if args.glibc_default else [])
    rows = []
    for v in VARIANTS:
        out = subprocess.run(common + ["--variant", v], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{v}: failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"SmolLM2-135M, batch {args.batch} x {args.seq} tokens, rank 16, {args.threads} thread(s), "
          f"{'glibc default heap' if args.glibc_default else 'large allocations mmap-ed (returned when freed)'}")
    base = next((r for r in rows if r["variant"] == "peft_lora_fp32"), None)
    print(f"{'variant':<18} {'peak RSS GB':>12} {'saved act. GB':>14} {'trainable':>12} {'s/step':>8}")
    for r in rows:
        rel = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x" if base else ""
        print(f"{r['variant']:<18} {r['peak_rss_gb']:12.2f} {rel:>6} {r['saved_activations_gb']:14.3f} "
              f"{r['trainable_params']:12,d} {r['s_per_step']:8.2f}")
    for g in ("fp32", "int8"):
        out = subprocess.run(common + ["--generation", g], capture_output=True, text=True)
        tps = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"] if out.returncode == 0 else float("nan")
        print(f"generation {g}: {tps:.1f} tokens/s")


if __name__ == "__main__":
    main()
