"""Per-sample ROUGE-1, ROUGE-2 and ROUGE-L F-measures, as an `evaluate` module.

Backed by Google's ``rouge_score`` (the scorer behind the ROUGE numbers of most captioning and
summarisation papers) with its own tokenizer and the Porter stemmer. Scores are in [0, 1].
"""

import evaluate

_DESCRIPTION = "Per-sample ROUGE-1/2/L F1 (rouge_score, Porter stemming)."
_CITATION = "Lin, ROUGE: A Package for Automatic Evaluation of Summaries, ACL Workshop 2004."
_KWARGS = """
Args:
    predictions: list of generated answers (str).
    references: list of reference answers (str), one per prediction.
Returns:
    rouge1, rouge2, rougeL: lists of per-sample F-measures in [0, 1].
"""


class MaemiRouge(evaluate.Metric):
    def _info(self):
        from maemi_core.evaluation.text_metrics import pair_metric_info

        return pair_metric_info(_DESCRIPTION, _CITATION, _KWARGS)

    def _compute(self, predictions, references):
        from rouge_score import rouge_scorer

        kinds = ["rouge1", "rouge2", "rougeL"]
        scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
        out = {k: [] for k in kinds}
        for pred, ref in zip(predictions, references):
            scores = scorer.score(ref, pred)          # score(target, prediction)
            for k in kinds:
                out[k].append(float(scores[k].fmeasure))
        return out
