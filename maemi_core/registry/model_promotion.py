"""Promotion of MAEMI versions in the MLflow Model Registry: the ``champion`` alias moves only
to a challenger that is shown, with confidence, not to be worse.

Rules (``promotion.key_metrics``: metric -> non-inferiority margin, absolute). Every key metric
is compared *paired*, on the same benchmark records (``benchmark.records_hash``), from the
per-record scores the benchmark stored (``reports/samples/key_scores.csv`` of its MLflow run):
the mean difference challenger - other with a bootstrap interval over records
(``promotion.confidence``). The challenger must be

* non-inferior to the champion: interval low end > -margin, for every key metric;
* non-inferior to the *reference* (the best champion so far, registered-model tag
  ``promotion.reference``), so that a sequence of challengers each a little worse within the
  margin cannot ratchet the champion down: it can never fall more than the margin below the
  reference. The reference moves to a new champion only when that one is better on every key
  metric (mean difference > 0 against the old reference);
* the first version: better than ``base_lm`` (the LM as it ships) on every key metric (mean
  difference > 0) and non-inferior with confidence;
* grounded (``promotion.require_grounding``; every promotion, the first included), measured on
  the challenger's own benchmark records: it beats ``maemi_gates_closed`` (the same weights with
  every cross-attention gate closed: no image) and ``base_lm`` on every key text metric (paired
  interval above 0), and beats ``majority`` (always the most frequent train category) on zero-shot
  balanced accuracy (paired interval above 0) or on macro AUC (interval above 0.5, the AUC of
  any image-blind scoring). A model whose answers do not depend on the image is never champion;
  the rejection names the comparison that failed.

A metric missing on either side blocks promotion (nothing is assumed). A version that was rolled
back is tagged ``promotion.rolled_back`` and automation never promotes it again.
Each decision row carries the smallest difference the benchmark could detect
(``detectable``: (z_{1-a/2} + z_{0.8}) x sd / sqrt(n), 80% power).

Races: the compare-and-move runs under an exclusive lock and re-reads the champion inside it,
so two challengers finishing at once are compared one after the other; the second is judged
against whatever the first left as champion, never against a stale one.

Every decision (promoted, rejected, rollback) is recorded twice: as ``promotion.*`` tags on
the model version and as a row in ``<workdir>/registry/promotion_log.csv``.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Optional

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from maemi_core.evaluation.benchmark_tables import paired_difference
from maemi_core.model_registry import CHAMPION, alias_version

LOG_COLUMNS = ["time", "registered_model", "action", "version", "previous_champion", "champion_after",
               "decision", "reason", "metrics", "dagster_run_id"]
ROW_COLUMNS = ["against", "metric", "challenger", "other", "diff", "ci_low", "ci_high", "n", "margin", "detectable",
               "ok"]          # a row may also carry min_n (the table shows these columns)
KEY_SCORES = "reports/samples/key_scores.csv"     # method, metric, record_id, score
REFERENCE_TAG, ROLLED_BACK_TAG = "promotion.reference", "promotion.rolled_back"
_THREAD_LOCK = threading.Lock()


@dataclass
class Decision:
    promote: bool
    reason: str
    rows: list[dict] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{k: r.get(k) for k in ROW_COLUMNS} for r in self.rows], columns=ROW_COLUMNS)


def detectable_difference(diffs: np.ndarray, confidence: float = 0.95, power: float = 0.8) -> float:
    """The smallest mean difference a paired test on these records detects with ``power``."""
    if diffs.size < 2:
        return float("nan")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2) + NormalDist().inv_cdf(power)
    sd = float(np.std(diffs, ddof=1))
    return z * sd / math.sqrt(diffs.size)


MIN_RECORDS = 20     # promotion.min_records' default


def paired_rows(mine: pd.DataFrame, other: pd.DataFrame, margins: dict[str, float], against: str,
                must_beat: bool = False, confidence: float = 0.95, min_n: int = 2) -> list[dict]:
    """One row per key metric: ``mine`` - ``other`` on their common records (score frames with
    columns metric, record_id, score). ``ok``: at least ``min_n`` common records, and the
    interval low end > -margin (and, with ``must_beat``, mean difference > 0)."""
    rows = []
    for metric, margin in margins.items():
        a = mine[mine["metric"] == metric].set_index("record_id")["score"]
        b = other[other["metric"] == metric].set_index("record_id")["score"]
        common = a.index.intersection(b.index)
        if not len(common):
            rows.append({"against": against, "metric": metric, "challenger": None, "other": None, "diff": None,
                         "ci_low": None, "ci_high": None, "n": 0, "margin": margin, "detectable": None, "ok": False})
            continue
        x, y = a.loc[common].to_numpy(float), b.loc[common].to_numpy(float)
        d = paired_difference(x, y, level=confidence)
        ok = len(common) >= min_n and d["ci_low"] > -margin and (not must_beat or d["diff"] > 0)
        rows.append({"against": against, "metric": metric, "challenger": float(x.mean()), "other": float(y.mean()),
                     "diff": d["diff"], "ci_low": d["ci_low"], "ci_high": d["ci_high"], "n": int(len(common)),
                     "margin": margin, "detectable": detectable_difference(x - y, confidence), "ok": bool(ok),
                     "min_n": min_n})
    return rows


def _why(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r["ok"]:
            continue
        if not r["n"]:
            out.append(f"{r['metric']} missing against {r['against']}")
        elif r.get("min_n") and r["n"] < r["min_n"]:
            out.append(f"{r['metric']} vs {r['against']}: only {r['n']} paired records (promotion.min_records "
                       f"{r['min_n']}: too few to decide)")
        else:
            out.append(f"{r['metric']} vs {r['against']}: diff {r['diff']:+.4f} "
                       f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] (margin {r['margin']:g}, n {r['n']})")
    return "; ".join(out)


BALANCED = "classification.zero_shot_balanced_accuracy"
AUC = "classification.zero_shot_macro_auc"


def grounding_rows(scores: pd.DataFrame, margins: dict[str, float], confidence: float = 0.95,
                   auc: Optional[tuple[float, float, float, int]] = None,
                   min_n: int = 2) -> tuple[list[dict], list[str]]:
    """The grounding comparisons of one benchmarked version (its per-record key scores of every
    method): rows, and the failures in words (empty: grounded). ``auc``: (macro AUC, interval low,
    high, images) of its zero-shot category scores."""
    maemi = scores[scores["method"] == "maemi"]
    rows: list[dict] = []
    failed: list[str] = []
    text = {m: 0.0 for m in margins if not m.startswith("classification.")}
    for other in ("maemi_gates_closed", "base_lm"):
        theirs = scores[scores["method"] == other]
        if theirs.empty:
            failed.append(f"no {other} scores to compare with (evaluation.no_vision_baseline is off: turn it on, "
                          "or set promotion.require_grounding: false for a profile whose model cannot see)")
            continue
        got = paired_rows(maemi, theirs, text, other, confidence=confidence, min_n=min_n)
        for r in got:
            r["ok"] = bool(r["n"] >= min_n and r["ci_low"] > 0)
        rows += got
        failed += [f"does not beat {other} on {r['metric']}: " + _why([r]) for r in got if not r["ok"]]
    majority = scores[scores["method"] == "majority"]
    got = (paired_rows(maemi, majority, {BALANCED: 0.0}, "majority", confidence=confidence, min_n=min_n)
           if not majority.empty else [])
    for r in got:
        r["ok"] = bool(r["n"] >= min_n and r["ci_low"] > 0)
    if auc is not None and all(np.isfinite(auc[:3])):
        value, lo, hi, n = auc
        got.append({"against": "majority", "metric": AUC, "challenger": value, "other": 0.5, "diff": value - 0.5,
                    "ci_low": lo - 0.5, "ci_high": hi - 0.5, "n": int(n), "margin": 0.0, "detectable": None,
                    "ok": bool(lo > 0.5 and n >= min_n)})
    rows += got
    if not got:
        failed.append("no majority-class or macro-AUC scores (re-run benchmark_tables)")
    elif not any(r["ok"] for r in got):
        failed.append("does not beat majority on zero-shot balanced accuracy or macro AUC: " + _why(got))
    return rows, failed


def decide(mine: pd.DataFrame, champion: Optional[pd.DataFrame], margins: dict[str, float],
           reference: Optional[pd.DataFrame] = None, base_lm: Optional[pd.DataFrame] = None,
           confidence: float = 0.95, labels: tuple[str, str] = ("champion", "reference"),
           grounding: Optional[tuple[pd.DataFrame, Optional[tuple]]] = None, min_n: int = 2) -> Decision:
    """The promotion rule on per-record key scores (see the module docstring). ``champion``
    None: there is none yet, and the challenger must beat ``base_lm``. ``grounding``: (the
    challenger's key scores of every method, its macro-AUC tuple) when the grounding gate applies."""
    if grounding is not None:
        rows, failed = grounding_rows(grounding[0], margins, confidence, grounding[1], min_n)
        if failed:
            return Decision(False, "not grounded: " + "; ".join(failed), rows)
        inner = decide(mine, champion, margins, reference, base_lm, confidence, labels, min_n=min_n)
        return Decision(inner.promote, inner.reason + ("; grounded (beats maemi_gates_closed, base_lm and majority)"
                                                       if inner.promote else ""), inner.rows + rows)
    if champion is None:
        if base_lm is None or base_lm.empty:
            return Decision(False, "first model: no base_lm scores to beat (re-run benchmark_tables)")
        rows = paired_rows(mine, base_lm, margins, "base_lm", must_beat=True, confidence=confidence, min_n=min_n)
        if all(r["ok"] for r in rows):
            return Decision(True, "first model: better than base_lm on every key metric", rows)
        return Decision(False, "first model does not beat base_lm: " + _why(rows), rows)
    rows = paired_rows(mine, champion, margins, labels[0], confidence=confidence, min_n=min_n)
    if reference is not None:
        rows += paired_rows(mine, reference, margins, labels[1], confidence=confidence, min_n=min_n)
    if all(r["ok"] for r in rows):
        return Decision(True, "non-inferior to the champion" + (" and the reference" if reference is not None else "")
                        + " on every key metric", rows)
    return Decision(False, "not shown non-inferior: " + _why(rows), rows)


def key_scores(client: MlflowClient, name: str, version: str) -> pd.DataFrame:
    """Per-record key scores the benchmark stored for ``version`` (empty when it has none)."""
    import tempfile

    import mlflow

    run_id = client.get_model_version(name, version).tags.get("benchmark.mlflow_run_id")
    if not run_id:
        return pd.DataFrame(columns=["method", "metric", "record_id", "score"])
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=KEY_SCORES, dst_path=tmp)
        return pd.read_csv(path, dtype={"record_id": str})


