"""Per-row LoRA for batches that mix adapters, at the cost of a single-adapter batch.

peft serves a mixed batch (``adapter_names=``) by slicing the rows of each adapter out of
every LoRA layer's input, running that adapter's two small matmuls on the slice and
scattering the result back: one gather, two matmuls and one scatter per adapter per layer,
plus hooks registered on every layer for every forward. On a CPU that made a 32-row batch
over 4 adapters run at about half the speed of a single-adapter batch.

Here the adapters of a batch are stacked along the rank instead: for each LoRA layer,
``A = [A_1; ...; A_n]`` (n·r × in) and ``B = [B_1 ... B_n]`` (out × n·r), built once per
set of adapters and kept until an adapter comes or goes. The layer's update for the whole
batch is then three dense ops whatever the mix,

    delta = ((x @ A.T) * M) @ B.T        M[row, k] = scaling of k's adapter if k is row's, else 0

so a mixed batch costs n·r extra columns in two thin matmuls (r=8, n=4: 32 columns next
to a 384-wide layer) and no per-adapter Python. Rows whose adapter has no LoRA in a layer
(a probe's ``__base__``, or other target modules) get zeros in ``M``.

The LoRA layers are switched off (peft's own ``disable_adapters`` flag, one attribute per
layer) for the forward, and a forward hook adds ``delta`` to the base layer's output.
Adapters this cannot express exactly (DoRA, a LoRA bias, non-Linear targets) report
``supported() == False`` and the caller falls back to peft's ``adapter_names=`` path.

With many distinct adapters in one forward the stacked columns stop being cheap: 32
adapters of rank 8 add 256 columns to each 384-wide layer, more than the layer itself. So
a forward may instead *gather* each row's own A and B (zero-padded to the largest rank,
scaling folded into B) and run two batched matmuls, as punica's and S-LoRA's kernels do:

    delta[i] = (x[i] @ A[owner(i)].T) @ B[owner(i)].T       (torch.bmm over rows)

which costs r columns per row whatever the number of adapters, plus copying the gathered
weights (rows × r × (in + out) numbers per layer) out of a bank of every resident
adapter, built once when adapters come or go. ``strategy="auto"`` picks per forward:
gathered once the forward's adapters hold at least ``GATHER_FROM`` times the largest rank
in stacked columns. ``bench/bench_mixed.py`` measures where the two cross: on MiniLM with
rank-8 LoRA on every linear layer, gathering first wins at 8 adapters in a 64-row batch, and
at 64 adapters runs at 0.92x a single-adapter batch where stacking runs at 0.44x
(2026-12-07, 2 CPU cores). The bank holds a second copy of every resident adapter's weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.nn import functional as F

BASE = "__base__"
STRATEGIES = ("auto", "stacked", "gathered")
# auto gathers once a forward's stacked columns reach this many times the largest rank
# (on MiniLM with rank-8 adapters: from this many distinct adapters on); see the docstring
GATHER_FROM = 8


class _Stack:
    """One layer's adapters stacked along the rank for one tuple of adapter names."""

    __slots__ = ("a", "b", "owner", "scale")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, owner: torch.Tensor, scale: torch.Tensor):
        self.a = a  # (R, in)
        self.b = b  # (out, R)
        self.owner = owner  # (R,) index of the adapter (in the names tuple) owning column k
        self.scale = scale  # (R,) that adapter's scaling


class _Gathered:
    """One layer's adapters as (adapter, rank, in) and (adapter, out, rank) blocks, zero
    padded to the largest rank, the scaling folded into B; the last block is all zeros
    (rows with no adapter in this layer)."""

    __slots__ = ("a", "b")

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a = a  # (n + 1, r, in)
        self.b = b  # (n + 1, out, r)


