"""The multi-token labels' words as a prefix tree fed after a prompt, so one forward of the
prompt scores every label (labels that start with the same words share those tokens)."""

from __future__ import annotations

import torch


class LabelTree:
    """The ``riding`` labels' words but the last, as a prefix tree of tokens to feed after a
    prompt; every label's first word is scored at the prompt's last token.

    Node ``n`` is ``tokens[n]`` at ``depth[n]`` (1: a label's first word); its logits (kept
    position ``1 + n``; position 0 is the prompt's last token) score the next word of every
    riding label through it; ``seen[a, b]``: node ``a`` attends to node ``b`` (its branch).
    """

    def __init__(self, cont_ids: list[list[int]], riding: list[int], device):
        self.riding = riding
        index: dict[tuple[int, ...], int] = {}
        parent: list[int] = []
        for c in (cont_ids[j] for j in riding):
            for i in range(1, len(c)):
                if tuple(c[:i]) not in index:
                    index[tuple(c[:i])] = len(parent)
                    parent.append(index.get(tuple(c[: i - 1]), -1))
        self.tokens = [key[-1] for key in index]
        n = len(parent)
        seen = torch.eye(n, dtype=torch.bool)
        for a in range(n):
            b = parent[a]
            while b >= 0:
                seen[a, b] = True
                b = parent[b]
        self.seen = seen.to(device)
        self.depth = torch.tensor([len(key) for key in index], device=device, dtype=torch.long)
        # every (label, kept position, word) whose log-prob the label's score sums
        label, at, word = [], [], []
        for j in riding:
            c = cont_ids[j]
            for i in range(1, len(c)):
                label.append(j)
                at.append(1 + index[tuple(c[:i])])
                word.append(c[i])
        self.label, self.at, self.word = (
            torch.tensor(v, device=device, dtype=torch.long) for v in (label, at, word)
        )

    @classmethod
    def of_all(cls, cont_ids: list[list[int]], device) -> LabelTree:
        """The tree of every multi-token label."""
        return cls(cont_ids, [j for j, c in enumerate(cont_ids) if len(c) > 1], device)

    def score(self, logp: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Summed log-probs ``(rows, labels)`` from the kept positions' log-softmax."""
        scores = logp[:, 0, first]
        return scores.index_add_(1, self.label, logp[:, self.at, self.word])
