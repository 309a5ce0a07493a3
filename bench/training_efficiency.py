"""Where a MAEMI training step's time goes, as achieved FLOP/s against this machine's ceiling.

    .venv/bin/python bench/training_efficiency.py [--threads 2] [--micro-batch 4] [--prompt 90]
                                                   [--answer 60] [--images 1] [--steps 3]
                                                   [--package DIR [--config F] [--val-batches 8]]

1. The ceiling: fp32 GFLOP/s of a large torch matmul (2048^3, best of 5) on ``--threads``.
2. One optimizer step of the default model (SmolLM2-135M + EfficientNet-Lite0 + gated
   cross-attention + DyQLoRA-FA, the default profile's shapes) on synthetic micro-batches of
   ``--prompt`` prompt and ``--answer`` answer tokens with ``--images`` images each: matmul FLOPs
   counted by ``torch.utils.flop_counter`` (forward + backward), wall time per micro-batch with
   the visual tokens computed in the step (as before) and read from the per-image cache (as
   training does now), and achieved GFLOP/s as a fraction of the ceiling.
3. A torch.profiler table of the step's most expensive operators (rows 2-3 with the frozen
   base's matmuls in fp32).
4. ``model.train_matmul_dtype``: the same cached-visual-token micro-batch with the frozen base's
   matmuls in float32 and in bfloat16, alternating (``--dtype-rounds`` rounds of ``--steps``
   each, medians), the bf16 matmul ceiling, and how far the bf16 step's loss and trained
   gradients land from the fp32 step's (relative norm of the difference; fp32 on one thread
   beside it). With ``--package DIR`` the same on ``--val-batches`` micro-batches of the
   profile's validation records with that package's trained weights (run from the workdir of
   the profile whose instruction set it reads). Random tokens through untrained adapters make
   the gradient comparison meaningless (a sum of near-cancelling terms); read it on a package.

The allocator (maemi_core/allocator.py) is process-wide: compare it with two runs one after the
other, ``MAEMI_ALLOCATOR=glibc`` (glibc's defaults) and without (the keeping allocator).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maemi_core.threads import use_threads


def matmul_ceiling(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
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
    ap.add_argument("--dtype-rounds", type=int, default=3)
    ap.add_argument("--package", help="also compare the matmul dtypes on this trained package's validation micro-batches")
    ap.add_argument("--config", default="configs/default.yaml", help="the profile whose validation records --package reads")
    ap.add_argument("--val-batches", type=int, default=8)
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
    model.use_matmul_dtype("float32")
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

    bf16_ceiling = matmul_ceiling(dtype=torch.bfloat16)
    print(f"bf16 matmul ceiling {bf16_ceiling:.1f} GFLOP/s (2048^3, best of 5; fp32 {ceiling:.1f})")
    print("synthetic micro-batch above (untrained adapters, random tokens):")
    compare_matmul_dtypes(model, [dict(input_ids=ids, attention_mask=attn, images_u8=None, labels=labels, media=media)],
                          args.dtype_rounds, args.steps)
    if args.package:
        del model
        model, batches = validation_batches(args.package, args.config, args.micro_batch, args.val_batches)
        n = sum(int(b["attention_mask"].sum()) for b in batches)
        print(f"package {args.package}: {len(batches)} validation micro-batches of the profile ({n} tokens), "
              "trained weights, training mode at the top rank:")
        compare_matmul_dtypes(model, batches, args.dtype_rounds, 1)


def validation_batches(package: str, config: str, micro_batch: int, count: int):
    """A trained package and the first ``count`` micro-batches of the profile's validation records
    (as training's validation loss reads them, visual tokens cached)."""
    from maemi_core.config import load_config
    from maemi_core.data.manifest import load_manifest
    from maemi_core.model.dyqlora_fa import set_active_rank
    from maemi_core.model.maemi_model import load_package
    from maemi_core.teacher.instruction_set import load_instruction_set
    from maemi_core.training.instruction_tuning import select_records
    from maemi_core.training.maemi_training import ImageStore, MediaCache, _to_model, build_examples, collate

    cfg = load_config(config)
    model = load_package(package, cfg.model.lm_cache and str(cfg.resolve(cfg.model.lm_cache)))
    recs = select_records(load_instruction_set(cfg), "val", cfg.model.train_tasks, cfg.model.max_val_records)
    examples, _ = build_examples(recs, model.tokenizer, cfg.model.max_len)
    media = MediaCache(model, ImageStore.from_manifest(load_manifest(cfg), cfg.vision.image_size))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    batches = [_to_model(collate(examples[i: i + micro_batch], pad, media.images, media), model)
               for i in range(0, min(len(examples), micro_batch * count), micro_batch)]
    model.train()
    model.vision.eval()
    set_active_rank(model, model.cfg.r_max)
    return model, batches


def compare_matmul_dtypes(model, batches: list[dict], rounds: int, steps: int) -> None:
    """Loss and trained gradients (summed over ``batches``) with the frozen base's matmuls in
    bf16 against fp32 (and fp32 on one thread: the size of a mere change of summation order),
    then forward + backward time over ``batches``, the two dtypes alternating."""
    def grads_and_loss(dtype: str, threads: int | None = None) -> tuple[float, list[torch.Tensor]]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        model.use_matmul_dtype(dtype)
        model.zero_grad(set_to_none=True)
        loss = 0.0
        for b in batches:
            out = model(**b)
            out.loss.backward()
            loss += out.loss.item() / len(batches)
        g = [p.grad.detach().clone() for p in model.trainable_parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        torch.set_num_threads(before)
        return loss, g

    def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
        return num / max(sum(float(x.pow(2).sum()) for x in a) ** 0.5, 1e-30)

    (l32, g32), (l16, g16), (l1, g1) = grads_and_loss("float32"), grads_and_loss("bfloat16"), grads_and_loss("float32", 1)
    print(f"  loss: bf16 {l16:.5f}, fp32 {l32:.5f} (fp32 on 1 thread {l1:.5f}); trained gradients' relative "
          f"difference to fp32: bf16 {rel(g32, g16):.2e}, fp32 on 1 thread {rel(g32, g1):.2e}")
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def one_pass() -> float:
        t0 = time.perf_counter()
        for b in batches:
            model(**b).loss.backward()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(rounds):
        for dtype in times:
            model.use_matmul_dtype(dtype)
            one_pass()
            times[dtype] += [one_pass() for _ in range(steps)]
            model.zero_grad(set_to_none=True)
    med = {d: statistics.median(v) for d, v in times.items()}
    for d, v in med.items():
        print(f"  frozen-base matmuls {d:8s}: {v:.2f} s for {tokens} tokens, {tokens / v:.0f} tokens/s "
              f"(median of {len(times[d])}, alternating)")
    print(f"  bfloat16 / float32 speed: {med['float32'] / med['bfloat16']:.2f}x")

if __name__ == "__main__":
    main()
