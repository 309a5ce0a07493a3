"""The multi-host path on real servers (marker ``deploy``; `make test-deploy`, run by CI after
`make test`): PostgreSQL, Redis, an MLflow server on PostgreSQL serving artifacts, the Dagster
daemon and webserver on PostgreSQL, and two Celery workers in separate working folders standing
in for two hosts, all brought up and down by ``deploy/stack.sh`` on loopback.

One module-scoped stack; the tests run in file order and build on each other:
1. the tiny pipeline runs end to end through the run queue, its steps on both workers; one worker
   is SIGKILLed while it runs a step, and the run still completes with every asset materialized
   exactly once (the broker re-delivers the unacknowledged step to the other worker);
   then two partitions of ``paper_baseline`` (the paper's Tables 7/8), launched as one backfill,
   run at once on the two workers;
2. the model is registered in the server's registry, promoted under the shared database's lock,
   and served from ``models:/...@champion`` through the server; teacher answers are in PostgreSQL;
3. two ``retune`` runs submitted at once are serialised by the queue;
4. the database password is on no process's command line and only in files of mode 0600;
5. ``down`` leaves no process behind.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, served_model

pytestmark = pytest.mark.deploy

BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 1500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, tmp: Path):
        self.dir = tmp / "stack"
        self.work = tmp / "work"
        profile = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
        profile["workdir"] = str(self.work)
        profile["mlflow"]["tracking_uri"] = None        # the server, from MLFLOW_TRACKING_URI
        self.profile = tmp / "tiny-stack.yaml"
        self.profile.write_text(yaml.safe_dump(profile))
        celery = yaml.safe_load((REPO / "deploy" / "celery.yaml").read_text())
        # Re-delivery of a dead worker's step after 60 s instead of 2 h: every tiny step is shorter.
        celery["execution"]["config"]["config_source"]["broker_transport_options"]["visibility_timeout"] = 60
        self.celery = tmp / "celery.yaml"
        self.celery.write_text(yaml.safe_dump(celery))
        self.base_env = {**os.environ, "MAEMI_STACK_DIR": str(self.dir), "MAEMI_CONFIG": str(self.profile),
                         "MAEMI_CELERY_CONFIG": str(self.celery), "MAEMI_PG_PORT": str(_free_port()),
                         "MAEMI_REDIS_PORT": str(_free_port()), "MAEMI_MLFLOW_PORT": str(_free_port()),
                         "MAEMI_DAGSTER_PORT": str(_free_port()), "MAEMI_VENV": str(BIN.parent)}
        for k in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME", "MAEMI_SHARED_DATABASE_URL", "MAEMI_EXECUTOR"):
            self.base_env.pop(k, None)
        self.env: dict[str, str] = {}

    def script(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / "deploy" / "stack.sh"), *args], env=self.base_env, capture_output=True,
                              text=True, timeout=timeout)

    def up(self) -> None:
        out = self.script("up")
        assert out.returncode == 0, out.stdout + out.stderr
        env_out = self.script("env").stdout
        self.env = dict(self.base_env)
        for line in env_out.splitlines():
            k, _, v = line.removeprefix("export ").partition("=")
            self.env[k] = v
        self.env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"

    def log_tail(self, name: str, chars: int = 4000) -> str:
        log = self.dir / "logs" / f"{name}.log"
        return log.read_text(errors="replace")[-chars:] if log.is_file() else f"(no {log})"

    def pids(self) -> dict[str, int]:
        d = self.dir / "pids"
        return {p.name: int(p.read_text()) for p in d.iterdir() if p.name != "postgres.datadir" and p.read_text().strip()}

    def dagster(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "dagster"), *args], env=self.env, capture_output=True, text=True,
                              timeout=300, cwd=REPO)

    def launch(self, job: str) -> str:
        out = self.dagster("job", "launch", "-j", job, "-w", str(REPO / "workspace.yaml"))
        assert out.returncode == 0, out.stderr[-3000:]
        return self.query(f"""
import dagster as dg
inst = dg.DagsterInstance.get()
print(inst.get_runs(dg.RunsFilter(job_name={job!r}), limit=1)[0].run_id)""").strip()

    def query(self, code: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout


def _run_info(stack: Stack, run_id: str) -> dict:
    return json.loads(stack.query(f"""
