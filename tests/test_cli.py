"""`maemi ask` / `classify` never print a silent empty line: an empty generation is stated on
stderr with exit status 3 (the model call is replaced; what is tested is the command's contract)."""

from __future__ import annotations

import pandas as pd

from maemi_core import cli
from maemi_core.registry import serving


def test_an_empty_answer_is_reported_not_printed(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(serving, "ask", lambda *a, **k: "  \n")
    rc = cli.main(["--config", "configs/tiny.yaml", "ask", "img.png", "Describe it.", "--model", "models:/m@x"])
    out = capsys.readouterr()
    assert rc == cli.EMPTY_ANSWER == 3 and out.out == "" and "empty answer" in out.err
    monkeypatch.setattr(serving, "ask", lambda *a, **k: "A cell.")
    assert cli.main(["--config", "configs/tiny.yaml", "ask", "img.png", "Describe it.", "--model", "models:/m@x"]) == 0
    assert capsys.readouterr().out.strip() == "A cell."


def test_classify_states_empty_generations(monkeypatch, capsys):
    table = pd.DataFrame({"image": ["a.png", "b.png"], "category": ["(unparsed)", "functional"],
                          "functional": [0.4, 0.9], "defective": [0.6, 0.1], "answer": ["", "functional cell"]})
    monkeypatch.setattr(serving, "classify", lambda *a, **k: table)
    rc = cli.main(["--config", "configs/tiny.yaml", "classify", "a.png", "b.png", "--model", "models:/m@x"])
    out = capsys.readouterr()
    assert rc == 3 and "a.png" in out.out and "1 of 2 generated answers were empty" in out.err


def test_tracking_follows_the_profile_then_the_environment(monkeypatch, capsys, tmp_path):
    from tests.conftest import write_profile

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["--config", "configs/tiny.yaml", "tracking"]) == 0
    assert capsys.readouterr().out.strip().startswith("sqlite:///")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert cli.main(["--config", "configs/tiny.yaml", "tracking"]) == 0
    assert capsys.readouterr().out.strip() == "http://127.0.0.1:5999"
    profile = write_profile(tmp_path)                       # a profile naming its own store wins
    assert cli.main(["--config", str(profile), "tracking"]) == 0
    assert capsys.readouterr().out.strip() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["--config", str(profile), "tracking", "model-uri"]) == 0
    assert capsys.readouterr().out.strip() == "models:/maemi-testset@champion"