def _maemi(scores: pd.DataFrame) -> pd.DataFrame:
    return scores[scores["method"] == "maemi"]


@dataclass(frozen=True)
class SharedLock:
    """The registry lock of a multi-host deployment: a PostgreSQL advisory lock in the shared
    database (:mod:`maemi_core.shared_database`), keyed by the registered model's name."""
    url: str
    name: str

    def __repr__(self) -> str:   # never print the URL (it holds a password)
        return f"SharedLock(name={self.name!r})"


@contextmanager
def registry_lock(path: "Path | SharedLock", timeout_s: float = 600.0):
    """Exclusive for one registered model: across threads and processes on this host (fcntl on
    ``path``), or across every host of a deployment (a :class:`SharedLock`). Waits at most
    ``timeout_s`` (a holder that hangs never blocks promotion forever): then ``LockTimeout``."""
    from maemi_core.shared_database import LockTimeout

    if isinstance(path, SharedLock):
        from maemi_core.shared_database import advisory_lock

        with _THREAD_LOCK, advisory_lock(path.url, f"registry:{path.name}"):
            yield
        return
    from maemi_core.shared_database import host_file_lock

    if not _THREAD_LOCK.acquire(timeout=timeout_s):
        raise LockTimeout(f"the registry lock {path} was held by another thread of this process for {timeout_s:g} s")
    try:
        with host_file_lock(path, timeout_s, f"the registry lock {path} (nothing was promoted)"):
            yield
    finally:
        _THREAD_LOCK.release()


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


