"""Sentence-level BLEU-2 and BLEU-4 per (prediction, reference) pair, as an `evaluate` module.

Backed by nltk's ``sentence_bleu`` (uniform n-gram weights, brevity penalty) with Chen &
Cherry smoothing method 1 so that a short answer without any matching 4-gram scores a small
positive number instead of 0 with a warning. Text is lower-cased and split into words and
punctuation by :func:`maemi_core.evaluation.text_metrics.tokenize`. Scores are in [0, 1].
"""

import evaluate

_DESCRIPTION = "Per-sample BLEU-2 and BLEU-4 (nltk sentence_bleu, smoothing method 1)."
_CITATION = "Papineni et al., BLEU: a Method for Automatic Evaluation of Machine Translation, ACL 2002."
_KWARGS = """
Args:
    predictions: list of generated answers (str).
    references: list of reference answers (str), one per prediction.
Returns:
    bleu2, bleu4: lists of per-sample scores in [0, 1].
"""


class MaemiBleu(evaluate.Metric):
    def _info(self):
        from maemi_core.evaluation.text_metrics import pair_metric_info

        return pair_metric_info(_DESCRIPTION, _CITATION, _KWARGS)

    def _compute(self, predictions, references):
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        from maemi_core.evaluation.text_metrics import tokenize

        smooth = SmoothingFunction().method1
        out = {"bleu2": [], "bleu4": []}
        for pred, ref in zip(predictions, references):
            hyp, refs = tokenize(pred), [tokenize(ref)]
            if not hyp or not refs[0]:
                out["bleu2"].append(float(hyp == refs[0]))
                out["bleu4"].append(float(hyp == refs[0]))
                continue
            out["bleu2"].append(float(sentence_bleu(refs, hyp, weights=(0.5, 0.5), smoothing_function=smooth)))
            out["bleu4"].append(float(sentence_bleu(refs, hyp, weights=(0.25,) * 4, smoothing_function=smooth)))
        return out
