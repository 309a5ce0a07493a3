"""Wall time of the whole tiny pipeline (the ``everything`` job) embedded vs on the multi-host stack.

    .venv/bin/python bench/stack_vs_embedded.py [--config configs/tiny.yaml]

Both start from an empty workdir and an empty teacher cache:

- embedded: ``dagster job execute -j everything`` with the shipped single-host instance
  (sqlite, multiprocess executor), MLflow in a sqlite file;
- stack: ``deploy/stack.sh up`` (not timed), then the job submitted to the run queue and executed by
  the Celery executor on two workers, Dagster and MLflow on PostgreSQL, artifacts through the
  MLflow server, the teacher cache in PostgreSQL; ``down`` afterwards.

Prints the seconds of each (the run's own start-to-end time from Dagster, and submit-to-end)
and the ratio. Needs PostgreSQL and Redis (deploy/install_services.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _profile(base: Path, tmp: Path, tracking_uri) -> Path:
    p = yaml.safe_load(base.read_text())
    p["workdir"] = str(tmp / "work")
    p["mlflow"]["tracking_uri"] = tracking_uri
    out = tmp / "profile.yaml"
    out.write_text(yaml.safe_dump(p))
    return out


RUN_STATS = """
import json, dagster as dg
inst = dg.DagsterInstance.get()
run = inst.get_runs(dg.RunsFilter(job_name="everything"), limit=1)[0]
s = inst.get_run_stats(run.run_id)
print(json.dumps({"status": run.status.value, "start": s.start_time, "end": s.end_time}))
"""


def embedded(base: Path, tmp: Path) -> dict:
    profile = _profile(base, tmp, f"sqlite:///{tmp / 'mlflow.db'}")
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "MAEMI_CONFIG": str(profile), "DAGSTER_HOME": str(home), "MAEMI_ROOT": str(REPO)}
    for k in ("MLFLOW_TRACKING_URI", "MAEMI_EXECUTOR", "MAEMI_SHARED_DATABASE_URL"):
        env.pop(k, None)
    t0 = time.time()
    out = subprocess.run([str(BIN / "dagster"), "job", "execute", "-m", "maemi_dagster.definitions", "-j", "everything"],
                         env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - t0
    if out.returncode != 0:
        raise SystemExit(f"embedded run failed:\n{out.stderr[-3000:]}")
    stats = json.loads(subprocess.run([sys.executable, "-c", RUN_STATS], env=env, capture_output=True, text=True,
                                      check=True).stdout)
    return {"submit_to_end_s": wall, "run_s": stats["end"] - stats["start"], "status": stats["status"]}


def stack(base: Path, tmp: Path) -> dict:
    profile = _profile(base, tmp, None)
    env = {**os.environ, "MAEMI_STACK_DIR": str(tmp / "stack"), "MAEMI_CONFIG": str(profile),
           "MAEMI_PG_PORT": str(_port()), "MAEMI_REDIS_PORT": str(_port()), "MAEMI_MLFLOW_PORT": str(_port()),
           "MAEMI_DAGSTER_PORT": str(_port()), "MAEMI_VENV": str(BIN.parent)}
    for k in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME", "MAEMI_EXECUTOR", "MAEMI_SHARED_DATABASE_URL"):
        env.pop(k, None)
    script = str(REPO / "deploy" / "stack.sh")
    subprocess.run([script, "up"], env=env, check=True, capture_output=True)
    try:
        client = dict(env)
        for line in subprocess.run([script, "env"], env=env, capture_output=True, text=True, check=True).stdout.splitlines():
            k, _, v = line.removeprefix("export ").partition("=")
            client[k] = v
        t0 = time.time()
        subprocess.run([str(BIN / "dagster"), "job", "launch", "-j", "everything", "-w", str(REPO / "workspace.yaml")],
                       env=client, check=True, capture_output=True, cwd=REPO)
        while True:
            stats = json.loads(subprocess.run([sys.executable, "-c", RUN_STATS], env=client, capture_output=True,
                                              text=True, check=True).stdout)
            if stats["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            time.sleep(2)
        wall = time.time() - t0
        return {"submit_to_end_s": wall, "run_s": stats["end"] - stats["start"], "status": stats["status"]}
    finally:
        subprocess.run([script, "purge"], env=env, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    args = ap.parse_args()
    base = (REPO / args.config) if not Path(args.config).is_absolute() else Path(args.config)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        e = embedded(base, Path(a))
        print(f"embedded: run {e['run_s']:.0f} s, submit to end {e['submit_to_end_s']:.0f} s ({e['status']})", flush=True)
        s = stack(base, Path(b))
        print(f"stack:    run {s['run_s']:.0f} s, submit to end {s['submit_to_end_s']:.0f} s ({s['status']})")
    print(f"stack / embedded: {s['run_s'] / e['run_s']:.2f} (run), {s['submit_to_end_s'] / e['submit_to_end_s']:.2f} "
          "(submit to end)")


if __name__ == "__main__":
    main()