import json
import dagster as dg
inst = dg.DagsterInstance.get()
run = inst.get_run_by_id({run_id!r})
workers, mats, starts, done = {{}}, {{}}, {{}}, set()
for rec in inst.get_records_for_run({run_id!r}).records:
    e = rec.event_log_entry
    ev = e.dagster_event
    if ev is None:
        continue
    md = (getattr(ev.event_specific_data, "metadata", None) or {{}}) if ev.event_type_value == "ENGINE_EVENT" else {{}}
    if "Celery worker" in md:      # the worker's "executing steps ... in celery worker" event
        workers.setdefault(e.step_key, []).append(md["Celery worker"].value)
    if ev.event_type_value == "ASSET_MATERIALIZATION":
        key = ev.asset_key.to_user_string()
        mats[key] = mats.get(key, 0) + 1
    if ev.event_type_value == "STEP_START":
        starts[e.step_key] = starts.get(e.step_key, 0) + 1
    if ev.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
        done.add(e.step_key)
stats = inst.get_run_stats({run_id!r})
running = {{k: v[-1] for k, v in workers.items() if k not in done}}
print(json.dumps({{"status": run.status.value, "workers": workers, "running": running, "materializations": mats,
                  "starts": starts, "start": stats.start_time, "end": stats.end_time}}))"""))


def _wait_for_workers(stack: Stack, names: set[str], timeout_s: float = 180) -> None:
    """Until every named Celery worker answers a ping on the stack's broker."""
    deadline = time.time() + timeout_s
    while True:
        answered = set(json.loads(stack.query("""
import json, os
from celery import Celery
app = Celery(broker=os.environ["MAEMI_CELERY_BROKER"])
print(json.dumps([name for reply in app.control.ping(timeout=3) for name in reply]))""")))
        if names <= {a.split("@")[0] for a in answered}:
            return
        assert time.time() < deadline, (answered, {n: stack.log_tail(n, 1500) for n in names})
        time.sleep(2)


