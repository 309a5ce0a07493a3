"""Comparison rows from vision-language models served elsewhere (paper Tables 1, 3-6: LLaVA,
InstructBLIP, MiniGPT-4), reached as OpenAI-compatible chat-completions endpoints.

Each endpoint gets exactly the student's prompt: the images (base64 data URLs, in prompt
order) and the question without the ``<image>`` markers. An endpoint that cannot be reached
is reported as unavailable with the reason, never scored as zero. A private dataset is only
sent to an endpoint on this host (or listed in its ``on_prem_hosts``) unless the endpoint
says ``allow_external: true``; the check runs before any client exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import openai

from maemi_core.config import BaselineEndpoint, MaemiConfig
from maemi_core.teacher.openai_teacher import image_data_url
from maemi_core.teacher.privacy import PrivacyError, is_on_prem

IMAGE_TOKEN = "<image>"


@dataclass
class BaselineAnswers:
    name: str
    answers: dict[str, str] = field(default_factory=dict)   # record id -> answer
    unavailable: Optional[str] = None                        # why no answers, when so
    failed: int = 0


def check_baseline_privacy(cfg: MaemiConfig, ep: BaselineEndpoint) -> None:
    if cfg.dataset.private and not ep.allow_external and not is_on_prem(ep.base_url, ep.on_prem_hosts):
        raise PrivacyError(
            f"dataset '{cfg.dataset.name}' is private and baseline '{ep.name}' at {ep.base_url} is not on this host: "
            "no image was sent. Set allow_external: true on that baseline or list its host in on_prem_hosts.")


def ask_baseline(cfg: MaemiConfig, ep: BaselineEndpoint, records: list[dict],
                 crop_bottom: dict[str, int]) -> BaselineAnswers:
    """Answers of one endpoint for ``records`` (student prompts). The first connection failure
    marks the whole endpoint unavailable; a single bad request counts as failed."""
    result = BaselineAnswers(ep.name)
    try:
        check_baseline_privacy(cfg, ep)
    except PrivacyError as exc:
        result.unavailable = str(exc)
        return result
    key = os.environ.get(ep.api_key_env) if ep.api_key_env else None
    client = openai.OpenAI(base_url=ep.base_url, api_key=key or "not-needed", max_retries=2, timeout=ep.timeout_s)
    for r in records:
        paths = r.get("images") or [r["image"]]
        content = [{"type": "image_url", "image_url": {"url": image_data_url(p, crop_bottom.get(i, 0))}}
                   for p, i in zip(paths, r["image_ids"])]
        question = r["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
        content.append({"type": "text", "text": question})
        try:
            resp = client.chat.completions.create(model=ep.model, messages=[{"role": "user", "content": content}],
                                                  max_tokens=ep.max_tokens, temperature=ep.temperature)
        except (openai.APIConnectionError, openai.APITimeoutError, openai.AuthenticationError,
                openai.NotFoundError) as exc:
            result.unavailable = f"{type(exc).__name__}: {str(exc)[:200]}"
            result.answers.clear()
            return result
        except openai.APIError:
            result.failed += 1
            continue
        text = (resp.choices[0].message.content or "") if resp.choices else ""
        result.answers[r["id"]] = text.strip()
    return result
