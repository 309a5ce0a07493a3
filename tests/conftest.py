"""Shared fixtures: real ELPV images, temporary ImageFolder trees and profiles."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from maemi_core.config import load_config  # noqa: E402
from maemi_core.data.sources import list_elpv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """The tests compute as the pipeline's steps do: torch's worker threads start with subnormals
    flushed, the main thread flushes them only inside a trainer (maemi_core.threads)."""
    from maemi_core.threads import start_workers_flushed

    start_workers_flushed()


@contextlib.contextmanager
def served_model(model_uri: str, env: dict, cwd=None, timeout: float = 300):
    """``mlflow models serve`` of ``model_uri`` on a free loopback port, yielding the port once
    ``/ping`` answers; stopped by its process group (never by name)."""
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The server's log goes to a file, not a pipe nobody reads while it serves (a full pipe would
    # block it); its tail is shown if it dies before answering.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    log.seek(0)
                    raise AssertionError(log.read().decode(errors="replace")[-3000:])
                assert time.time() < deadline, "mlflow models serve did not come up"
                time.sleep(1)
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # never leave a server behind
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def pytest_addoption(parser):
    parser.addoption("--deploy", action="store_true",
                     help="also run the tests marked `deploy` (real PostgreSQL, Redis, MLflow server, Celery "
                          "workers; `make test-deploy`)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--deploy"):
        return
    skip = pytest.mark.skip(reason="multi-host stack test: make test-deploy")
    for item in items:
        if "deploy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def elpv_paths() -> list[Path]:
    """A fixed handful of real ELPV cells (300x300 8-bit greyscale PNGs)."""
    return [c.path for c in list_elpv()[:40]]


def write_profile(tmp_path: Path, **dataset_overrides) -> Path:
    """A profile in ``tmp_path`` whose workdir and MLflow store live there too."""
    dataset = {"name": "testset", "kind": "imagefolder", "root": "images", "prompt_pack": "elpv",
               "split": {"train": 0.6, "val": 0.2, "test": 0.2}}
    dataset.update(dataset_overrides)
    profile = {
        "dataset": dataset,
        "workdir": "work",
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test"},
    }
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture
def profile_factory(tmp_path):
    def make(**overrides):
        return load_config(write_profile(tmp_path, **overrides))
    return make


def save_as(src: Path, dst: Path, mode: str = "L", fmt: str | None = None) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert(mode).save(dst, format=fmt)
    return dst


def save_tiff16(src: Path, dst: Path, pixel_width_m: float | None = None) -> Path:
    """A 16-bit greyscale TIFF, optionally with FEI/Thermo metadata (tag 34682)."""
    import tifffile

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        arr = (np.asarray(im.convert("L"), dtype=np.uint16) * 257)
    extratags = []
    if pixel_width_m is not None:
        text = f"[User]\nDate=01/01/2024\n[Scan]\nPixelWidth={pixel_width_m}\nPixelHeight={pixel_width_m}\n"
        extratags.append((34682, "s", 0, text, True))
    tifffile.imwrite(dst, arr, extratags=extratags)
    return dst


@pytest.fixture
def messy_imagefolder(tmp_path, elpv_paths) -> Path:
    """An ImageFolder with every kind of file a fab folder holds, good and bad."""
    root = tmp_path / "images"
    save_as(elpv_paths[0], root / "cracked" / "a.png")
    save_as(elpv_paths[1], root / "cracked" / "b_rgba.png", mode="RGBA")
    save_tiff16(elpv_paths[2], root / "cracked" / "c16.tif", pixel_width_m=2.5e-9)
    save_as(elpv_paths[3], root / "clean" / "d.jpg", mode="RGB", fmt="JPEG")
    save_as(elpv_paths[4], root / "clean" / "e.bmp", fmt="BMP")
    save_as(elpv_paths[5], root / "clean" / "nested" / "f.png")
    # Bad files.
    (root / "clean" / "empty.png").write_bytes(b"")
    full = save_as(elpv_paths[6], root / "clean" / "trunc.jpg", mode="RGB", fmt="JPEG").read_bytes()
    (root / "clean" / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (root / "clean" / "notes.txt").write_text("operator notes")
    (root / "clean" / "fake.png").write_bytes(b"this is not a png at all")
    save_as(elpv_paths[7], root / "stray.png")
    (root / "clean" / ".DS_Store").write_bytes(b"\0\0")
    return root


@pytest.fixture
def copy_file():
    def copy(src: Path, dst: Path) -> Path:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        return dst
    return copy