def reference_version(client: MlflowClient, name: str, log: Callable[[str], None] = lambda m: None) -> Optional[str]:
    """The reference (best champion so far), or None when there is none or it no longer exists
    in the registry (deleted): then the champion alone is compared with, and the reason is logged."""
    ref = client.get_registered_model(name).tags.get(REFERENCE_TAG) or None
    if ref is None:
        return None
    try:
        client.get_model_version(name, ref)
    except Exception as e:   # noqa: BLE001 - a deleted version, whatever the store says about it
        if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(e, "error_code", "")) and "not found" not in str(e).lower() \
                and "does not exist" not in str(e).lower():
            raise
        log(f"reference v{ref} of {name} no longer exists in the registry: compared with the champion only")
        return None
    return ref


def has_key_scores(client: MlflowClient, name: str, version: str) -> bool:
    """Whether ``version``'s benchmark stored per-record key scores (versions benchmarked before
    they existed did not)."""
    run_id = client.get_model_version(name, version).tags.get("benchmark.mlflow_run_id")
    return bool(run_id) and any(a.path == KEY_SCORES for a in client.list_artifacts(run_id, "reports/samples"))


EVALUATION_HASH = "benchmark.evaluation_hash"


def _stale(client: MlflowClient, name: str, version: str, evaluation_hash: str) -> bool:
    """Measured under other evaluation settings than ``evaluation_hash`` (other records or
    references, decoding, category-scoring settings, metric or benchmark code; see
    ``maemi_core.evaluation.benchmark_run.evaluation_hash``), or without per-record scores: the
    blocking check re-evaluates such a champion / reference before comparing."""
    return (client.get_model_version(name, version).tags.get(EVALUATION_HASH) != evaluation_hash
            or not has_key_scores(client, name, version))


