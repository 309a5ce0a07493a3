"""Where a MAEMI training step's time goes, as achieved FLOP/s against this machine's ceiling.

    .venv/bin/python bench/training_efficiency.py [--threads 2] [--micro-batch 4] [--prompt 90]
                                                   [--answer 60] [--images 1] [--steps 3]

1. The ceiling: fp32 GFLOP/s of a large torch matmul (2048^3, best of 5) on ``--threads``.
2. One optimizer step of the default model (SmolLM2-135M + EfficientNet-Lite0 + gated
   cross-attention + DyQLoRA-FA, the default profile's shapes) on synthetic micro-batches of
   ``--prompt`` prompt and ``--answer`` answer tokens with ``--images`` images each: matmul FLOPs
   counted by ``torch.utils.flop_counter`` (forward + backward), wall time per micro-batch with
   the visual tokens computed in the step (as before) and read from the per-image cache (as
   training does now), and achieved GFLOP/s as a fraction of the ceiling.
3. A torch.profiler table of the step's most expensive operators.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maemi_core.threads import use_threads


def matmul_ceiling(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=90)
    ap.add_argument("--answer", type=int, default=60)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    use_threads(args.threads)          # subnormals flushed before torch starts its threads

    from torch.utils.flop_counter import FlopCounterMode

    from maemi_core.config import load_config
    from maemi_core.model.dyqlora_fa import set_active_rank
    from maemi_core.model.maemi_model import build_model
    from maemi_core.vision.classifiers import vit_dir

    ceiling = matmul_ceiling()
    print(f"threads {args.threads}: fp32 matmul ceiling {ceiling:.1f} GFLOP/s (2048^3, best of 5)")

    cfg = load_config("configs/default.yaml")
    model = build_model(cfg, vit_dir(cfg))
    model.train()
    model.vision.eval()
    set_active_rank(model, cfg.model.r_max)
    b, t = args.micro_batch, args.prompt + args.answer
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.base_vocab, (b, t), generator=gen)
    ids[:, : args.images] = model.image_token_id
    ids[:, args.prompt - 1] = model.encode_token_id
    labels = ids.clone()
    labels[:, : args.prompt] = -100
    attn = torch.ones_like(ids)
    imgs = torch.randint(0, 255, (b, args.images, 3, 224, 224), dtype=torch.uint8, generator=gen)
    media = model.encode_images(imgs)

    def step(cached: bool) -> float:
        t0 = time.perf_counter()
        out = model(ids, attn, None if cached else imgs, labels=labels, media=media if cached else None)
        out.loss.backward()
        return time.perf_counter() - t0

    flops = FlopCounterMode(display=False)
    with flops:
        step(True)
    matmul = flops.get_total_flops()
    with FlopCounterMode(display=False) as enc_flops:
        model.encode_images(imgs)
    encoder = enc_flops.get_total_flops()
    model.zero_grad(set_to_none=True)
    rows = {}
    for cached in (False, True):
        step(cached)
        times = [step(cached) for _ in range(args.steps)]
        rows[cached] = statistics.median(times)
        model.zero_grad(set_to_none=True)
    tokens = b * t
    print(f"micro-batch {b} x {t} tokens ({args.answer} answer), {args.images} image(s) each")
    print(f"  matmul FLOPs per micro-batch (forward + backward, LM + cross-attention): {matmul / 1e9:.1f} G; "
          f"encoder forward {encoder / 1e9:.1f} G")
    for cached, label in ((False, "encoder in the step"), (True, "cached visual tokens")):
        work = matmul + (0 if cached else encoder)
        print(f"  {label:22s}: {rows[cached]:.2f} s, {tokens / rows[cached]:.0f} tokens/s, "
              f"{work / rows[cached] / 1e9:.1f} GFLOP/s = {work / rows[cached] / 1e9 / ceiling:.0%} of the ceiling")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(True)
    model.zero_grad(set_to_none=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))


if __name__ == "__main__":
    main()
