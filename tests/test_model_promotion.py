"""Promotion rules on per-record scores (paired intervals, non-inferiority margins, the first
version against base_lm, the reference that stops a ratchet), rollback marks, concurrent
challengers, and a failing registry - against a real MLflow registry (sqlite)."""

from __future__ import annotations

import threading
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from maemi_core.model.category_scoring import balanced_weights
from maemi_core.registry.model_promotion import (
    BALANCED, REFERENCE_TAG, ROLLED_BACK_TAG, decide, grounding_rows, promote_if_not_worse, read_log, rollback,
)
from maemi_core.model_registry import CHAMPION, alias_version

MARGINS = {"classification.zero_shot_top1": 0.05, "vqa.meteor": 0.02}
N = 400
RNG = np.random.default_rng(0)
TOP1 = (RNG.random(N) < 0.7).astype(float)          # one fixed set of test images
METEOR = RNG.uniform(0.2, 0.6, N)                   # and VQA records
LABELS = RNG.integers(0, 3, N)                      # the images' categories (3, about balanced)


def scores(top1=TOP1, meteor=METEOR, method="maemi") -> pd.DataFrame:
    return pd.concat([
        pd.DataFrame({"method": method, "metric": "classification.zero_shot_top1",
                      "record_id": [f"img{i}" for i in range(len(top1))], "score": top1}),
        pd.DataFrame({"method": method, "metric": BALANCED, "record_id": [f"img{i}" for i in range(len(top1))],
                      "score": top1 * balanced_weights(LABELS[:len(top1)])}),
        pd.DataFrame({"method": method, "metric": "vqa.meteor",
                      "record_id": [f"vqa{i}" for i in range(len(meteor))], "score": meteor}),
    ], ignore_index=True)


def flip(top1: np.ndarray, k: int, to: float) -> np.ndarray:
    """``top1`` with the first ``k`` images that are not ``to`` set to ``to``."""
    out = top1.copy()
    out[np.flatnonzero(out != to)[:k]] = to
    return out


BASE_LM = scores(flip(TOP1, 120, 0.0), METEOR - 0.1, method="base_lm")
GATES_CLOSED = scores(flip(TOP1, 120, 0.0), METEOR - 0.15, method="maemi_gates_closed")
MAJORITY = scores((LABELS == 0).astype(float), METEOR * 0, method="majority").query("metric != 'vqa.meteor'")
# What a benchmark stores beside MAEMI's own scores: the rows the grounding gate compares with.
OTHERS = pd.concat([BASE_LM, GATES_CLOSED, MAJORITY], ignore_index=True)


def test_rules_paired_intervals_margins_first_version_and_missing():
    mine = scores()
    same = decide(mine, scores(), MARGINS)
    assert same.promote and all(r["ok"] and r["diff"] == 0 for r in same.rows)
    better = decide(scores(meteor=METEOR + 0.05), scores(), MARGINS)
    assert better.promote
    within = decide(scores(meteor=METEOR - 0.01 + RNG.normal(0, 0.005, N)), scores(), MARGINS)
    assert within.promote                                   # 0.01 worse, margin 0.02, narrow interval
    worse = decide(scores(flip(TOP1, 40, 0.0)), scores(), MARGINS)   # top-1 0.10 lower
    assert not worse.promote and "classification.zero_shot_top1" in worse.reason and "vqa.meteor" not in worse.reason
    # The same mean, but on 10 records the interval is too wide to show non-inferiority.
    noisy = scores(meteor=METEOR[:10] + RNG.normal(0, 0.1, 10), top1=TOP1[:10])
    d = decide(noisy, scores(meteor=METEOR[:10], top1=TOP1[:10]), MARGINS)
    assert not d.promote and all(r["detectable"] > 0.02 for r in d.rows if r["metric"] == "vqa.meteor")
    first = decide(mine, None, MARGINS, base_lm=BASE_LM)
    assert first.promote and "base_lm" in first.reason
    loses_to_base = decide(scores(meteor=METEOR - 0.2), None, MARGINS, base_lm=BASE_LM)
    assert not loses_to_base.promote and "vqa.meteor" in loses_to_base.reason
    assert not decide(mine, None, MARGINS, base_lm=None).promote   # nothing to beat: nothing assumed
    missing = decide(mine[mine["metric"] == "vqa.meteor"], scores(), MARGINS)
    assert not missing.promote and "missing" in missing.reason
    assert list(worse.table().columns) == ["against", "metric", "challenger", "other", "diff", "ci_low", "ci_high",
                                           "n", "margin", "detectable", "ok"]


