"""Precision metric, shipped with peftkit (modelled on the hub's ``evaluate-metric/precision``).

An ``evaluate`` module script: load it by folder, no hub needed::

    import evaluate
    precision = evaluate.load("peftkit/metrics/precision")
    precision.compute(references=[0, 1, 2, 0], predictions=[0, 2, 2, 0], average="macro")

peftkit code loads it through ``peftkit.metrics.report.load_metric("precision")``. Unlike the hub
script, ``zero_division`` defaults to 0 (a class that is never predicted or never present
scores 0.0, without a warning), and ``average=None`` returns a plain list of floats.
"""

import datasets
import evaluate
from sklearn.metrics import precision_score

_DESCRIPTION = """
Precision is the fraction of predicted positives that are correct:
Precision = TP / (TP + FP).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted label ids.
    references (`list` of `int`): Ground-truth label ids.
    labels (`list` of `int`): The label ids to include when ``average`` is not "binary",
        and their order when ``average`` is None. Ids absent from the data score 0.0 and
        still count in a macro average. Defaults to the ids seen in the data, sorted.
    pos_label (`int`): The positive class when ``average="binary"``. Defaults to 1.
    average (`str` or None): "binary" (default; the ``pos_label`` class only), "micro"
        (global counts of TP, FP, FN), "macro" (unweighted mean over labels), "weighted"
        (mean weighted by support), "samples" (multilabel only), or None (one score per
        label, in ``labels`` order).
    sample_weight (`list` of `float`): Sample weights. Defaults to None.
    zero_division (0, 1 or "warn"): The value for an undefined ratio. Defaults to 0.

Returns:
    precision (`float`, or `list` of `float` when ``average`` is None).

Examples:
    >>> precision = evaluate.load("peftkit/metrics/precision")
    >>> precision.compute(references=[0, 1, 2, 0], predictions=[0, 2, 2, 0], average="macro")
    {'precision': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Precision(evaluate.Metric):
    def _info(self):
        # "multilabel": each prediction/reference is a 0/1 vector over the labels.
        if self.config_name == "multilabel":
            features = {
                "predictions": datasets.Sequence(datasets.Value("int32")),
                "references": datasets.Sequence(datasets.Value("int32")),
            }
        else:
            features = {
                "predictions": datasets.Value("int32"),
                "references": datasets.Value("int32"),
            }
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.precision_score.html"
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="binary",
        sample_weight=None,
        zero_division=0,
    ):
        score = precision_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        if average is None:
            return {"precision": [float(s) for s in score]}
        return {"precision": float(score)}