def _command_lines_with(secret: str) -> list[str]:
    """Every process's command line (``ps -eo pid,args``, what any user of the machine sees) that
    contains ``secret``."""
    out = subprocess.run(["ps", "-eo", "pid,args", "--no-headers"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if secret in line]


FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
LONG_STEPS = ("vit_classifier", "instruction_set", "maemi_model", "benchmark_tables")


def _wait(stack: Stack, run_id: str, until=lambda info: info["status"] in FINISHED,
          timeout: float = RUN_TIMEOUT_S) -> dict:
    deadline = time.time() + timeout
    while True:
        info = _run_info(stack, run_id)
        if until(info):
            return info
        assert time.time() < deadline, f"run {run_id} still {info['status']} after {timeout} s: {info}"
        time.sleep(3)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    install = subprocess.run([str(REPO / "deploy" / "install_services.sh")], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    s = Stack(tmp_path_factory.mktemp("deploy"))
    try:
        s.up()
        yield s
    finally:
        s.script("purge")          # down, and no database left behind on the machine


def test_pipeline_through_the_queue_on_two_workers_survives_a_killed_worker(stack):
    run_id = stack.launch("everything")
    # Wait until one of the long steps is running on some worker, then kill that worker's whole
    # process group, the way a host dies.
    info = _wait(stack, run_id, until=lambda i: any(k in i["running"] for k in LONG_STEPS) or i["status"] in FINISHED)
    assert info["status"] == "STARTED", info
    step = next(k for k in LONG_STEPS if k in info["running"])
    # Every kind of process is up now (servers, run worker, code servers, a step on a celery worker):
    # none shows the database password on its command line.
    assert not _command_lines_with(stack.env["MAEMI_PG_PASSWORD"])
    victim = info["running"][step].split("@")[0]
    os.killpg(stack.pids()[victim], signal.SIGKILL)
    info = _wait(stack, run_id)
    print(json.dumps(info, indent=1))
    assert info["status"] == "SUCCESS", info
    ran_on = {w.split("@")[0] for ws in info["workers"].values() for w in ws}
    assert ran_on == {"worker1", "worker2"}, info["workers"]
    # The killed step ran again on the other worker, and each asset was materialized once.
    assert len(info["workers"][step]) == 2 and info["workers"][step][1].split("@")[0] != victim, (step, victim)
    assert info["materializations"] and set(info["materializations"].values()) == {1}, info["materializations"]
    for asset in ("raw_images", "instruction_set", "maemi_model", "benchmark_tables", "model_promotion"):
        assert info["materializations"].get(asset) == 1, asset


def test_paper_baseline_partitions_run_on_two_workers_at_once(stack):
    """Two rows of the paper's tables, launched together as a backfill, run at the same time on
    different workers (the torch pool allows two, as for two hosts with one torch worker each)."""
    up = stack.script("up")                       # brings back a worker an earlier test killed
    assert up.returncode == 0, up.stdout + up.stderr
    # `up` returns once a restarted worker's process exists, not once it consumes: wait until both
    # answer on the broker, or the first step's worker may also take the second after it.
    _wait_for_workers(stack, {"worker1", "worker2"})
    limit = stack.dagster("instance", "concurrency", "set", "maemi_torch", "2")
    assert limit.returncode == 0, limit.stdout + limit.stderr
    try:
        out = stack.dagster("job", "backfill", "-j", "paper_baselines", "--partitions", "SqueezeNet,GraphConv",
                            "-w", str(REPO / "workspace.yaml"), "--noprompt")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        deadline = time.time() + RUN_TIMEOUT_S
        while True:
            ids = json.loads(stack.query("""
import json
import dagster as dg
inst = dg.DagsterInstance.get()
print(json.dumps([r.run_id for r in inst.get_runs(dg.RunsFilter(job_name="paper_baselines"))]))"""))
            infos = [_run_info(stack, i) for i in ids]
            if len(ids) == 2 and all(i["status"] in FINISHED for i in infos):
                break
            assert time.time() < deadline, infos
            time.sleep(3)
    finally:
        stack.dagster("instance", "concurrency", "set", "maemi_torch", "1")
    assert all(i["status"] == "SUCCESS" for i in infos), infos
    workers = {i["workers"]["paper_baseline"][-1].split("@")[0] for i in infos}
    assert workers == {"worker1", "worker2"}, (infos, stack.log_tail("worker1", 2000), stack.log_tail("worker2", 2000))
    first, second = sorted(infos, key=lambda i: i["start"])
    assert second["start"] < first["end"], (first, second)       # they overlapped


def test_registry_promotion_lock_and_serving_through_the_server(stack):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.env["MLFLOW_TRACKING_URI"])
    name = "maemi-elpv-tiny"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags.get("promotion.decision") == "promoted"
    # The artifacts live behind the server, not on a path a worker would need to see.
    run = client.get_run(champion.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    # Teacher answers are in the shared database; no host-local cache file was written.
    counted = stack.query("""
import os, psycopg2
c = psycopg2.connect(os.environ["MAEMI_SHARED_DATABASE_URL"])
cur = c.cursor(); cur.execute("SELECT COUNT(*) FROM maemi_teacher_answers"); print(cur.fetchone()[0])""")
    assert int(counted) > 0
    assert not (stack.work / "cache" / "teacher_cache.sqlite").exists()
    assert (stack.work / ".maemi-shared-volume").is_file()      # declared by `up`, checked by every step
    assert not (stack.work / "registry" / "registry.lock").exists()   # promotion locked in PostgreSQL, not here

    with served_model(f"models:/{name}@champion", stack.env, cwd=stack.dir) as port:
        from maemi_core.data.sources import list_elpv

        b64 = base64.b64encode(list_elpv()[0].path.read_bytes()).decode()
        body = json.dumps({"dataframe_split": {"columns": ["image", "question"],
                                               "data": [[b64, "Describe the cell."]]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
        assert set(out["predictions"][0]) == {"answer"}


def test_two_retunes_submitted_at_once_are_serialised_by_the_queue(stack):
    first, second = stack.launch("retune"), stack.launch("retune")
    a, b = _wait(stack, first), _wait(stack, second)
    assert a["status"] == "SUCCESS", a
    assert b["status"] in ("SUCCESS", "FAILURE"), b   # a rejected challenger stops at the blocking check
    earlier, later = sorted([a, b], key=lambda i: i["start"])
    assert later["start"] >= earlier["end"], (earlier, later)


def test_promotion_lock_is_shared_and_released_by_a_dead_holder(stack):
    """The registry lock of a deployment is a PostgreSQL advisory lock: two processes never hold it
    at once, and one that dies holding it does not leave the registry locked."""
    hold = """
import os, sys, time
from maemi_core.registry.model_promotion import SharedLock, registry_lock
with registry_lock(SharedLock(os.environ["MAEMI_SHARED_DATABASE_URL"], "maemi-lock-test")):
    print(f"{time.time()} acquired", flush=True)
    time.sleep(float(sys.argv[1]))
    print(f"{time.time()} released", flush=True)
"""
    procs = [subprocess.Popen([sys.executable, "-c", hold, "3"], env=stack.env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        times = [float(line.split()[0]) for line in out.splitlines()]
        spans.append(times)
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 >= a1, spans                                 # one after the other
    holder = subprocess.Popen([sys.executable, "-c", hold, "600"], env=stack.env, stdout=subprocess.PIPE, text=True)
    assert "acquired" in holder.stdout.readline()
    # A waiter gives up after its timeout with an error naming the lock, instead of waiting forever.
    waiter = subprocess.run([sys.executable, "-c", """
import os
from maemi_core.shared_database import LockTimeout, advisory_lock
try:
    with advisory_lock(os.environ["MAEMI_SHARED_DATABASE_URL"], "registry:maemi-lock-test", timeout_s=2):
        print("entered")
except LockTimeout as exc:
    print("timed out:", exc)
"""], env=stack.env, capture_output=True, text=True, timeout=120)
    assert waiter.returncode == 0 and "timed out: the shared lock 'registry:maemi-lock-test'" in waiter.stdout, waiter
    assert stack.env["MAEMI_PG_PASSWORD"] not in waiter.stdout
    holder.kill()                                          # dies holding the lock
    holder.wait()
    started = time.time()
    again = subprocess.run([sys.executable, "-c", hold, "0"], env=stack.env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "acquired" in again.stdout
    assert time.time() - started < 60


def test_the_database_password_is_in_no_command_line_and_no_readable_file(stack):
    """Secrets only in the environment or in files of mode 0600: ``ps`` of every process of the
    stack (the PostgreSQL server, the MLflow server and its workers, Dagster's daemon, webserver and
    code servers, the celery workers) shows no password, and no file of the stack that holds it
    can be read by another user."""
    secret = stack.env["MAEMI_PG_PASSWORD"]
    assert len(secret) >= 8
    assert not _command_lines_with(secret)
    pids = stack.pids()
    assert {"mlflow", "daemon", "webserver", "redis"} <= set(pids)
    for name in ("mlflow", "daemon", "webserver", "redis"):   # the servers are running and were checked above
        # (a worker may be the one an earlier test killed); a server that died says why in its log
        assert Path(f"/proc/{pids[name]}").is_dir(), f"{name} is not running; the end of its log:\n{stack.log_tail(name)}"
    # The MLflow server got its backend store from its environment, not from an option.
    mlflow_args = Path(f"/proc/{pids['mlflow']}/cmdline").read_bytes().split(b"\0")
    assert b"--backend-store-uri" not in mlflow_args
    readable = []
    data = (stack.dir / "pids" / "postgres.datadir").read_text().strip()
    for path in stack.dir.rglob("*"):
        if not path.is_file() or path.is_symlink() or str(path).startswith(data + "/"):
            continue
        try:
            if path.stat().st_size < 5_000_000 and secret.encode() in path.read_bytes() \
                    and path.stat().st_mode & 0o077:
                readable.append(f"{path} ({oct(path.stat().st_mode & 0o777)})")
        except OSError:
            pass
    assert not readable, readable


def test_down_leaves_no_process_behind(stack):
    pids = stack.pids()
    assert {"mlflow", "daemon", "webserver", "redis"} <= set(pids)
    out = stack.script("down")
    assert out.returncode == 0, out.stderr
    for name, pid in pids.items():
        try:
            os.killpg(pid, 0) if name != "redis" else os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, f"{name} (pid {pid}) still running"
    assert stack.script("status").returncode != 0
    marker = f"MAEMI_STACK_MEMBER={stack.dir}".encode()
    started_by_stack = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                started_by_stack.append(proc.name)
        except OSError:
            pass
    assert not started_by_stack, f"processes of the stack still running: {started_by_stack}"
    # Idempotent: a second `down` has nothing to do and succeeds.
    assert stack.script("down").returncode == 0
