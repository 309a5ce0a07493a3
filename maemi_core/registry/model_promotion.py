"""Promotion of MAEMI versions in the MLflow Model Registry: the ``champion`` alias moves only
to a challenger that is not worse.

Rules (``promotion.key_metrics``: metric -> absolute tolerance): the challenger is promoted
when, for every key metric, ``challenger >= champion - tolerance``, both measured on the same
benchmark records (``benchmark.records_hash`` tags). The first registered version becomes
champion directly. A metric missing on either side blocks promotion (nothing is assumed).

Races: the compare-and-move runs under an exclusive lock and re-reads the champion inside it,
so two challengers finishing at once are compared one after the other; the second is judged
against whatever the first left as champion, never against a stale one.

Every decision (promoted, rejected, rollback) is recorded twice: as ``promotion.*`` tags on
the model version and as a row in ``<workdir>/registry/promotion_log.csv``.
"""

from __future__ import annotations

import fcntl
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
from mlflow.tracking import MlflowClient

from maemi_core.registry.model_registry import CHALLENGER, CHAMPION, alias_version

LOG_COLUMNS = ["time", "registered_model", "action", "version", "previous_champion", "champion_after",
               "decision", "reason", "metrics", "dagster_run_id"]
_THREAD_LOCK = threading.Lock()


@dataclass
class Decision:
    promote: bool
    reason: str
    rows: list[dict] = field(default_factory=list)   # metric, challenger, champion, tolerance, delta, ok

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["metric", "challenger", "champion", "tolerance", "delta", "ok"])


def compare(challenger: dict[str, float], champion: Optional[dict[str, float]],
            tolerances: dict[str, float]) -> Decision:
    """The promotion rule on two metric sets (``None`` champion: there is none yet)."""
    if champion is None:
        rows = [{"metric": m, "challenger": challenger.get(m), "champion": None, "tolerance": t, "delta": None,
                 "ok": True} for m, t in tolerances.items()]
        return Decision(True, "first model: no champion yet", rows)
    rows, worse, missing = [], [], []
    for m, tol in tolerances.items():
        a, b = challenger.get(m), champion.get(m)
        if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
            missing.append(m)
            rows.append({"metric": m, "challenger": a, "champion": b, "tolerance": tol, "delta": None, "ok": False})
            continue
        ok = a >= b - tol
        rows.append({"metric": m, "challenger": a, "champion": b, "tolerance": tol, "delta": a - b, "ok": ok})
        if not ok:
            worse.append(f"{m} {a:.4f} < {b:.4f} - {tol:g}")
    if missing:
        return Decision(False, "metric missing on one side: " + ", ".join(missing), rows)
    if worse:
        return Decision(False, "worse than the champion: " + "; ".join(worse), rows)
    return Decision(True, "no key metric worse than the champion beyond tolerance", rows)


def version_metrics(client: MlflowClient, name: str, version: str) -> tuple[dict[str, float], Optional[str]]:
    """(``benchmark.*`` metrics, records hash) recorded on a model version by benchmark_tables."""
    tags = client.get_model_version(name, version).tags
    metrics = {}
    for k, v in tags.items():
        if k.startswith("benchmark.") and k not in ("benchmark.records_hash", "benchmark.mlflow_run_id",
                                                    "benchmark.records_per_task"):
            try:
                metrics[k.removeprefix("benchmark.")] = float(v)
            except ValueError:
                pass
    return metrics, tags.get("benchmark.records_hash")


