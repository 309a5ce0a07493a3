"""Two re-tuning runs at once versus the same two one after the other, on this machine.

Each mode gets a fresh project (the tiny profile, made small like tests/test_concurrent_retunes.py)
and a Dagster instance with the shipped settings (deploy/dagster.yaml: one torch step at a time
across runs, pool `maemi_torch`); every step sizes its threads with maemi_core/threads.py.
`--no-pool` drops the pool limit and sets `operations.torch_steps_at_once: 2` instead (two torch
steps at once, half the cores each). Prints the wall time of each mode and their ratio; the target
is concurrent <= sequential x 1.10.

    .venv/bin/python bench/concurrent_runs.py [--no-pool]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def project(root: Path, no_pool: bool) -> dict:
    (root / "configs").mkdir(parents=True)
    profile = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    profile["operations"] = {**profile.get("operations", {}), "torch_steps_at_once": 2 if no_pool else 1}
    profile["vision"]["encoder"] = "efficientnet_lite0"
    profile["teacher"]["tasks"] = ["vqa", "classify_zero_shot"]
    profile["teacher"]["concise_tasks"] = ["vqa"]
    profile["model"] |= {"train_budget": {"epochs": 1, "eval_points": 1}, "train_tasks": ["vqa", "classify_zero_shot"]}
    profile["evaluation"] |= {"baselines": [], "rank_sweep": [8], "qualitative_samples": 0}
    (root / "configs" / "tiny.yaml").write_text(yaml.safe_dump(profile))
    home = root / "dagster_home"
    home.mkdir()
    instance_yaml = (REPO / "deploy" / "dagster.yaml").read_text()
    if no_pool:
        instance_yaml = "telemetry:\n  enabled: false\n"
    (home / "dagster.yaml").write_text(instance_yaml)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "MAEMI_CONFIG": str(root / "configs" / "tiny.yaml"), "DAGSTER_HOME": str(home), "MAEMI_ROOT": str(root),
        "MLFLOW_DISABLE_TELEMETRY": "true"}
    # create the instance and the tracking store once (as `dagster dev` would) before runs race to
    subprocess.run([str(BIN / "python"), "-c", "import dagster as dg, os, mlflow; "
                    "dg.DagsterInstance.from_config(os.environ['DAGSTER_HOME']); "
                    f"os.makedirs('{root / 'mlflow'}', exist_ok=True); "
                    f"mlflow.MlflowClient('sqlite:///{root / 'mlflow' / 'mlflow.db'}').search_experiments()"],
                   env=env, check=True, cwd=REPO)
    return env


def retune(env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "dagster"), "job", "execute", "-j", "retune", "-m", "maemi_dagster.definitions"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-pool", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = project(Path(tmp) / "sequential", args.no_pool)
        t = time.perf_counter()
        codes = [retune(env).wait() for _ in range(2)]
        sequential = time.perf_counter() - t
        print(f"one after the other: {sequential:.1f} s (exit codes {codes})", flush=True)
        env = project(Path(tmp) / "concurrent", args.no_pool)
        t = time.perf_counter()
        procs = [retune(env) for _ in range(2)]
        codes = [p.wait() for p in procs]
        concurrent = time.perf_counter() - t
        print(f"at once:             {concurrent:.1f} s (exit codes {codes})")
        print(f"ratio at once / one after the other: {concurrent / sequential:.2f} (target <= 1.10; "
              f"{'no pool limit, 2 torch steps at once' if args.no_pool else 'shipped pool limit: 1 torch step at once'})")
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
