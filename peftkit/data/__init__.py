"""Labelled text: one loader for every source (``load``), the loaded data (``dataset``), its
readers (``files``, ``corpora``, ``hub``), label rules (``labels``), seeded choices of rows
(``sampling``: splits, ``max_rows``, few-shot), and token batching (``batching``)."""

from peftkit.data.load import SPLITS, Split, TextDataset, few_shot, load_data, packaged_corpora

__all__ = ["SPLITS", "Split", "TextDataset", "few_shot", "load_data", "packaged_corpora"]