def test_grounding_gate_refuses_image_blind_and_constant_category_models_and_names_the_comparison():
    everyone = pd.concat([scores(), OTHERS], ignore_index=True)
    rows, failed = grounding_rows(everyone, MARGINS)
    assert not failed and {r["against"] for r in rows} == {"maemi_gates_closed", "base_lm", "majority"}
    grounded = decide(scores(), None, MARGINS, base_lm=BASE_LM, grounding=(everyone, None))
    assert grounded.promote and "grounded" in grounded.reason

    # Answers that do not depend on the image: MAEMI scores exactly what its gates-closed self scores.
    blind = pd.concat([scores(method="maemi"), scores(method="maemi_gates_closed"),
                       BASE_LM, MAJORITY], ignore_index=True)
    d = decide(scores(), None, MARGINS, base_lm=BASE_LM, grounding=(blind, None))
    assert not d.promote and "not grounded" in d.reason and "maemi_gates_closed on vqa.meteor" in d.reason

    # Captions that use the image but a category answer constant on the majority class (the
    # failure the demo model had): refused against majority, on balanced accuracy and macro AUC.
    constant = (LABELS == 0).astype(float)
    const = pd.concat([scores(top1=constant), BASE_LM, GATES_CLOSED, MAJORITY], ignore_index=True)
    d = decide(scores(top1=constant), None, MARGINS, base_lm=BASE_LM, grounding=(const, (0.5, 0.5, 0.5, N)))
    assert not d.promote and "does not beat majority" in d.reason and "macro_auc" in d.reason
    assert "maemi_gates_closed" not in d.reason                   # the text comparisons pass
    # The same, but its category scores rank images by class (macro AUC interval above 0.5): one
    # of the two majority comparisons is enough.
    ranked = decide(scores(top1=constant), None, MARGINS, grounding=(const, (0.71, 0.66, 0.76, N)),
                    base_lm=scores(top1=constant * 0, meteor=METEOR - 0.1, method="base_lm"))
    assert ranked.promote, ranked.reason

    # No image-free rows (evaluation.no_vision_baseline off): refused with what to do, never assumed.
    d = decide(scores(), None, MARGINS, base_lm=BASE_LM, grounding=(pd.concat([scores(), MAJORITY]), None))
    assert not d.promote and "no_vision_baseline" in d.reason


@pytest.fixture
def registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    client.create_registered_model("maemi-test")
    exp = client.create_experiment("bench", artifact_location=(tmp_path / "artifacts").as_uri())

    def version(maemi: pd.DataFrame, records_hash: str = "h1") -> str:
        """A registered version with a benchmark run holding its per-record key scores."""
        v = client.create_model_version("maemi-test", source=str(tmp_path / "pkg")).version
        d = tmp_path / f"scores-v{v}"
        d.mkdir()
        pd.concat([maemi, OTHERS]).to_csv(d / "key_scores.csv", index=False)
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifact(str(d / "key_scores.csv"), artifact_path="reports/samples")
        client.set_model_version_tag("maemi-test", v, "benchmark.mlflow_run_id", run.info.run_id)
        client.set_model_version_tag("maemi-test", v, "benchmark.evaluation_hash", records_hash)
        return str(v)

    yield client, version, tmp_path / "registry.lock", tmp_path / "promotion_log.csv"
    mlflow.set_tracking_uri(None)


def test_first_better_worse_rollback_and_no_repromotion_are_recorded(registry):
    client, version, lock, log = registry
    v1 = version(scores())
    assert promote_if_not_worse("maemi-test", v1, MARGINS, lock, log, run_id="r1").promote
    assert alias_version("maemi-test", CHAMPION) == v1
    assert client.get_registered_model("maemi-test").tags[REFERENCE_TAG] == v1
    v2 = version(scores(flip(TOP1, 30, 1.0), METEOR + 0.03))       # better on both
    assert promote_if_not_worse("maemi-test", v2, MARGINS, lock, log, run_id="r2").promote
    assert client.get_registered_model("maemi-test").tags[REFERENCE_TAG] == v2   # the best so far
    v3 = version(scores(flip(TOP1, 30, 1.0), METEOR - 0.05))
    d3 = promote_if_not_worse("maemi-test", v3, MARGINS, lock, log, run_id="r3")
    assert not d3.promote and alias_version("maemi-test", CHAMPION) == v2
    tags = client.get_model_version("maemi-test", v3).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.previous_champion"] == v2
    assert tags["promotion.dagster_run_id"] == "r3" and "vqa.meteor" in tags["promotion.reason"]
    assert '"ci_low"' in tags["promotion.metrics"] and '"detectable"' in tags["promotion.metrics"]
    v4 = version(scores(), records_hash="other")           # measured on different records: never compared
    d4 = promote_if_not_worse("maemi-test", v4, MARGINS, lock, log)
    assert not d4.promote and "other benchmark records" in d4.reason

    assert rollback("maemi-test", lock, log) == (v2, v1)
    assert alias_version("maemi-test", CHAMPION) == v1
    assert client.get_model_version("maemi-test", v1).tags["rollback.previous_champion"] == v2
    assert client.get_model_version("maemi-test", v2).tags[ROLLED_BACK_TAG]
    # A rollback never lowers the bar: the reference keeps v2's measured scores.
    assert client.get_registered_model("maemi-test").tags[REFERENCE_TAG] == v2
    # `challenger` may still point at v2; automation must not put it back.
    again = promote_if_not_worse("maemi-test", v2, MARGINS, lock, log, run_id="r5")
    assert not again.promote and "rolled back" in again.reason and alias_version("maemi-test", CHAMPION) == v1
    with pytest.raises(LookupError, match="nothing to roll back"):
        rollback("maemi-test", lock, log)               # v1 was the first champion
    entries = read_log(log)
    assert list(entries["action"]) == ["promote"] * 4 + ["rollback", "promote"]
    assert list(entries["decision"]) == ["promoted", "promoted", "rejected", "rejected", "rolled back", "rejected"]
    assert list(entries["champion_after"]) == [v1, v2, v2, v2, v1, v1]


