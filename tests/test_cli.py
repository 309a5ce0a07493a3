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


def test_one_shot_commands_print_the_answer_only_and_the_progress_with_verbose(tmp_path, elpv_paths):
    """`maemi ask` in a fresh process on a registered version (SmolLM2 as it ships, so its weights
    load like a real version's): stdout is the answer line and stderr is empty (no artifact-download
    or weight-loading bars); `classify --verbose` shows the progress, and no library deprecation
    warning."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import REPO
    from tests.registry_fixtures import register_tiny_models

    registry = register_tiny_models(tmp_path / "registry", lm_profile="default")
    maemi = [str(Path(sys.executable).parent / "maemi"), "--config", str(registry.profile)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_LOGGING_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env["OMP_NUM_THREADS"] = "1"

    def run(*args):
        done = subprocess.run(maemi + list(args), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout, done.stderr

    image = str(elpv_paths[0])
    out, err = run("ask", image, "What is shown?")
    assert out.strip() and out.count("\n") == 1 and out.endswith("\n"), repr(out)   # the answer, one line
    assert err == "", err
    out, err = run("classify", "--verbose", image)
    assert "defective" in out and "Downloading artifacts" in err and "Loading weights" in err, err
    assert "deprecated" not in err                             # the likelihood pass reads `cache`, not `past_key_values`
