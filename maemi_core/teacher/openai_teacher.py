"""A teacher behind any OpenAI-compatible chat-completions endpoint.

api.openai.com with a GPT-4-class vision model, or an on-prem server (vLLM, Ollama, TGI,
or ``maemi teacher-serve``). Images go as base64 data URLs, several per request for
multi-image prompts. Transport failures (429, 5xx, timeouts, dropped connections) are
retried with exponential backoff and full jitter, honouring ``Retry-After``; an empty or
refused answer is retried a bounded number of times and then reported as failed.
The API key comes from an environment variable and is never logged or returned.
"""

from __future__ import annotations

import base64
import io
import os
import random
import re
import time
from typing import Callable, Optional

import openai
from PIL import Image

from maemi_core.config import TeacherConfig
from maemi_core.data.image_io import load_rgb_uint8
from maemi_core.teacher.requests import PROMPT_FORMAT, TeacherAnswer, TeacherRequest, render_teacher_prompt

_REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|i can(?:'|no)t (help|assist|provide)|i am unable|i'm unable|as an ai)",
                      re.IGNORECASE)


class TeacherFailed(RuntimeError):
    """A request that stayed unanswered after every retry."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


def image_data_url(path: str, crop_bottom: int = 0, max_side: int = 1024) -> str:
    """PNG data URL of the image (data bar removed, longest side at most ``max_side``)."""
    arr = load_rgb_uint8(path)
    if crop_bottom:
        arr = arr[: arr.shape[0] - crop_bottom]
    im = Image.fromarray(arr)
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def is_refusal(text: str) -> bool:
    return not text.strip() or bool(_REFUSAL.match(text))


class OpenAITeacher:
    name = "openai"

    def __init__(self, cfg: TeacherConfig, api_key: Optional[str] = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        key = api_key if api_key is not None else os.environ.get(cfg.api_key_env)
        # Local servers need no key; the client insists on a non-empty string.
        self._client = openai.OpenAI(base_url=cfg.base_url, api_key=key or "not-needed",
                                     max_retries=0, timeout=cfg.timeout_s)
        self._sleep = sleep

    def identity(self) -> dict:
        c = self.cfg
        return {"teacher": self.name, "base_url": c.base_url, "model": c.model, "max_tokens": c.max_tokens,
                "temperature": c.temperature, "detail": c.detail, "prompt_format": PROMPT_FORMAT}

    def messages(self, request: TeacherRequest) -> list[dict]:
        content: list[dict] = [
            {"type": "image_url", "image_url": {"url": image_data_url(ref.path, ref.crop_bottom), "detail": self.cfg.detail}}
            for ref in request.images
        ]
        content.append({"type": "text", "text": render_teacher_prompt(request)})
        return [{"role": "system", "content": request.system}, {"role": "user", "content": content}]

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            return min(self.cfg.backoff_max_s, retry_after)
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** attempt)
        return random.uniform(0.5 * cap, cap)  # jitter: concurrent workers do not retry in lockstep

    @staticmethod
    def _retry_after(exc: openai.APIStatusError) -> Optional[float]:
        value = exc.response.headers.get("retry-after") if exc.response is not None else None
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def answer(self, request: TeacherRequest) -> TeacherAnswer:
        messages = self.messages(request)
        transport_errors = bad_answers = attempts = 0
        last = ""
        while True:
            attempts += 1
            try:
                resp = self._client.chat.completions.create(
                    model=self.cfg.model, messages=messages, max_tokens=self.cfg.max_tokens,
                    temperature=self.cfg.temperature)
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError, openai.APIResponseValidationError, ValueError) as exc:
                # ValueError / APIResponseValidationError: a 200 whose body is not the JSON it
                # should be (a proxy's error page, a cut-off response): transient like a 5xx.
                transport_errors += 1
                last = f"{type(exc).__name__}: {getattr(exc, 'status_code', '')} {str(exc)[:200]}"
                if transport_errors > self.cfg.max_retries:
                    raise TeacherFailed(f"gave up after {attempts} attempts: {last}", attempts) from exc
                retry_after = self._retry_after(exc) if isinstance(exc, openai.APIStatusError) else None
                self._sleep(self._backoff(transport_errors - 1, retry_after))
                continue
            except openai.APIStatusError as exc:  # 4xx other than 429: retrying will not help
                raise TeacherFailed(f"HTTP {exc.status_code}: {str(exc)[:300]}", attempts) from exc
            choice = resp.choices[0] if resp.choices else None
            text = (choice.message.content or "") if choice else ""
            refused = choice is None or choice.finish_reason == "content_filter" or is_refusal(text)
            if refused:
                bad_answers += 1
                last = f"empty or refused answer: {text[:120]!r}"
                if bad_answers > self.cfg.max_answer_retries:
                    raise TeacherFailed(f"gave up after {attempts} attempts: {last}", attempts)
                continue
            usage = resp.usage
            return TeacherAnswer(text=text.strip(), prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                                 completion_tokens=getattr(usage, "completion_tokens", 0) or 0, attempts=attempts)