def _auc(tags: dict) -> Optional[tuple[float, float, float, int]]:
    try:
        return (float(tags[f"benchmark.{AUC}"]), float(tags[f"benchmark.{AUC}_ci_low"]),
                float(tags[f"benchmark.{AUC}_ci_high"]), int(float(tags.get("benchmark.classification_images", 0))))
    except (KeyError, ValueError):
        return None


def evaluate(client: MlflowClient, name: str, version: str, champion: Optional[str], margins: dict[str, float],
             confidence: float = 0.95, first_must_beat_base_lm: bool = True, require_grounding: bool = True,
             min_n: int = MIN_RECORDS, log: Callable[[str], None] = lambda m: None) -> Decision:
    """The decision for ``version`` against ``champion`` (and the reference) as the registry
    stands; moves nothing."""
    tags = client.get_model_version(name, version).tags
    if tags.get(ROLLED_BACK_TAG):
        return Decision(False, f"v{version} was rolled back ({tags[ROLLED_BACK_TAG]}); automation never promotes "
                               "it again")
    my_hash = tags.get(EVALUATION_HASH)
    if not my_hash:
        return Decision(False, f"v{version} has no benchmark under the current evaluation settings: materialize "
                               "benchmark_tables")
    mine = key_scores(client, name, version) if has_key_scores(client, name, version) else pd.DataFrame()
    if mine.empty:
        return Decision(False, f"v{version} has no per-record key scores ({KEY_SCORES}): re-run benchmark_tables")
    grounding = (mine, _auc(tags)) if require_grounding else None
    if champion is None:
        if not first_must_beat_base_lm and grounding is None:
            return Decision(True, "first model: no champion yet (promotion.first_must_beat_base_lm is off)")
        if not first_must_beat_base_lm:
            rows, failed = grounding_rows(mine, margins, confidence, grounding[1], min_n)
            return Decision(not failed, "first model: " + ("not grounded: " + "; ".join(failed) if failed else
                                                           "grounded (beats maemi_gates_closed, base_lm and majority)"),
                            rows)
        return decide(_maemi(mine), None, margins, base_lm=mine[mine["method"] == "base_lm"], confidence=confidence,
                      grounding=grounding, min_n=min_n)
    reference = reference_version(client, name, log)
    others = [champion] + ([reference] if reference and reference not in (champion, str(version)) else [])
    for v in others:
        if _stale(client, name, v, my_hash):
            return Decision(False, f"v{v} was measured on other benchmark records or under other evaluation "
                                   f"settings than v{version}, or without per-record scores: re-run the promotion "
                                   "check (benchmark_tables' blocking check re-evaluates it)")
    theirs = {v: _maemi(key_scores(client, name, v)) for v in others}
    return decide(_maemi(mine), theirs[champion], margins, theirs.get(reference) if len(others) > 1 else None,
                  confidence=confidence, labels=(f"champion v{champion}", f"reference v{reference}"),
                  grounding=grounding, min_n=min_n)