@contextmanager
def registry_lock(path: Path):
    """Exclusive across threads and processes on this host (fcntl) for one registered model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCK, open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record(client: MlflowClient, name: str, version: str, action: str, decision: str, reason: str,
           previous: Optional[str], after: Optional[str], metrics: Optional[pd.DataFrame], run_id: str,
           log_path: Path) -> dict:
    row = {"time": _now(), "registered_model": name, "action": action, "version": version,
           "previous_champion": previous or "", "champion_after": after or "", "decision": decision,
           "reason": reason, "metrics": "" if metrics is None else metrics.to_json(orient="records"),
           "dagster_run_id": run_id}
    prefix = "rollback" if action == "rollback" else "promotion"
    for k in ("decision", "reason", "previous_champion", "champion_after", "dagster_run_id", "time", "metrics"):
        value = str(row[k])[:5000]
        client.set_model_version_tag(name, version, f"{prefix}.{k}", value)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row], columns=LOG_COLUMNS).to_csv(log_path, mode="a", header=not log_path.is_file(), index=False)
    return row


def read_log(log_path: Path) -> pd.DataFrame:
    return pd.read_csv(log_path, dtype=str).fillna("") if log_path.is_file() else pd.DataFrame(columns=LOG_COLUMNS)


def promote_if_not_worse(name: str, version: str, tolerances: dict[str, float], lock_path: Path, log_path: Path,
                         run_id: str = "", log: Callable[[str], None] = lambda m: None,
                         _between: Callable[[], None] = lambda: None) -> Decision:
    """Compare ``version`` with the current champion and move ``champion`` to it when it is not
    worse; record the decision either way. Safe against concurrent callers."""
    client = MlflowClient()
    with registry_lock(lock_path):
        champion = alias_version(name, CHAMPION)
        if champion == str(version):
            return Decision(False, f"version {version} already is the champion")
        mine, my_hash = version_metrics(client, name, version)
        if champion is None:
            decision = compare(mine, None, tolerances)
        else:
            theirs, their_hash = version_metrics(client, name, champion)
            if my_hash and their_hash and my_hash != their_hash:
                decision = Decision(False, f"champion v{champion} was measured on other benchmark records "
                                           f"({their_hash[:8]} vs {my_hash[:8]}): re-run the promotion check")
            else:
                decision = compare(mine, theirs, tolerances)
        _between()          # tests widen the race window here
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, version)
        after = str(version) if decision.promote else champion
        record(client, name, str(version), "promote", "promoted" if decision.promote else "rejected",
               decision.reason, champion, after, decision.table(), run_id, log_path)
        log(f"{name} v{version}: {'promoted to champion' if decision.promote else 'not promoted'} ({decision.reason})")
        return decision


def rollback(name: str, lock_path: Path, log_path: Path, run_id: str = "") -> tuple[str, str]:
    """Move ``champion`` back to the version it replaced; returns (from, to)."""
    client = MlflowClient()
    with registry_lock(lock_path):
        current = alias_version(name, CHAMPION)
        if current is None:
            raise LookupError(f"{name} has no champion to roll back")
        tags = client.get_model_version(name, current).tags
        previous = tags.get("promotion.previous_champion") or ""
        if tags.get("promotion.decision") != "promoted" or not previous:
            raise LookupError(f"{name} v{current} did not replace an earlier champion: nothing to roll back to")
        client.set_registered_model_alias(name, CHAMPION, previous)
        record(client, name, previous, "rollback", "rolled back", f"champion moved back from v{current} to v{previous}",
               current, previous, None, run_id or f"cli:{os.getpid()}", log_path)
        return current, previous



# --- the pipeline's entry points (benchmark_tables' blocking check, model_promotion) -------------

def registry_paths(cfg) -> tuple[Path, Path]:
    d = cfg.workdir_path / "registry"
    return d / "registry.lock", d / "promotion_log.csv"


def gate_challenger(cfg, manifest, records, tracker=None, log: Callable[[str], None] = lambda m: None) -> Decision:
    """The blocking check before promotion: the challenger against the champion on the same
    benchmark records. When the champion was measured on other records (new fab data changed
    the test split), it is re-evaluated on the current ones first. A rejection is recorded."""
    from maemi_core.evaluation.benchmark_run import benchmark_registered_model
    from maemi_core.registry.model_registry import registered_model_name

    name = registered_model_name(cfg.dataset.name)
    client = MlflowClient()
    challenger = alias_version(name, CHALLENGER)
    if challenger is None:
        return Decision(False, f"{name} has no challenger: materialize maemi_model and benchmark_tables")
    champion = alias_version(name, CHAMPION)
    mine, my_hash = version_metrics(client, name, challenger)
    if not my_hash:
        return Decision(False, f"challenger v{challenger} has no benchmark: materialize benchmark_tables")
    if champion is None:
        return compare(mine, None, cfg.promotion.key_metrics)
    if champion == challenger:
        return Decision(True, f"v{challenger} already is the champion")
    theirs, their_hash = version_metrics(client, name, champion)
    if their_hash != my_hash:
        log(f"champion v{champion} was measured on other records; re-evaluating it on the challenger's")
        benchmark_registered_model(cfg, manifest, records, tracker, log, alias=CHAMPION,
                                   out_dir=cfg.workdir_path / "reports" / "champion")
        theirs, their_hash = version_metrics(client, name, champion)
    decision = compare(mine, theirs, cfg.promotion.key_metrics)
    if not decision.promote:
        lock, log_path = registry_paths(cfg)
        with registry_lock(lock):
            record(client, name, challenger, "promote", "rejected", decision.reason, champion, champion,
                   decision.table(), tracker.dagster_run_id if tracker else "", log_path)
    return decision


def promote_challenger(cfg, run_id: str = "", log: Callable[[str], None] = lambda m: None) -> dict:
    """Move ``champion`` to the challenger if it is (still) not worse; the decision and the log."""
    from maemi_core.registry.model_registry import registered_model_name

    name = registered_model_name(cfg.dataset.name)
    version = alias_version(name, CHALLENGER)
    if version is None:
        raise LookupError(f"{name} has no challenger: materialize maemi_model first")
    lock, log_path = registry_paths(cfg)
    decision = promote_if_not_worse(name, version, cfg.promotion.key_metrics, lock, log_path, run_id, log)
    return {"registered_model": name, "challenger": version, "champion": alias_version(name, CHAMPION),
            "decision": decision, "log": read_log(log_path)}
