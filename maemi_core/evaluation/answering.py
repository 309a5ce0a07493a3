"""Answers of one loaded MAEMI package for benchmark records, in each of the benchmark's methods.

- ``maemi``: the tuned model as registered, with its images.
- ``maemi_gates_closed``: the tuned LM (adapters and new-token embeddings as trained) with every
  cross-attention gate closed: what imitating the teacher's style scores without seeing.
- ``base_lm``: the LM as it ships: adapters zeroed, gates closed, and a plain prompt without the
  ``<image>`` / ``<Encode>`` tokens it has never seen.

Without images an answer depends on the prompt text alone, so both ablations decode each
distinct question once (greedy decoding is deterministic) and share the answer.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from maemi_core.model.generation import DecodingConfig
from maemi_core.teacher.instruction_set import stable_slice

MAEMI, GATES_CLOSED, BASE_LM = "maemi", "maemi_gates_closed", "base_lm"
CONTENT_FREE = "content-free"       # the image id of the mid-grey image in calibrated category scores
IMAGE_FREE = (GATES_CLOSED, BASE_LM)


def benchmark_records(records: list[dict], task: str, limit: Optional[int], split: str = "test") -> list[dict]:
    """The ``split`` records of ``task`` that every method answers: a stable slice by id hash,
    round-robin over question families and answer lengths so each is represented (``split``
    "val" for choices that must not look at the test set)."""
    return stable_slice([r for r in records if r["split"] == split and r["task"] == task], limit,
                        lambda r: f"{r.get('family') or ''}/{r.get('length') or ''}")


def question(r: dict) -> str:
    return r["conversations"][0]["value"]


def reference(r: dict) -> str:
    return r["conversations"][-1]["value"]


def stable_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class DecodeStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


class Answerer:
    """Batched answers of one loaded MAEMI package for instruction records."""

    def __init__(self, model, manifest: pd.DataFrame, batch_size: int, decoding: DecodingConfig = DecodingConfig(),
                 media_capacity: int = 4096):
        from maemi_core.training.maemi_training import ImageStore, MediaCache

        self.model, self.batch_size, self.decoding = model, batch_size, decoding
        self.images = ImageStore.from_manifest(manifest, model.cfg.image_size)
        # Each image's visual tokens once per Answerer: a benchmark asks about the same test image
        # in many prompts (every text table, zero- and few-shot, each demonstration, every method
        # and rank). The encoder is frozen and inputs are fixed, so a memo hit is exact. At most
        # ``media_capacity`` images are kept (about 256 KB each for EfficientNet-Lite0).
        self.media = MediaCache(model, self.images, batch=batch_size, capacity=media_capacity)

    def method(self, method: str):
        """The model as ``method`` within the block."""
        if method == MAEMI:
            return nullcontext(self.model)
        if method == GATES_CLOSED:
            return self.model.gates_closed()
        if method == BASE_LM:
            return self.model.base_lm_only()
        raise ValueError(f"unknown method {method!r}")

    def answer(self, records: list[dict], max_new_tokens: int, rank: Optional[int] = None,
               desc: str = "answering", stats: Optional[DecodeStats] = None, method: str = MAEMI) -> list[str]:
        if method in IMAGE_FREE:       # the image cannot matter: one answer per distinct question
            distinct = list(dict.fromkeys(question(r) for r in records))
            proxies = [{"conversations": [{"value": q}], "image_ids": []} for q in distinct]
            with self.method(method):
                got = dict(zip(distinct, self._answer(proxies, max_new_tokens, rank, desc, stats,
                                                      plain=method == BASE_LM)))
            return [got[question(r)] for r in records]
        with self.method(method):
            return self._answer(records, max_new_tokens, rank, desc, stats, plain=False)

    def _answer(self, records, max_new_tokens, rank, desc, stats, plain) -> list[str]:
        from maemi_core.model.generation import generate_answers

        # Similar prompt lengths decode together (less padding); answers go back in input order.
        order = sorted(range(len(records)), key=lambda i: (len(records[i]["image_ids"]), len(question(records[i]))))
        answers: dict[int, str] = {}
        bar = tqdm(total=len(records), desc=desc, unit="rec", mininterval=2)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            t0 = time.perf_counter()
            counts: list[int] = []
            got = generate_answers(self.model, [question(records[i]) for i in idx], [[] for _ in idx],
                                   max_new_tokens=max_new_tokens, rank=rank, token_counts=counts, plain=plain,
                                   decoding=self.decoding,
                                   media=None if plain else self.media.stacked([records[i]["image_ids"] for i in idx]))
            if stats is not None:
                stats.seconds += time.perf_counter() - t0
                stats.tokens += sum(counts)
            answers.update(zip(idx, got))
            bar.update(len(idx))
        bar.close()
        return [answers[i] for i in range(len(records))]

    def scorings(self, records: list[dict], class_names: list[str], method: str, raw: np.ndarray,
                 calibrated: bool = True, task: str = "classify_zero_shot",
                 hidden: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
        """Every category scoring of ``raw`` (:mod:`maemi_core.model.category_scoring`; ``fitted``
        and ``head`` when the package carries their weights for ``task``'s prompts, ``head`` from
        ``hidden``, the same prompts' answer-position states). For a method that does not see
        the image the content-free prompt is the prompt itself, so its calibrated scores are 0 for
        every category."""
        from maemi_core.model.category_scoring import (content_free_image, name_lengths, package_fitted, package_head,
                                                       variants)

        cf = None
        if calibrated:
            if method in IMAGE_FREE:
                cf = raw
            else:
                # The content-free input replaces the image asked about (the last), keeping any
                # demonstrations before it; each distinct (question, demonstrations) runs once.
                self.images._cache.setdefault(CONTENT_FREE, content_free_image(self.images.size))
                keys = [(question(r), tuple(r["image_ids"][:-1])) for r in records]
                distinct = list(dict.fromkeys(keys))
                proxies = [{"conversations": [{"value": q}], "image_ids": [*ctx, CONTENT_FREE]} for q, ctx in distinct]
                got = self.category_scores(proxies, class_names, method)
                row = {k: got[i] for i, k in enumerate(distinct)}
                cf = np.stack([row[k] for k in keys]) if keys else np.zeros((0, len(class_names)))
        return variants(raw, name_lengths(self.model.tokenizer, class_names), cf, package_fitted(self.model, task),
                        package_head(self.model, task), hidden)

    def category_scores(self, records: list[dict], class_names: list[str], method: str = MAEMI,
                        return_hidden: bool = False):
        """(n, C) log-likelihood of each category name as the answer to each record's question;
        ``return_hidden``: and the (n, D) answer-position hidden states (``head``'s input)."""
        from maemi_core.model.generation import candidate_log_likelihoods

        qs = [question(r) for r in records]
        width = self.model.lm.config.hidden_size
        with self.method(method):
            if method in IMAGE_FREE:
                distinct = list(dict.fromkeys(qs))
                ll, hid = candidate_log_likelihoods(self.model, distinct, [[] for _ in distinct], class_names,
                                                    plain=method == BASE_LM, batch_size=self.batch_size,
                                                    return_hidden=True)
                at = {q: i for i, q in enumerate(distinct)}
                idx = [at[q] for q in qs]
                scores = ll[idx] if qs else np.zeros((0, len(class_names)))
                return (scores, hid[idx] if qs else np.zeros((0, width), np.float32)) if return_hidden else scores
            out, states = [], []
            for start in tqdm(range(0, len(records), self.batch_size), desc=f"category likelihoods: {method}",
                              unit="batch", mininterval=2):
                chunk = records[start:start + self.batch_size]
                ll, hid = candidate_log_likelihoods(
                    self.model, [question(r) for r in chunk], [[] for _ in chunk], class_names,
                    batch_size=self.batch_size, return_hidden=True,
                    media_of=lambda a, b, chunk=chunk: self.media.stacked([r["image_ids"] for r in chunk[a:b]]))
                out.append(ll)
                states.append(hid)
            scores = np.concatenate(out) if out else np.zeros((0, len(class_names)))
            if return_hidden:
                return scores, np.concatenate(states) if states else np.zeros((0, width), np.float32)
            return scores