def promote_if_not_worse(name: str, version: str, margins: dict[str, float], lock_path: Path, log_path: Path,
                         run_id: str = "", log: Callable[[str], None] = lambda m: None,
                         _between: Callable[[], None] = lambda: None, confidence: float = 0.95,
                         first_must_beat_base_lm: bool = True, require_grounding: bool = True,
                         min_n: int = MIN_RECORDS) -> Decision:
    """Compare ``version`` with the current champion (and the reference) and move ``champion``
    to it when the rules hold; record the decision either way. Safe against concurrent callers."""
    client = MlflowClient()
    version = str(version)
    with registry_lock(lock_path):
        champion = alias_version(name, CHAMPION)
        if champion == version:
            return Decision(False, f"version {version} already is the champion")
        decision = evaluate(client, name, version, champion, margins, confidence, first_must_beat_base_lm,
                            require_grounding, min_n, log)
        _between()          # tests widen the race window here
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, version)
            reference = reference_version(client, name, log)
            against_ref = [r for r in decision.rows if r["against"].startswith("reference")] or \
                [r for r in decision.rows if r["against"].startswith("champion")]
            if champion is None or reference is None or (against_ref and all(r["diff"] > 0 for r in against_ref)):
                client.set_registered_model_tag(name, REFERENCE_TAG, version)
        after = version if decision.promote else champion
        record(client, name, version, "promote", "promoted" if decision.promote else "rejected",
               decision.reason, champion, after, decision.table(), run_id, log_path)
        log(f"{name} v{version}: {'promoted to champion' if decision.promote else 'not promoted'} ({decision.reason})")
        _log_rows(decision, log)
        return decision


def rollback(name: str, lock_path: Path, log_path: Path, run_id: str = "") -> tuple[str, str]:
    """Move ``champion`` back to the version it replaced and mark the replaced one rolled back
    (automation never promotes it again); returns (from, to)."""
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
        client.set_model_version_tag(name, current, ROLLED_BACK_TAG, _now())
        # The reference stays where it is, even when it is the version rolled back: its measured
        # scores remain the bar, so a rollback never lowers what the next challenger must reach.
        reference = reference_version(client, name)
        kept = f"; the reference stays v{reference}" if reference else ""
        record(client, name, previous, "rollback", "rolled back",
               f"champion moved back from v{current} to v{previous}{kept}",
               current, previous, None, run_id or f"cli:{os.getpid()}", log_path)
        return current, previous


# --- the pipeline's entry points (benchmark_tables' blocking check, model_promotion) -------------

