"""Accuracy metric, shipped with peftkit (modelled on the hub's ``evaluate-metric/accuracy``).

An ``evaluate`` module script: load it by folder, no hub needed::

    import evaluate
    accuracy = evaluate.load("peftkit/metrics/accuracy")
    accuracy.compute(references=[0, 1, 2, 0], predictions=[0, 2, 2, 0])  # {'accuracy': 0.75}

peftkit code loads it through ``peftkit.metrics.report.load_metric("accuracy")``.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted label ids.
    references (`list` of `int`): Ground-truth label ids.
    normalize (`bool`): If False, return the number of correct predictions instead of
        the fraction. Defaults to True.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.

Returns:
    accuracy (`float`): Fraction (or count, with ``normalize=False``) correct.

Examples:
    >>> accuracy = evaluate.load("peftkit/metrics/accuracy")
    >>> accuracy.compute(references=[0, 1, 2, 0], predictions=[0, 2, 2, 0])
    {'accuracy': 0.75}
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
class Accuracy(evaluate.Metric):
    def _info(self):
        # "multilabel": each prediction/reference is a 0/1 vector (subset accuracy).
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
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        score = accuracy_score(
            references, predictions, normalize=normalize, sample_weight=sample_weight
        )
        return {"accuracy": float(score)}
