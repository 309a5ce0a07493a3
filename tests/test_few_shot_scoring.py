"""The few-shot classification row reads its likelihoods raw when the package's scoring is
``fitted``: the matrix scaling was fitted on zero-shot prompts' scores, and a scaling that
reverses those scores must not reach the few-shot row (it still reaches the zero-shot one)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from maemi_core.evaluation.answering import MAEMI
from maemi_core.evaluation.benchmark_run import _maemi_rows, _Run, few_shot_scoring

CLASSES = ["a", "b", "c"]


class _Answerer:
    """Raw scores that rank every image's true category first; ``fitted`` reverses them."""

    def __init__(self, labels: dict[str, str]):
        self.labels = labels

    def category_scores(self, recs, class_names, method=MAEMI):
        raw = np.full((len(recs), len(class_names)), -3.0)
        for i, r in enumerate(recs):
            raw[i, class_names.index(self.labels[r["image_ids"][-1]])] = -0.1
        return raw

    def scorings(self, recs, class_names, method, raw, calibrated=True):
        return {"raw": raw, "mean": raw / 2, "fitted": -raw}

    def answer(self, recs, max_new_tokens, desc="", stats=None):
        return [self.labels[r["image_ids"][-1]] for r in recs]


def _run(tmp_path) -> _Run:
    image_ids = [f"img{i}" for i in range(9)]
    labels = {iid: CLASSES[i % 3] for i, iid in enumerate(image_ids)}
    records = []
    for task in ("classify_zero_shot", "classify_few_shot"):
        for iid in image_ids:
            demos = [] if task == "classify_zero_shot" else ["demo0", "demo1"]
            records.append({"id": f"{task}-{iid}", "task": task, "split": "test", "label": labels[iid],
                            "length": "detailed", "family": None, "image_ids": [*demos, iid],
                            "conversations": [{"value": "<image>\nWhich category?"}, {"value": labels[iid]}]})
    (tmp_path / "samples").mkdir()
    (tmp_path / "figures").mkdir()
    cfg = SimpleNamespace(evaluation=SimpleNamespace(max_records_per_task=4, classification_max_new_tokens=8))
    return _Run(cfg=cfg, manifest=None, records=records, out=tmp_path, answerer=_Answerer(labels), methods=[MAEMI],
                log=lambda m: None, source="", decoding_note="", image_ids=image_ids)


def test_the_few_shot_row_reads_raw_scores_when_the_packages_fitted_weights_came_from_zero_shot_prompts(tmp_path):
    rows, _ = _maemi_rows(_run(tmp_path), CLASSES, "fitted")
    top1 = {r["method"]: r["top1"] for r in rows}
    assert top1["maemi_few_shot"] == 1.0                # raw: every true category ranked first
    assert top1["maemi_zero_shot"] == 0.0               # the zero-shot row keeps the package's fitted scoring
    assert top1["maemi_zero_shot[raw]"] == 1.0


def test_other_scorings_reach_the_few_shot_row_unchanged(tmp_path):
    assert [few_shot_scoring(s) for s in ("raw", "mean", "calibrated", "fitted")] == ["raw", "mean", "calibrated",
                                                                                      "raw"]
    rows, _ = _maemi_rows(_run(tmp_path), CLASSES, "mean")
    assert {r["method"]: r["top1"] for r in rows}["maemi_few_shot"] == 1.0
