"""The chat page (`maemi chat`) in headless Chromium, driven by Playwright, against tiny registered
versions (a champion and a challenger): two users upload micrographs and ask at the same time,
each reads their own answer from both versions with the versions named; the page makes no
request to any host but this one."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.conftest import REPO
from tests.registry_fixtures import register_tiny_models

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium not found: install it with scripts/install_chromium.sh (as root; .ci/run does)")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return register_tiny_models(tmp_path_factory.mktemp("chat"), ("champion", "challenger"))


@pytest.fixture(scope="module")
def chat_url(registry):
    """`maemi chat` on a free loopback port, stopped by its process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": tempfile.mkdtemp(prefix="maemi-chat-")}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "maemi"), "--config", str(registry.profile), "chat",
                             "--port", str(port)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise AssertionError("maemi chat did not come up:\n" + log.read().decode(errors="replace")[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _ask(page, images: list[Path], question: str) -> None:
    page.set_input_files("#images input[type=file]", [str(p) for p in images])
    page.wait_for_function(f"document.querySelectorAll('#images td.filename').length === {len(images)}")
    page.fill("#question textarea", question)
    page.click("#ask")


def _answered(page) -> dict[str, str]:
    """Both columns once the answers and the category scores are in."""
    for col in ("primary", "challenger"):
        page.wait_for_function(f"document.querySelector('#note-{col}').innerText.includes('category scores')",
                               timeout=60_000)
    return {col: page.input_value(f"#answer-{col} textarea") for col in ("primary", "challenger")} | {
        f"model-{col}": page.inner_text(f"#model-{col}") for col in ("primary", "challenger")}


@pytest.mark.timeout(300)
def test_two_users_ask_the_champion_and_the_challenger_on_a_page_that_stays_on_this_host(chat_url, elpv_paths):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: make venv")
    browser_path = chromium()
    one = [elpv_paths[0]]
    two = [elpv_paths[1], elpv_paths[2]]
    requests: list[str] = []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True, args=CHROMIUM_ARGS)
        try:
            users = [browser.new_context().new_page() for _ in range(2)]
            for page in users:
                page.on("request", lambda r: requests.append(r.url))
                page.goto(chat_url)
                page.wait_for_function("document.querySelector('#model-challenger')?.innerText.includes('version')",
                                       timeout=30_000)
            # Both ask before either answer is read: the page serves them at the same time.
            _ask(users[0], one, "What is shown?")
            _ask(users[1], two, "Describe the image.")
            first, second = _answered(users[0]), _answered(users[1])
            # The first user comes back and asks the second user's question alone: the same answers.
            users[0].reload()
            users[0].wait_for_function("document.querySelector('#model-challenger')?.innerText.includes('version')",
                                       timeout=30_000)
            _ask(users[0], two, "Describe the image.")
            alone = _answered(users[0])
        finally:
            browser.close()

    for got in (first, second, alone):
        assert "maemi-chattest" in got["model-primary"] and "version 1" in got["model-primary"]
        assert "@champion" in got["model-primary"]
        assert "version 2" in got["model-challenger"] and "@challenger" in got["model-challenger"]
        assert got["primary"].strip() and not got["primary"].startswith("error")
        assert got["challenger"].strip() and not got["challenger"].startswith("error")
    assert first["primary"] != second["primary"]                         # each user got their own answer
    assert alone["primary"] == second["primary"] and alone["challenger"] == second["challenger"]
    assert second["primary"] != second["challenger"]                     # two versions, two answers
    foreign = [u for u in requests if urlparse(u).scheme not in ("data", "blob")
               and urlparse(u).hostname not in ("127.0.0.1", "localhost")]
    assert requests and not foreign, foreign


def test_streamed_text_is_the_answer(elpv_paths):
    """The page shows the answer as the model's streamer hands it over; joined, it is the answer."""
    import base64

    import torch

    from maemi_core.model.generation import generate_answers
    from maemi_core.registry.chat import _streamer
    from maemi_core.registry.maemi_pyfunc import decode_image, with_image_markers
    from tests.test_maemi_model import tiny_model

    model = tiny_model()
    with torch.no_grad():
        model.lm.model.norm.weight.mul_(-1)          # words, not a repeated newline (registry_fixtures)
    image = decode_image(base64.b64encode(elpv_paths[0].read_bytes()).decode(), model.cfg.image_size)
    parts: list[str] = []
    answer = generate_answers(model, [with_image_markers("What is shown?", 1)], [[image]], max_new_tokens=8,
                              streamer=_streamer(model.tokenizer, parts))[0]
    assert answer and len(parts) > 1 and "".join(parts).strip() == answer
