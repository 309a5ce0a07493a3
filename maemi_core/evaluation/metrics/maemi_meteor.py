"""Per-sample METEOR with WordNet synonyms, as an `evaluate` module.

Backed by nltk's ``meteor_score`` (exact, Porter-stem and WordNet-synonym matching stages;
alpha 0.9, beta 3, gamma 0.5). WordNet 3.0 comes from :mod:`maemi_core.evaluation.wordnet`;
without it the module refuses to run rather than silently degrade to exact matching. Text is
lower-cased and tokenised by :func:`maemi_core.evaluation.text_metrics.tokenize`.
As in nltk (and unlike the original Java METEOR), the synonym stage sees the words left over
after the stem stage in their stemmed form, so a synonym is credited when both stems are
WordNet lemmas (car ~ auto; not picture ~ image, whose stems are "pictur" and "imag").
"""

import evaluate

_DESCRIPTION = "Per-sample METEOR (nltk meteor_score with WordNet 3.0 synonyms)."
_CITATION = "Banerjee & Lavie, METEOR: An Automatic Metric for MT Evaluation, ACL Workshop 2005."
_KWARGS = """
Args:
    predictions: list of generated answers (str).
    references: list of reference answers (str), one per prediction.
Returns:
    meteor: list of per-sample scores in [0, 1].
"""


class MaemiMeteor(evaluate.Metric):
    def _info(self):
        from maemi_core.evaluation.text_metrics import pair_metric_info

        return pair_metric_info(_DESCRIPTION, _CITATION, _KWARGS)

    def _compute(self, predictions, references):
        from nltk.translate.meteor_score import meteor_score

        from maemi_core.evaluation.text_metrics import tokenize
        from maemi_core.evaluation.wordnet import use_wordnet

        wordnet = use_wordnet()
        out = []
        for pred, ref in zip(predictions, references):
            hyp, r = tokenize(pred), tokenize(ref)
            out.append(float(meteor_score([r], hyp, wordnet=wordnet)) if hyp and r else float(hyp == r))
        return {"meteor": out}
