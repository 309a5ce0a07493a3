"""Two runs that log the same dataset at once (two `retune`s reading one manifest): MLflow's
store looks the dataset up, then inserts it; when the other run inserts in between, the insert
fails on the table's unique key. The project's `log_input` makes the call again and links the
run to the row the other run wrote."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
import sqlalchemy as sa
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.orm import Session

from maemi_core.tracking import log_input


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("race", artifact_location=(tmp_path / "artifacts").as_uri())
    yield uri, client, exp
    mlflow.set_tracking_uri(None)


def _other_run_inserts_first(uri: str, exp: str, dataset):
    """Right before this process writes, another run writes the same dataset's row: the
    interleaving of two processes in which both lookups found nothing. Returns the undo."""
    engine = sa.create_engine(uri)
    fired = []

    def insert_between_lookup_and_write(session, flush_context, instances):
        if fired or not any(type(o).__name__ == "SqlDataset" for o in session.new):
            return
        fired.append(True)
        with engine.begin() as conn:   # its own connection: the other process
            conn.execute(sa.text(
                "INSERT INTO datasets (dataset_uuid, experiment_id, name, digest, dataset_source_type, "
                "dataset_source) VALUES ('other', :exp, :name, :digest, 'code', '{}')"),
                {"exp": int(exp), "name": dataset.name, "digest": dataset.digest})

    event.listen(Session, "before_flush", insert_between_lookup_and_write)
    return lambda: event.remove(Session, "before_flush", insert_between_lookup_and_write)


def _dataset():
    return mlflow.data.from_pandas(pd.DataFrame({"image_id": ["a", "b"], "label": [0, 1]}),
                                   name="elpv", digest="d1g3st")


def test_a_dataset_inserted_by_another_run_in_between_is_linked_not_fatal(store):
    uri, client, exp = store
    dataset = _dataset()
    undo = _other_run_inserts_first(uri, exp, dataset)
    try:
        with mlflow.start_run(experiment_id=exp) as run:
            log_input(dataset, context="raw_images")
    finally:
        undo()
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("elpv", "d1g3st")]
    rows = sa.create_engine(uri).connect().execute(sa.text("SELECT dataset_uuid FROM datasets")).fetchall()
    assert [r[0] for r in rows] == ["other"]   # one row, the other run's, shared by both


def test_the_race_is_real_without_the_retry(store):
    """The same interleaving through plain `mlflow.log_input` fails: what the test above guards."""
    uri, client, exp = store
    dataset = _dataset()
    undo = _other_run_inserts_first(uri, exp, dataset)
    try:
        with mlflow.start_run(experiment_id=exp):
            with pytest.raises(mlflow.exceptions.MlflowException, match="UNIQUE constraint failed"):
                mlflow.log_input(dataset, context="raw_images")
    finally:
        undo()


def test_other_errors_are_raised_at_once(store, monkeypatch):
    calls = []

    def broken(dataset, context):
        calls.append(context)
        raise mlflow.exceptions.MlflowException("Run 'x' not found")

    monkeypatch.setattr(mlflow, "log_input", broken)
    with pytest.raises(mlflow.exceptions.MlflowException, match="not found"):
        log_input(_dataset(), context="raw_images")
    assert calls == ["raw_images"]