def test_too_few_records_or_a_deleted_reference_are_stated_never_guessed(registry):
    client, version, lock, log = registry
    # One record collapses an interval: below promotion.min_records the comparison refuses, saying so.
    few = decide(scores(meteor=METEOR[:10] + 0.1, top1=TOP1[:10]), scores(meteor=METEOR[:10], top1=TOP1[:10]),
                 MARGINS, min_n=20)
    assert not few.promote and "too few to decide" in few.reason
    v1 = version(scores())
    v2 = version(scores(flip(TOP1, 30, 1.0), METEOR + 0.03))
    assert promote_if_not_worse("maemi-test", v1, MARGINS, lock, log).promote
    assert promote_if_not_worse("maemi-test", v2, MARGINS, lock, log).promote
    rollback("maemi-test", lock, log)                       # champion v1, reference still v2
    client.delete_model_version("maemi-test", v2)           # the reference is gone from the registry
    said = []
    v3 = version(scores(meteor=METEOR + 0.01))
    d = promote_if_not_worse("maemi-test", v3, MARGINS, lock, log, log=said.append)
    assert d.promote and not any(r["against"].startswith("reference") for r in d.rows)
    assert any(f"reference v{v2} of maemi-test no longer exists" in m for m in said)


def test_another_repetition_penalty_makes_the_champion_stale_so_it_is_rescored_first(registry, tmp_path):
    """Scores are compared only under equal evaluation settings: the benchmark's evaluation hash
    moves with the decoding settings (not with the batch size), and a champion measured under
    another hash is not compared: gate_challenger re-evaluates it (benchmark_registered_model)
    before deciding."""
    from maemi_core.config import load_config
    from maemi_core.evaluation.benchmark_run import evaluation_hash
    from tests.conftest import write_profile

    cfg = load_config(write_profile(tmp_path))
    base = evaluation_hash(cfg, "records")
    penalised = cfg.model_copy(deep=True)
    penalised.evaluation.repetition_penalty = 1.2
    batched = cfg.model_copy(deep=True)
    batched.evaluation.batch_size = 3
    assert evaluation_hash(penalised, "records") != base == evaluation_hash(batched, "records")
    assert evaluation_hash(cfg, "other records") != base

    client, version, lock, log = registry
    v1 = version(scores(), records_hash=base)
    assert promote_if_not_worse("maemi-test", v1, MARGINS, lock, log).promote
    v2 = version(scores(meteor=METEOR + 0.05), records_hash=evaluation_hash(penalised, "records"))
    d = promote_if_not_worse("maemi-test", v2, MARGINS, lock, log)
    assert not d.promote and "other evaluation settings" in d.reason and alias_version("maemi-test", CHAMPION) == v1


def test_a_first_version_that_does_not_beat_base_lm_is_not_promoted(registry):
    client, version, lock, log = registry
    v1 = version(scores(BASE_LM.query("metric == 'classification.zero_shot_top1'")["score"].to_numpy(), METEOR - 0.1))
    d = promote_if_not_worse("maemi-test", v1, MARGINS, lock, log)
    assert not d.promote and "base_lm" in d.reason and alias_version("maemi-test", CHAMPION) is None


def test_no_ratchet_a_series_of_slightly_worse_challengers_stays_within_the_margin_of_the_reference(registry):
    """Each challenger is 0.015 METEOR below the one before (margin 0.02): compared only with the
    champion, every one would pass and the champion would drift down without bound."""
    client, version, lock, log = registry
    noise = np.random.default_rng(1)
    versions = [version(scores(meteor=METEOR - 0.015 * k + noise.normal(0, 0.002, N))) for k in range(6)]
    promoted = [promote_if_not_worse("maemi-test", v, MARGINS, lock, log).promote for v in versions]
    assert promoted[:2] == [True, True] and not any(promoted[2:])
    champion = alias_version("maemi-test", CHAMPION)
    assert champion == versions[1] and client.get_registered_model("maemi-test").tags[REFERENCE_TAG] == versions[0]
    reasons = read_log(log)["reason"].tolist()
    assert all("reference v" in r for r in reasons[2:])


