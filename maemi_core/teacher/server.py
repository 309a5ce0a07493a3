"""``maemi teacher-serve``: an OpenAI-compatible HTTP teacher on this host, backed by the
:class:`~maemi_core.teacher.measurement_teacher.MeasurementTeacher`.

Implements ``GET /v1/models`` and ``POST /v1/chat/completions`` (text + base64 ``image_url``
parts, several images per message). A site can point any OpenAI client at it; the tests
drive :class:`~maemi_core.teacher.openai_teacher.OpenAITeacher` through it for real.
``--fault 429 --fault 500`` makes the first requests fail with those statuses (a drill for
retry handling; ``--fault 200`` answers 200 with a body that is not JSON); ``--fail-fraction 0.3`` answers 500 to every request whose content falls in that
fraction (by hash, so retries of the same record fail too: a teacher that cannot answer some
records at all); ``GET /stats`` reports how many requests arrived.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np
from PIL import Image

from maemi_core.data.image_io import to_gray_array
from maemi_core.teacher.measurement_teacher import MeasurementTeacher
from maemi_core.teacher.requests import ImageRef, TeacherRequest, parse_teacher_prompt

GENERIC_FACTS = ["intensity", "particles", "edges", "texture", "uniformity"]


class TeacherHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, model: str, faults: list[int], api_key: Optional[str] = None, fail_fraction: float = 0.0):
        super().__init__(addr, _Handler)
        self.fail_fraction = fail_fraction
        self.model = model
        self.teacher = MeasurementTeacher()
        self.faults = list(faults)
        self.api_key = api_key
        self.lock = threading.Lock()
        self.requests = 0
        self.completions = 0


def _decode_image(url: str) -> tuple[str, np.ndarray]:
    if not url.startswith("data:"):
        raise ValueError("only base64 data URLs are accepted (this server never fetches URLs)")
    raw = base64.b64decode(url.split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        return hashlib.sha256(raw).hexdigest(), to_gray_array(im)


def answer_messages(teacher: MeasurementTeacher, messages: list[dict]) -> str:
    system = ""
    texts: list[str] = []
    images: list[tuple[str, np.ndarray]] = []
    for msg in messages:
        content = msg.get("content")
        if msg.get("role") == "system":
            system = content if isinstance(content, str) else ""
            continue
        if msg.get("role") != "user":
            continue
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                images.append(_decode_image(part["image_url"]["url"]))
    if not images:
        raise ValueError("the measurement teacher needs at least one image")
    text = "\n".join(texts)
    try:
        p = parse_teacher_prompt(text)
    except ValueError:  # a plain question from any client: describe what can be measured
        p = None
    if p is None or len(p.labels) != len(images):
        refs = [ImageRef(image_id=h, path="") for h, _ in images]
        req = TeacherRequest(task="vqa", question=text, images=refs[-1:], facts=GENERIC_FACTS, system=system,
                             technique="the imaging technique of the image", subject="image")
        return teacher.answer(req, grays=[images[-1][1]]).text
    refs = [ImageRef(image_id=h, path="", label=lab, pixel_size_nm=ps, metadata=tuple(meta.items()))
            for (h, _), lab, ps, meta in zip(images, p.labels, p.pixel_sizes, p.metadata)]
    req = TeacherRequest(task=p.task, question=p.question, images=refs, facts=p.facts, system=system,
                         technique=p.technique, subject=p.subject, query_label=p.query_label, categories=p.categories,
                         length=p.length)
    return teacher.answer(req, grays=[g for _, g in images]).text


class _Handler(BaseHTTPRequestHandler):
    server: TeacherHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: one line per request on stderr is noise in tests
        pass

    def _send(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, headers: Optional[dict] = None) -> None:
        self._send(status, {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                                      "code": status}}, headers)

    def _authorised(self) -> bool:
        if not self.server.api_key:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {self.server.api_key}"

    def do_GET(self):  # noqa: N802
        if self.path.rstrip("/") == "/v1/models":
            return self._send(200, {"object": "list", "data": [
                {"id": self.server.model, "object": "model", "created": 0, "owned_by": "maemi"}]})
        if self.path.rstrip("/") == "/stats":
            return self._send(200, {"requests": self.server.requests, "completions": self.server.completions})
        return self._error(404, f"no route {self.path}")

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        with self.server.lock:
            self.server.requests += 1
            fault = self.server.faults.pop(0) if self.server.faults else None
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        if not self._authorised():
            return self._error(401, "invalid API key")
        if fault == 200:   # a 200 whose body is not JSON (a proxy's error page, a truncated response)
            data = b'{"id": "chatcmpl-broken", "choices": [{"message": '
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if fault is not None:
            headers = {"Retry-After": "0"} if fault == 429 else None
            return self._error(fault, f"injected fault {fault}", headers)
        if self.server.fail_fraction and int(hashlib.sha256(body).hexdigest()[:8], 16) / 16 ** 8 < self.server.fail_fraction:
            return self._error(500, "injected persistent fault for this request")
        try:
            payload = json.loads(body)
            text = answer_messages(self.server.teacher, payload.get("messages", []))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            return self._error(400, f"bad request: {exc}")
        with self.server.lock:
            self.server.completions += 1
        prompt_tokens = sum(len(json.dumps(m).split()) for m in payload.get("messages", [])) // 4
        self._send(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": payload.get("model", self.server.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                      "total_tokens": prompt_tokens + len(text.split())},
        })


def serve(host: str = "127.0.0.1", port: int = 8765, model: str = "maemi-measurement-teacher",
          faults: Optional[list[int]] = None, api_key_env: Optional[str] = None, fail_fraction: float = 0.0) -> None:
    import signal

    # Stop on SIGTERM (systemd, docker, a test harness) even when the parent left it blocked
    # or ignored: a blocked signal mask is inherited by child processes.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    api_key = os.environ.get(api_key_env) if api_key_env else None
    server = TeacherHTTPServer((host, port), model, faults or [], api_key, fail_fraction)
    print(f"maemi teacher-serve listening on http://{host}:{server.server_address[1]}/v1 (model {model})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
