"""Synthetic tasks the tiny models can learn in a few steps."""

from __future__ import annotations

import random

from peftkit.data.load import Split, TextDataset

CUES = {
    "sentiment": {
        "negative": ["bad", "awful", "terrible", "boring", "hate"],
        "positive": ["good", "great", "love", "fun", "fine"],
    },
    "topic": {
        "sport": ["sport", "game", "team", "win"],
        "business": ["market", "stock", "price", "company"],
        "politics": ["politics", "election", "vote", "government"],
        "tech": ["tech", "computer", "phone", "software"],
    },
    "spam": {"ham": ["hello", "ok", "yes", "the"], "spam": ["free", "prize", "cash", "now"]},
}
FILLER = ["the", "a", "this", "that", "it", "was", "is", "movie", "news", "about"]


def synthetic(task: str = "sentiment", n: int = 96, seed: int = 0) -> TextDataset:
    labels = tuple(CUES[task])
    rng = random.Random(seed)

    def rows(count: int) -> Split:
        texts, ys = [], []
        for i in range(count):
            y = i % len(labels)
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
            words.insert(rng.randint(0, len(words)), rng.choice(CUES[task][labels[y]]))
            texts.append(" ".join(words))
            ys.append(y)
        return Split(tuple(texts), tuple(ys))

    return TextDataset(
        task, labels, {"train": rows(n), "validation": rows(n // 3), "test": rows(n // 3)}
    )