def test_concurrent_challengers_never_leave_a_worse_champion(registry):
    client, version, lock, log = registry
    v0 = version(scores())
    promote_if_not_worse("maemi-test", v0, MARGINS, lock, log)
    strong = version(scores(meteor=METEOR + 0.10))
    weak = version(scores(meteor=METEOR + 0.04))        # better than v0, worse than `strong` by more than the margin
    barrier = threading.Barrier(2)
    errors = []

    def run(v: str, delay: float) -> None:
        try:
            barrier.wait()
            time.sleep(delay)
            # the pause between reading the champion and moving the alias is where an unlocked
            # version lets the weaker challenger overwrite the stronger one
            promote_if_not_worse("maemi-test", v, MARGINS, lock, log, _between=lambda: time.sleep(0.3))
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(strong, 0.0)), threading.Thread(target=run, args=(weak, 0.05))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert alias_version("maemi-test", CHAMPION) == strong
    decisions = read_log(log).set_index("version")["decision"]
    assert decisions[strong] == "promoted" and decisions[weak] == "rejected"


def test_a_registry_that_answers_500_fails_promotion_loudly_and_moves_nothing(registry, tmp_path, monkeypatch):
    """A tracking server answering 500 (a loopback HTTP server) must never read as "no champion
    yet": the promotion raises, naming the server, instead of promoting without comparison."""
    import http.server

    from maemi_core.model_registry import RegistryError

    client, version, lock, log = registry
    v1 = version(scores())
    promote_if_not_worse("maemi-test", v1, MARGINS, lock, log)
    seen = []

    class Broken(http.server.BaseHTTPRequestHandler):
        def _fail(self):
            seen.append(self.path)
            body = b'{"error_code": "INTERNAL_ERROR", "message": "database is down"}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = _fail

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    sqlite_uri = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(url)              # (MLflow also exports it as MLFLOW_TRACKING_URI)
        with pytest.raises(RegistryError, match=r"127\.0\.0\.1.*Nothing was promoted"):
            promote_if_not_worse("maemi-test", "2", MARGINS, lock, log)
        with pytest.raises(RegistryError):
            alias_version("maemi-test", CHAMPION)
    finally:
        server.shutdown()
        server.server_close()
        mlflow.set_tracking_uri(sqlite_uri)                            # the fixture's sqlite registry
    assert seen                                                     # the server was really asked
    assert alias_version("maemi-test", CHAMPION) == v1
    assert list(read_log(log)["version"]) == [v1]                   # no decision was recorded for the failure


def test_a_missing_alias_or_model_is_none_not_an_error(registry):
    assert alias_version("maemi-test", CHAMPION) is None            # model exists, alias does not
    assert alias_version("maemi-nothing", CHAMPION) is None         # model does not exist


def test_a_champion_benchmarked_without_per_record_scores_is_not_compared_blindly(registry):
    """A champion from before per-record scores existed: promotion asks for a re-evaluation
    (which the blocking check does) instead of failing on the missing file or comparing nothing."""
    client, version, lock, log = registry
    old = client.create_model_version("maemi-test", source="x").version
    client.set_model_version_tag("maemi-test", old, "benchmark.evaluation_hash", "h1")
    client.set_registered_model_alias("maemi-test", CHAMPION, old)
    new = version(scores())
    d = promote_if_not_worse("maemi-test", new, MARGINS, lock, log)
    assert not d.promote and "without per-record scores" in d.reason
    assert alias_version("maemi-test", CHAMPION) == str(old)


def test_the_registry_lock_gives_up_after_its_timeout_instead_of_waiting_forever(tmp_path):
    import fcntl

    from maemi_core.registry.model_promotion import registry_lock
    from maemi_core.shared_database import LockTimeout

    path = tmp_path / "registry.lock"
    with open(path, "a+") as holder:                 # another process's hold, as fcntl sees it
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        ready, release = ctx.Event(), ctx.Event()

        def hold():
            with open(path, "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                ready.set()
                release.wait(30)

        p = ctx.Process(target=hold)
        p.start()
        try:
            assert ready.wait(30)
            t0 = time.monotonic()
            with pytest.raises(LockTimeout, match="registry lock .* held by another process"):
                with registry_lock(path, timeout_s=0.5):
                    pass
            assert time.monotonic() - t0 < 10
        finally:
            release.set()
            p.join(30)
        del holder
    with registry_lock(path, timeout_s=5):          # free again: taken at once
        pass