def registry_paths(cfg) -> tuple["Path | SharedLock", Path]:
    """(the promotion lock, the local promotion log). The lock is the shared database's advisory
    lock when one is configured, else a file lock in the workdir. The log is a local view: the
    record every host sees is the decision's tags on the model version."""
    from maemi_core.model_registry import registered_model_name
    from maemi_core.shared_database import shared_database_url

    d = cfg.workdir_path / "registry"
    url = shared_database_url(cfg)
    lock = SharedLock(url, registered_model_name(cfg.dataset.name)) if url else d / "registry.lock"
    return lock, d / "promotion_log.csv"


def benchmarked_version(cfg) -> tuple[str, str]:
    """(registered model, version) that this run's benchmark_tables evaluated: the version is
    pinned through the run's files, never re-resolved from the moving ``challenger`` alias."""
    import json

    from maemi_core.evaluation.benchmark_run import reports_dir

    path = reports_dir(cfg) / "benchmark.json"
    if not path.is_file():
        raise LookupError(f"no benchmark at {path}: materialize benchmark_tables first")
    bench = json.loads(path.read_text())
    if not bench.get("version"):
        raise LookupError(f"{path} names no registered version (a benchmark of a local package): "
                          "materialize maemi_model and benchmark_tables with MLflow tracking")
    return bench["registered_model"], str(bench["version"])


def gate_challenger(cfg, manifest, records, tracker=None, log: Callable[[str], None] = lambda m: None) -> Decision:
    """The blocking check before promotion: the benchmarked version against the champion and the
    reference on the same benchmark records. When one of them was measured on other records (new
    fab data changed the test split) or under other evaluation settings, it is re-evaluated
    first. The decision is recorded once, by ``model_promotion`` (which re-compares under the
    registry lock): a rejection is a decision, not a failure."""
    from maemi_core.registry.registered_benchmark import benchmark_registered_model

    name, version = benchmarked_version(cfg)
    client = MlflowClient()
    champion = alias_version(name, CHAMPION)
    if champion == version:
        return Decision(True, f"v{version} already is the champion")
    my_hash = client.get_model_version(name, version).tags.get(EVALUATION_HASH, "")
    for v in {champion, reference_version(client, name, log)} - {None, version}:
        if _stale(client, name, v, my_hash):
            log(f"v{v} was measured on other records or under other evaluation settings; re-evaluating it as "
                f"v{version} was")
            # Into a folder of its own: never into this run's reports, which may already be published.
            import uuid

            out = cfg.workdir_path / "registry" / "reevaluations" / f"v{v}-{uuid.uuid4().hex[:12]}"
            benchmark_registered_model(cfg, manifest, records, tracker, log, version=v, out_dir=out)
    p = cfg.promotion
    decision = evaluate(client, name, version, champion, p.key_metrics, p.confidence, p.first_must_beat_base_lm,
                        p.require_grounding, p.min_records, log)
    _log_rows(decision, log)
    return decision


def _log_rows(decision: Decision, log: Callable[[str], None]) -> None:
    for r in decision.rows:
        if r["n"]:
            detect = f"{r['detectable']:.4f}" if r.get("detectable") is not None else "n/a"
            log(f"  {r['metric']} vs {r['against']}: {r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}], "
                f"margin {r['margin']:g}, n {r['n']}, detectable difference {detect}")


def promote_challenger(cfg, run_id: str = "", log: Callable[[str], None] = lambda m: None) -> dict:
    """Move ``champion`` to the version this run benchmarked if the rules (still) hold."""
    name, version = benchmarked_version(cfg)
    lock, log_path = registry_paths(cfg)
    decision = promote_if_not_worse(name, version, cfg.promotion.key_metrics, lock, log_path, run_id, log,
                                    confidence=cfg.promotion.confidence,
                                    first_must_beat_base_lm=cfg.promotion.first_must_beat_base_lm,
                                    require_grounding=cfg.promotion.require_grounding,
                                    min_n=cfg.promotion.min_records)
    return {"registered_model": name, "challenger": version, "champion": alias_version(name, CHAMPION),
            "decision": decision, "log": read_log(log_path)}
