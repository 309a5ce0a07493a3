"""The few-shot classification row reads the category scoring the package chose for few-shot
prompts, with its own fitted weights: a matrix scaling fitted on zero-shot prompts' scores must
not reach the few-shot row, and the few-shot one must not reach the zero-shot row. Packages from
before the few-shot choice read few-shot prompts with their zero-shot scoring, ``raw`` for
``fitted``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from maemi_core.evaluation.answering import MAEMI
from maemi_core.evaluation.benchmark_run import _maemi_rows, _Run
from maemi_core.model.category_scoring import FEW_SHOT, ZERO_SHOT, package_fitted, package_scoring

CLASSES = ["a", "b", "c"]


class _Answerer:
    """Raw scores that rank every image's true category first; ``fitted`` reverses them for the
    prompts named in ``reversing`` (whose fitted weights would do so) and keeps them for the rest."""

    def __init__(self, labels: dict[str, str], reversing: str):
        self.labels, self.reversing = labels, reversing

    def category_scores(self, recs, class_names, method=MAEMI, return_hidden=False):
        raw = np.full((len(recs), len(class_names)), -3.0)
        for i, r in enumerate(recs):
            raw[i, class_names.index(self.labels[r["image_ids"][-1]])] = -0.1
        return (raw, np.zeros((len(recs), 8))) if return_hidden else raw

    def scorings(self, recs, class_names, method, raw, calibrated=True, task=ZERO_SHOT, hidden=None):
        assert hidden is not None and len(hidden) == len(recs)
        return {"raw": raw, "mean": raw / 2, "fitted": -raw if task == self.reversing else raw}

    def answer(self, recs, max_new_tokens, desc="", stats=None):
        return [self.labels[r["image_ids"][-1]] for r in recs]


def _run(tmp_path, reversing: str) -> _Run:
    image_ids = [f"img{i}" for i in range(9)]
    labels = {iid: CLASSES[i % 3] for i, iid in enumerate(image_ids)}
    records = []
    for task in (ZERO_SHOT, FEW_SHOT):
        for iid in image_ids:
            demos = [] if task == ZERO_SHOT else ["demo0", "demo1"]
            records.append({"id": f"{task}-{iid}", "task": task, "split": "test", "label": labels[iid],
                            "length": "detailed", "family": None, "image_ids": [*demos, iid],
                            "conversations": [{"value": "<image>\nWhich category?"}, {"value": labels[iid]}]})
    (tmp_path / "samples").mkdir(exist_ok=True)
    (tmp_path / "figures").mkdir(exist_ok=True)
    cfg = SimpleNamespace(evaluation=SimpleNamespace(max_records_per_task=4, classification_max_new_tokens=8))
    return _Run(cfg=cfg, manifest=None, records=records, out=tmp_path, answerer=_Answerer(labels, reversing),
                methods=[MAEMI], log=lambda m: None, source="", decoding_note="", image_ids=image_ids)


def test_each_prompt_reads_its_own_fitted_weights(tmp_path):
    # the zero-shot weights reverse the scores: only the zero-shot row may show it
    top1 = {r["method"]: r["top1"] for r in _maemi_rows(_run(tmp_path, ZERO_SHOT), CLASSES, "fitted", "fitted")[0]}
    assert top1["maemi_zero_shot"] == 0.0 and top1["maemi_zero_shot[raw]"] == 1.0
    assert top1["maemi_few_shot"] == 1.0
    # the few-shot weights reverse them: only the few-shot row may show it
    top1 = {r["method"]: r["top1"] for r in _maemi_rows(_run(tmp_path, FEW_SHOT), CLASSES, "fitted", "fitted")[0]}
    assert top1["maemi_zero_shot"] == 1.0 and top1["maemi_few_shot"] == 0.0
    # a row reads the scoring chosen for its prompt
    top1 = {r["method"]: r["top1"] for r in _maemi_rows(_run(tmp_path, FEW_SHOT), CLASSES, "fitted", "raw")[0]}
    assert top1["maemi_few_shot"] == 1.0


def test_the_package_names_each_prompts_scoring_and_older_packages_fall_back():
    def pkg(cs):
        return SimpleNamespace(package_meta={"category_scoring": cs})

    both = pkg({"chosen": "fitted", "fitted": {"C": 1.0}, "few_shot": {"chosen": "mean", "fitted": {"C": 10.0}}})
    assert (package_scoring(both), package_scoring(both, FEW_SHOT)) == ("fitted", "mean")
    assert package_fitted(both) == {"C": 1.0} and package_fitted(both, FEW_SHOT) == {"C": 10.0}
    older = [pkg({"chosen": s, **({"fitted": {"C": 1.0}} if s == "fitted" else {})})
             for s in ("raw", "mean", "calibrated", "fitted")]
    assert [package_scoring(p, FEW_SHOT) for p in older] == ["raw", "mean", "calibrated", "raw"]
    assert package_fitted(older[3], FEW_SHOT) is None
    assert package_scoring(SimpleNamespace(package_meta={}), FEW_SHOT) == "raw"