class MixedLoRA:
    """Per-row LoRA for a peft model whose layers hold several LoRA adapters.

    ``strategy``: ``"stacked"`` (adapters stacked along the rank), ``"gathered"`` (each
    row's A and B gathered, batched matmuls) or ``"auto"`` (per forward, by how many
    columns stacking would add; see the module docstring)."""

    def __init__(self, peft_model: Any, max_cached: int = 8, strategy: str = "auto"):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self._model = peft_model
        self._max_cached = max_cached
        self.strategy = strategy
        self._layers: list[Any] = []
        self._handles: list[Any] = []
        self._stacks: dict[tuple[str, ...], list[_Stack | None]] = {}
        self._banked: tuple[dict[str, int], list[_Gathered | None]] | None = None
        self._ok: dict[frozenset[str], bool] = {}
        self._active: tuple[list[Any], torch.Tensor] | None = None
        self.last_strategy: str | None = None  # what the latest rows() block ran
        self.refresh()

    # -- bookkeeping ------------------------------------------------------------------------

    def refresh(self) -> None:
        """Call after an adapter was added, removed or had its weights replaced."""
        from peft.tuners.lora import LoraLayer

        for h in self._handles:
            h.remove()
        self._layers = [m for m in self._model.modules() if isinstance(m, LoraLayer)]
        self._handles = [
            m.register_forward_hook(partial(self._hook, i)) for i, m in enumerate(self._layers)
        ]
        self._stacks.clear()
        self._banked = None
        self._ok.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._layers = []
        self._stacks.clear()
        self._banked = None

    def supported(self, names: Sequence[str]) -> bool:
        """Whether every adapter in ``names`` is plain LoRA on Linear layers."""
        wanted = frozenset(names) - {BASE}
        known = self._ok.get(wanted)
        if known is None:
            known = self._ok[wanted] = self._check(wanted)
        return known

    def _check(self, wanted: frozenset[str]) -> bool:
        for m in self._layers:
            for key in wanted & set(m.lora_A.keys()):
                if m.use_dora.get(key, False):
                    return False
                if not isinstance(m.lora_A[key], torch.nn.Linear):
                    return False
                if m.lora_A[key].bias is not None or m.lora_B[key].bias is not None:
                    return False
        # an adapter unknown to the model: let peft say so
        return all(any(key in m.lora_A for m in self._layers) for key in wanted)

    def _stack(self, names: tuple[str, ...]) -> list[_Stack | None]:
        stacks = self._stacks.get(names)
        if stacks is not None:
            return stacks
        stacks = []
        for m in self._layers:
            a, b, owner, scale = [], [], [], []
            for j, key in enumerate(names):
                if key not in m.lora_A:
                    continue
                wa, wb = m.lora_A[key].weight, m.lora_B[key].weight
                a.append(wa)
                b.append(wb)
                owner.append(torch.full((wa.shape[0],), j, dtype=torch.long))
                scale.append(torch.full((wa.shape[0],), float(m.scaling[key]), dtype=wa.dtype))
            if not a:
                stacks.append(None)
                continue
            dev = a[0].device
            stacks.append(
                _Stack(
                    torch.cat(a).detach(),
                    torch.cat(b, dim=1).detach(),
                    torch.cat(owner).to(dev),
                    torch.cat(scale).to(dev),
                )
            )
        if len(self._stacks) >= self._max_cached:
            self._stacks.pop(next(iter(self._stacks)))
        self._stacks[names] = stacks
        return stacks

    def _bank(self) -> tuple[dict[str, int], list[_Gathered | None]]:
        """Every adapter of the model, one block each per layer, built once after
        ``refresh()``: a forward only indexes it, whatever its mix of adapters."""
        if self._banked is not None:
            return self._banked
        keys = list(dict.fromkeys(k for m in self._layers for k in m.lora_A))
        index = {k: j for j, k in enumerate(keys)}
        blocks: list[_Gathered | None] = []
        for m in self._layers:
            present = [k for k in keys if k in m.lora_A]
            if not present:
                blocks.append(None)
                continue
            w = m.lora_A[present[0]].weight
            rank = max(m.lora_A[k].weight.shape[0] for k in present)
            out = m.lora_B[present[0]].weight.shape[0]
            a = w.new_zeros(len(keys) + 1, rank, w.shape[1])
            b = w.new_zeros(len(keys) + 1, out, rank)
            for key in present:
                wa, wb = m.lora_A[key].weight, m.lora_B[key].weight
                a[index[key], : wa.shape[0]] = wa.detach()
                b[index[key], :, : wb.shape[1]] = wb.detach() * float(m.scaling[key])
            blocks.append(_Gathered(a, b))
        self._banked = (index, blocks)
        return self._banked

    def choose(self, row_names: Sequence[str]) -> str:
        """The strategy a forward over ``row_names`` runs: the fixed one, or for ``auto``
        ``"gathered"`` once stacking would add ``GATHER_FROM`` x the largest rank."""
        if self.strategy != "auto":
            return self.strategy
        names = tuple(dict.fromkeys(n for n in row_names if n != BASE))
        if len(names) < GATHER_FROM:  # cannot reach it: every rank <= the largest
            return "stacked"
        widest = 0.0
        for m in self._layers:
            ranks = [m.lora_A[k].weight.shape[0] for k in names if k in m.lora_A]
            if ranks:
                widest = max(widest, sum(ranks) / max(ranks))
        return "gathered" if widest >= GATHER_FROM else "stacked"

    # -- forward ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def rows(self, row_names: Sequence[str]) -> Iterator[None]:
        """Within this block, forwards of the model apply adapter ``row_names[i]`` to row i
        (``"__base__"``: none). One block per forward; not re-entrant."""
        names = tuple(dict.fromkeys(n for n in row_names if n != BASE))
        index = {n: j for j, n in enumerate(names)}
        device = next(self._model.parameters()).device
        strategy = self.choose(row_names)
        if strategy == "gathered":  # rows without an adapter take the zero block
            bank, layers_g = self._bank()
            row_idx = torch.tensor([bank.get(n, len(bank)) for n in row_names], device=device)
            layers: list[Any] = layers_g
        else:
            row_idx = torch.tensor([index.get(n, -1) for n in row_names], device=device)
            layers = self._stack(names)
        previous = [m._disable_adapters for m in self._layers]
        for m in self._layers:
            m._disable_adapters = True  # the base layer only; the hook adds the updates
        self._active = (layers, row_idx)
        self.last_strategy = strategy
        try:
            yield
        finally:
            self._active = None
            for m, p in zip(self._layers, previous, strict=True):
                m._disable_adapters = p

    def _hook(self, i: int, module: Any, args: tuple, output: torch.Tensor) -> Any:
        if self._active is None:
            return None
        layers, row_idx = self._active
        st = layers[i]
        if st is None:
            return None
        x = args[0]
        if isinstance(st, _Gathered):
            x3 = (x if x.dim() == 3 else x[:, None, :]).to(st.a.dtype)
            h = torch.bmm(x3, st.a.index_select(0, row_idx).transpose(1, 2))  # (rows, L, r)
            delta = torch.bmm(h, st.b.index_select(0, row_idx).transpose(1, 2))
            return output + (delta if x.dim() == 3 else delta[:, 0]).to(output.dtype)
        mask = (st.owner[None, :] == row_idx[:, None]).to(st.a.dtype) * st.scale[None, :]
        if x.dim() == 3:
            mask = mask[:, None, :]
        h = F.linear(x.to(st.a.dtype), st.a) * mask
        return output + F.linear(h, st.b).to(output.dtype)
