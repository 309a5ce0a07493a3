"""What subnormal floats cost a training step, and what flushing them buys.

    .venv/bin/python bench/subnormal_floats.py --checkpoint <workdir>/paper_baselines/AlexNet/<fp>/runs/<run>/checkpoint.pt
                                               [--method AlexNet] [--threads 2] [--steps 3]

Loads the weights of a paper-baseline row (one that collapsed to the label prior shows the effect:
its gradients shrink into the subnormal range), and times forward + backward on one seeded batch
of 32 images at ``paper_baselines.image_size`` (96 px) in two fresh processes: ``plain`` (torch's
defaults) and ``flushed`` (``maemi_core.threads.use_threads`` then the step inside
``subnormals_flushed``, as the trainers run). Prints seconds per step and the number of subnormal
gradient values of the step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _measure(mode: str, method: str, checkpoint: str, threads: int, steps: int) -> dict:
    import contextlib
    import time

    import torch

    from maemi_core.threads import subnormals_flushed, use_threads

    if mode == "flushed":
        use_threads(threads)
        block = subnormals_flushed
    else:
        torch.set_num_threads(threads)
        block = contextlib.nullcontext
    from maemi_core.vision.paper_baselines.zoo import build_supervised

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = build_supervised(method, 4, 96)
    model.load_state_dict(state["weights"])
    model.train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 96, 96, generator=g), torch.randint(0, 4, (32,), generator=g)
    tiny = torch.finfo(torch.float32).tiny

    def step():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    with block():
        step()
        subnormal = sum(int(((p.grad != 0) & (p.grad.abs() < tiny)).sum()) for p in model.parameters()
                        if p.grad is not None)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - t0) / steps
    return {"mode": mode, "s_per_step": round(seconds, 4), "subnormal_gradients": subnormal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a paper_baseline row's checkpoint.pt")
    ap.add_argument("--method", default="AlexNet", help="the row the checkpoint belongs to (a supervised row)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mode", choices=("plain", "flushed"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(_measure(args.mode, args.method, args.checkpoint, args.threads, args.steps)))
        return
    rows = []
    for mode in ("plain", "flushed"):      # each in a fresh process: the flag is per thread
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.method}, {args.threads} threads, batch 32 x 96 px, forward + backward:")
    for r in rows:
        print(f"  {r['mode']:8s} {r['s_per_step']:.3f} s/step   subnormal gradient values: {r['subnormal_gradients']}")
    print(f"  flushing is {rows[0]['s_per_step'] / rows[1]['s_per_step']:.1f}x faster")


if __name__ == "__main__":
    main()
