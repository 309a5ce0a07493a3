"""How steps share this machine's cores.

Two torch steps on the same cores oversubscribe OpenMP (each spins as many threads as there
are cores): with one or two other torch processes on 2 cores, ViT training fell from 131 to
4.5 images/s, where fair sharing costs about 3x. Steps that run torch carry ``TORCH_STEP``,
and the executor runs at most one of them at a time per run, while light steps (manifest,
checks, the teacher's HTTP calls) still overlap. Across runs, the same steps share the pool
``maemi_torch`` that the shipped instance limits to one; each step sizes its threads with
``maemi_core.threads.fit_threads``.
"""

import os

import dagster as dg

TORCH_STEP = {"maemi/compute": "torch"}
TORCH_POOL = "maemi_torch"      # across runs: limited in the instance (deploy/dagster.yaml)

# Steps start from a fork server that imported the project once (torch, transformers, mlflow,
# dagster): a step process then starts in about a second instead of re-importing everything (10-20 s
# per step on two busy cores, seven checks and six assets per re-tuning run).
_multiprocess = dg.multiprocess_executor.configured({
    "max_concurrent": max(2, os.cpu_count() or 2),
    "tag_concurrency_limits": [{"key": "maemi/compute", "value": "torch", "limit": 1}],
    "start_method": {"forkserver": {"preload_modules": ["maemi_dagster.definitions"]}},
}, name="maemi_multiprocess")


def _celery():
    """Many hosts: every step is a Celery task on the broker in ``$MAEMI_CELERY_BROKER``, run by
    whichever worker takes it, with the settings the workers also read (``$MAEMI_CELERY_CONFIG``,
    default deploy/celery.yaml). A step whose worker died is re-delivered by the broker to another
    worker (acknowledged late); Dagster's step retries are enabled for steps that declare a policy."""
    from pathlib import Path

    import yaml
    from dagster_celery import celery_executor

    path = os.environ.get("MAEMI_CELERY_CONFIG") or Path(__file__).resolve().parents[1] / "deploy" / "celery.yaml"
    settings = yaml.safe_load(Path(path).read_text())["execution"]["config"]
    return celery_executor.configured({**settings, "retries": {"enabled": {}}}, name="maemi_celery")


def _k8s():
    """A Kubernetes cluster (deploy/k8s/values.yaml): each step a Kubernetes Job. Not run by this
    project's tests (no cluster); needs dagster-k8s in the code image."""
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as err:
        raise ImportError("MAEMI_EXECUTOR=k8s needs dagster-k8s in the image: pip install dagster-k8s==0.29.27") from err
    return k8s_job_executor.configured({"retries": {"enabled": {}}}, name="maemi_k8s")


# MAEMI_EXECUTOR=celery (set by deploy/stack.sh for its daemon, webserver and workers) or k8s selects
# a distributed executor; unset, steps run as processes on this host.
def executor_choice() -> str:
    """``$MAEMI_EXECUTOR``: multiprocess (default, this host), celery or k8s (steps on many hosts)."""
    choice = os.environ.get("MAEMI_EXECUTOR", "").lower() or "multiprocess"
    if choice not in ("multiprocess", "celery", "k8s"):
        raise ValueError(f"MAEMI_EXECUTOR={choice!r}: use multiprocess (default), celery or k8s")
    return choice


def steps_on_many_hosts() -> bool:
    return executor_choice() != "multiprocess"


executor = {"celery": _celery, "k8s": _k8s}.get(executor_choice(), lambda: _multiprocess)()
