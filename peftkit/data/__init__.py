"""Labelled text: one loader for every source (``load``), the readers of files, packaged
corpora and hub datasets (``corpora``), and token batching (``batching``)."""

from peftkit.data.load import SPLITS, Split, TextDataset, few_shot, load_data, packaged_corpora

__all__ = ["SPLITS", "Split", "TextDataset", "few_shot", "load_data", "packaged_corpora"]
