"""Packing prompts into rows: the plan of forwards (first-fit decreasing), the inputs of
one packed forward (ids, positions, a 4-D mask that keeps each prompt to itself and each
label branch to its prompt), and a hook that runs the LM head only where labels are scored.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from peftkit.prompting.scorers.label_tree import LabelTree

MASK_CELLS = 2**26
"""At most this many (query, key) cells in a packed forward's attention mask (256 MB in
float32): a forward of long prompts has fewer rows than ``batch_size``, down to one."""


def plan_packing(
    lengths: Sequence[int], rows: int, most: int, shared: int = 0
) -> list[list[list[int]]]:
    """Plan forwards for segments of these ``lengths``: each forward a list of rows, each
    row the indices of the segments put in it end to end. A forward has at most ``rows``
    rows, as wide as its longest segment, whose mask (``shared`` more keys) fits
    ``MASK_CELLS``, and at most ``most`` segments: the longest segments left open its rows,
    then every shorter one goes in the first row with room (first-fit decreasing)."""
    todo = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    plan = []
    while todo:
        width = lengths[todo[0]]
        most_rows = max(1, min(rows, MASK_CELLS // (width * (shared + width))))
        longer = [-lengths[i] for i in todo]  # ascending: bisect finds what fits a room
        room: list[int] = []
        placed: list[list[int]] = []
        taken = [False] * len(todo)
        k, count = 0, 0
        while k < len(todo) and count < most:
            r = next((r for r, free in enumerate(room) if free >= -longer[k]), None)
            if r is None and len(room) < most_rows:
                r = len(room)
                room.append(width)
                placed.append([])
            if r is None:  # every row open and none has room: on to the first that fits
                k = bisect.bisect_left(longer, -max(room), lo=k + 1)
                continue
            room[r] += longer[k]
            placed[r].append(todo[k])
            taken[k] = True
            count += 1
            k += 1
        plan.append(placed)
        todo = [i for i, t in zip(todo, taken, strict=True) if not t]
    return plan


class PackedRows:
    """The inputs of one packed forward (see ``strategies.packed``): ``ids``,
    ``positions``, the additive ``mask`` ``(rows, 1, width, shared + width)``, and ``kept``,
    the flat indices (row x width + column) of each segment's last prompt token and tree
    nodes, segment by segment in ``order`` (the prompts' indices)."""

    def __init__(self, rows, own, tree: LabelTree, shared: int, dtype, device):
        n = len(tree.tokens)
        width = max(sum(len(own[i]) + n for i in row) for row in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        segs = np.full((len(rows), width), -1, dtype=np.int64)  # segment id; -1: the row's end
        locs = np.zeros((len(rows), width), dtype=np.int64)  # place within the segment
        sizes = np.zeros((len(rows), width), dtype=np.int64)  # the segment's prompt tokens
        kept: list[int] = []
        self.order: list[int] = []
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                span, m = slice(at, at + len(own[i]) + n), len(own[i])
                ids[r, span] = own[i] + tree.tokens
                segs[r, span] = len(self.order)
                locs[r, span] = np.arange(m + n)
                sizes[r, span] = m
                kept.extend(r * width + at + m - 1 + k for k in range(n + 1))
                self.order.append(i)
                at += m + n
        self.ids = torch.from_numpy(ids).to(device)
        self.kept = torch.tensor(kept, device=device)
        seg, loc, size = (torch.from_numpy(a).to(device) for a in (segs, locs, sizes))
        node = (loc >= size) & (seg >= 0)
        nid = (loc - size).clamp(0, max(n - 1, 0))
        depth = tree.depth[nid] if n else torch.zeros_like(loc)
        self.positions = shared + torch.where(node, size + depth - 1, loc)
        # query q sees key k of its own segment: a prompt token causally, a tree node the
        # whole prompt and its own branch; every query sees itself (no row is empty)
        same = (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, :, None]
        branch = tree.seen[nid[:, :, None], nid[:, None, :]] if n else torch.zeros_like(same)
        before = loc[:, None, :] <= loc[:, :, None]
        seen = same & torch.where(node[:, :, None], ~node[:, None, :] | branch, before)
        seen |= torch.eye(width, dtype=torch.bool, device=device)
        if shared:
            seen = torch.cat([seen.new_ones(len(rows), width, shared), seen], dim=-1)
        bias = torch.zeros(seen.shape, dtype=dtype, device=device)
        self.mask = bias.masked_fill_(~seen, torch.finfo(dtype).min)[:, None]


@contextmanager
def head_at(model, kept: torch.Tensor):
    """While open, the LM head runs only at ``kept`` (flat indices into its input's rows x
    positions): its input ``(rows, width, hidden)`` becomes ``(1, len(kept), hidden)``.
    A pre-hook on the head, so what the model does after it (a logit soft-cap) still runs.
    Yields a list that holds True once the head's input was gathered."""
    gathered: list[bool] = []

    def gather(_module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
            hidden = args[0]
            gathered.append(True)
            return (hidden.reshape(-1, hidden.shape[-1])[kept][None], *args[1:])
        return None

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield gathered
    finally:
        handle.remove()
