"""Metrics: evaluate modules shipped inside peftkit (one folder each, loaded by path, no
hub) and the classification report built on them (``report``)."""

# what compute_metrics returns for a split: the names training.metric may select
METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")
