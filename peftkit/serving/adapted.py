"""Hot-swap: one base in memory, many task adapters, switch in microseconds, mixed batches.

    from peftkit import AdaptedModel, Registry, load_base
    with AdaptedModel(load_base("minilm"), Registry("registry"), max_resident=8) as model:
        model.use("sst2")                      # loads once (hash and base checked), then O(1)
        model.predict(["a gripping film"])     # -> [Prediction(label='positive', ...)]
        model.predict_mixed(["a gripping film", "stocks fell"], adapters=["sst2", "agnews"])
        model.predict(["a man sleeps"], adapter="nli", text_pairs=["nobody sleeps"])  # pairs
    # the block's end took every adapter back out of the base

A name (``"sst2"``) means its latest version each time it is asked: a version registered
or removed meanwhile is seen on the next call (checked cheaply: the registry's generation
counter is read, and names are resolved again only when it changed). ``"sst2@1"`` stays
pinned while it exists; an alias (``"sst2@production"``) follows the version it points at,
like a name. An adapter removed from the registry is evicted and no longer served.

LoRA adapters (and head-only probes) share one peft model: switching only changes which
adapter the next forward applies, so ``use()`` touches no module; a batch may mix
adapters (rank-stacked, see ``peftkit.serving.mixed``: about the cost of a single-adapter batch),
and each row gets its own head, label set included. IA3, prefix
and prompt-tuning adapters are served too, one adapter group per forward. Forwards run
under a lock, so the object is safe to share between threads. The PeftModel and its adapter
slots (evicted LoRA slots reused by hot-swapping) are ``peftkit.serving.slots``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftkit.adapters.folder import TaskInfo, load_head, read_task
from peftkit.adapters.model import Head, body_of, pool
from peftkit.config.presets import method_row
from peftkit.data.batching import (
    apply_template,
    collate,
    encode,
    pad_id,
    padding_batches,
    position_limit,
)
from peftkit.errors import ConfigError, RegistryError
from peftkit.registry.entries import parse_ref, split_ref
from peftkit.registry.store import Entry, Registry
from peftkit.serving.mixed import MixedLoRA
from peftkit.serving.slots import BASE_KEY, PeftSlots


@dataclass(frozen=True)
class Prediction:
    """One row's result: ``adapter`` as it was asked for, ``ref`` the version served.
    ``abstained``: the adapter's reject option declined to answer (score below its
    threshold, or its out-of-scope label); ``label`` and ``score`` are still its best."""

    label: str
    score: float
    probs: dict[str, float]
    adapter: str
    ref: str = ""
    abstained: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "ref": self.ref,
            "label": self.label,
            "score": self.score,
            "probs": self.probs,
            "abstained": self.abstained,
        }


@dataclass
class _Resident:
    entry: Entry
    info: TaskInfo
    head: Head
    key: str  # the adapter name inside the peft model (BASE_KEY for a probe)


class AdaptedModel:
    """A base model with up to ``max_resident`` adapters resident (least recently used go)."""

    def __init__(
        self,
        base: Any,
        registry: Registry | str | Path,
        *,
        max_resident: int = 8,
        batch_size: int = 32,
        verify: bool = True,
    ):
        if max_resident < 1:
            raise ConfigError(f"max_resident must be >= 1, got {max_resident}")
        self.base = base
        self.registry = registry if isinstance(registry, Registry) else Registry(registry)
        self.max_resident = max_resident
        self.batch_size = batch_size
        self.verify = verify
        self._body = body_of(base.model)
        self._resident: OrderedDict[str, _Resident] = OrderedDict()
        self._current: str | None = None
        self._lock = threading.RLock()
        self._pad = pad_id(base.tokenizer)
        self._device = next(self._body.parameters()).device
        self._slots = PeftSlots(self._body, self._device)  # the PeftModel, free LoRA slots
        self._mixed: MixedLoRA | None = None  # rebuilt lazily after adapters change
        self._generation: int | None = None  # the registry's, when names were resolved
        self._latest: dict[str, str] = {}  # name or name@alias -> "name@N" at that generation

    # -- residency ------------------------------------------------------------------------

    @property
    def _peft(self) -> Any:
        """The PeftModel once a peft adapter is loaded, else None."""
        return self._slots.peft

    @property
    def current(self) -> str | None:
        """The adapter ``use`` chose, as it was given (a name follows its latest version)."""
        return self._current

    @property
    def resident(self) -> list[str]:
        """The resident versions (``name@N``), least recently used first."""
        return list(self._resident)

    def use(self, ref: str) -> AdaptedModel:
        """Make ``ref`` (``name``: its latest version at each call, or ``name@N``) the
        adapter that ``predict`` uses."""
        with self._lock:
            self.load(ref)
            self._current = ref
        return self

    def load(self, ref: str) -> str:
        """Make ``ref``'s version resident (fingerprint and hashes checked); returns it
        as ``name@N``."""
        with self._lock:
            key = self._resolve(ref)
            if key in self._resident:
                self._resident.move_to_end(key)
                return key
            fp = self.base.fingerprint
            entry = self.registry.load_path(
                key, expected_fingerprint=fp.id, expected_base=fp.to_dict(), verify=self.verify
            )
            info = read_task(entry.path)
            if method_row(info.method).saved_as == "model":
                raise ConfigError(
                    f"{entry.ref} is a full fine-tune (a whole model, not an "
                    "adapter); load its export with load_base(folder) instead"
                )
            head = load_head(entry.path, info, self._device)
            slot = self._slots.attach(entry, info)
            self._invalidate()
            while len(self._resident) >= self.max_resident:
                self._evict_lru()
            self._resident[key] = _Resident(entry=entry, info=info, head=head, key=slot)
            return key

    def evict(self, ref: str) -> None:
        """Take ``name@N`` (or every resident version of ``name``) out of memory."""
        with self._lock:
            name, version = parse_ref(self.registry.resolve(ref))
            for key in [k for k in self._resident if parse_ref(k)[0] == name]:
                if version is None or key == f"{name}@{version}":
                    self._detach(self._resident.pop(key))
            if self._current == ref:
                self._current = None

    def _resolve(self, ref: str) -> str:
        """``ref`` as the version to serve now (``name@N``); RegistryError (naming it)
        once it is no longer registered. Lock held."""
        self._refresh()
        name, selector = split_ref(ref)
        if isinstance(selector, int):
            key = f"{name}@{selector}"
            return key if key in self._resident else self.registry.get(key).ref
        moving = name if selector is None else f"{name}@{selector}"  # a name or an alias
        if moving not in self._latest:
            self._latest[moving] = self.registry.get(moving).ref
        return self._latest[moving]

    def _refresh(self) -> None:
        """When the registry changed since names were resolved: forget the resolutions and
        evict resident versions that are no longer registered."""
        generation = self.registry.generation()
        if generation == self._generation:
            return
        self._latest.clear()
        registered = {e.ref for e in self.registry.list()}
        for key in [k for k in self._resident if k not in registered]:
            self._detach(self._resident.pop(key))
        self._generation = generation

    def _evict_lru(self) -> None:
        _, slot = self._resident.popitem(last=False)
        self._detach(slot)  # a name in use() is loaded again when next asked for

    def __enter__(self) -> AdaptedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Take every adapter out of the base, leaving it as it was loaded (again: a
        no-op); ``with AdaptedModel(base, registry) as model:`` calls it at the end."""
        with self._lock:
            self._resident.clear()
            self._current = None
            self._latest.clear()
            self._generation = None
            self._invalidate()
            self._slots.close()

    def _invalidate(self) -> None:
        if self._mixed is not None:
            self._mixed.close()
            self._mixed = None

    def _detach(self, slot: _Resident) -> None:
        if slot.key == BASE_KEY or self._peft is None:
            return
        self._invalidate()
        self._slots.detach(slot.key, keep_free=self.max_resident)

    # -- prediction -----------------------------------------------------------------------

    def predict_proba(
        self,
        texts: Sequence[str],
        adapter: str | None = None,
        *,
        text_pairs: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Class probabilities (rows × the adapter's labels), with the adapter's
        calibrated temperature applied; ``text_pairs`` gives each row its second text,
        encoded as the tokenizer's pair (as training does)."""
        ref = self._ref(adapter)
        probs, _, _ = self._row_probs(list(texts), [ref] * len(texts), text_pairs)
        return np.stack(probs) if probs else np.empty((0, 0))

    def predict(
        self,
        texts: Sequence[str],
        adapter: str | None = None,
        *,
        text_pairs: Sequence[str] | None = None,
    ) -> list[Prediction]:
        ref = self._ref(adapter)
        return self.predict_mixed(texts, [ref] * len(texts), text_pairs)

    def predict_mixed(
        self,
        texts: Sequence[str],
        adapters: Sequence[str],
        text_pairs: Sequence[str] | None = None,
    ) -> list[Prediction]:
        """One batch where row ``i`` goes through adapter ``adapters[i]`` and its own head
        (with ``text_pairs[i]`` as its second text when given). Each adapter's
        calibration (``task.json``) applies: its temperature, and its reject option
        (``abstained``)."""
        if len(texts) != len(adapters):
            raise ConfigError(f"{len(texts)} texts but {len(adapters)} adapter names")
        probs, keys, infos = self._row_probs(list(texts), list(adapters), text_pairs)
        out = []
        for p, asked, key in zip(probs, adapters, keys, strict=True):
            info = infos[key]
            k = int(p.argmax())
            label, score = info.labels[k], float(p[k])
            out.append(
                Prediction(
                    label=label,
                    score=score,
                    probs={lab: float(v) for lab, v in zip(info.labels, p, strict=True)},
                    adapter=asked,
                    ref=key,
                    abstained=info.abstains(label, score),
                )
            )
        return out

    def _ref(self, adapter: str | None) -> str:
        ref = adapter or self._current
        if ref is None:
            raise RegistryError("no adapter in use: call use(name) or pass adapter=name")
        return ref

    @staticmethod
    def _unique(adapters: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(adapters))

    def _row_probs(
        self, texts: list[str], adapters: list[str], text_pairs: Sequence[str] | None
    ) -> tuple[list[np.ndarray], list[str], dict[str, TaskInfo]]:
        """Probabilities per row, the version (``name@N``) each row was served by, and
        each version's task (labels, calibration)."""
        pairs = None if text_pairs is None else list(text_pairs)
        if pairs is not None and len(pairs) != len(texts):
            raise ConfigError(f"{len(texts)} texts but {len(pairs)} text_pairs")
        with self._lock:
            keys = [self._resolve(a) for a in adapters]
            unique = self._unique(keys)
            if len(unique) > self.max_resident:
                raise ConfigError(
                    f"this batch names {len(unique)} adapters but max_resident="
                    f"{self.max_resident}; create the AdaptedModel with a larger max_resident "
                    "or split the batch"
                )
            for key in unique:
                self.load(key)
            infos = {k: self._resident[k].info for k in unique}
            return self._probs_loaded(texts, keys, pairs), keys, infos

    @torch.inference_mode()
    def _probs_loaded(
        self, texts: list[str], keys: list[str], pairs: list[str] | None
    ) -> list[np.ndarray]:
        """Probabilities per row for resident versions ``keys`` (lock held)."""
        slots = [self._resident[k] for k in keys]
        enc = self._encode(texts, slots, pairs)
        probs: list[np.ndarray] = [np.empty(0)] * len(texts)
        # rows sorted by length and cut where padding would pile up (any adapter mix)
        for idx in padding_batches([len(e) for e in enc], self.batch_size):
            tensors = collate([enc[i] for i in idx], self._pad)
            pooled = self._features(tensors, [slots[i] for i in idx])
            for key in dict.fromkeys(keys[i] for i in idx):
                local = [j for j, i in enumerate(idx) if keys[i] == key]
                slot = self._resident[key]
                logits = slot.head(pooled[local].to(slot.head.linear.weight.dtype)).float()
                scaled = torch.softmax(logits / slot.info.temperature, -1).numpy()
                for j, p in zip(local, scaled, strict=True):
                    probs[idx[j]] = p
        return probs

    def _encode(
        self, texts: list[str], slots: list[_Resident], pairs: list[str] | None
    ) -> list[list[int]]:
        """Token ids per row as training encodes them (``batching.encode``): the row's
        adapter template applied (pairs filling ``{text_pair}``) and cut from the left to
        keep the prompt's answer cue, or else text and pair as the tokenizer's pair."""
        groups: dict[tuple[str | None, int], list[int]] = {}
        for i, slot in enumerate(slots):
            groups.setdefault((slot.info.template, slot.info.max_length), []).append(i)
        enc: list[list[int]] = [[] for _ in texts]
        tok = self.base.tokenizer
        # an adapter folder may ask for more positions than the base has (an import, or
        # one saved before training capped it): never index past the position table
        cap = position_limit(getattr(self.base.model, "config", None))
        for (template, asked), rows in groups.items():
            limit = asked if cap is None else min(asked, cap)
            part = [texts[i] for i in rows]
            second = None if pairs is None else [pairs[i] for i in rows]
            zeros = [0] * len(rows)
            if template is None:
                done = encode(tok, part, zeros, limit, second)
            else:
                done = encode(
                    tok, apply_template(template, part, second), zeros, limit, keep_end=True
                )
            for i, ids in zip(rows, done.ids, strict=True):
                enc[i] = list(ids)
        return enc

    def _features(self, tensors: dict[str, torch.Tensor], slots: list[_Resident]) -> torch.Tensor:
        ids = tensors["input_ids"].to(self._device)
        mask = tensors["attention_mask"].to(self._device)
        names = [s.key for s in slots]
        poolings = {s.info.pooling for s in slots}
        if self._peft is None or self._slots.family == "lora":
            if self._peft is None:
                out = self._body(input_ids=ids, attention_mask=mask)
            else:
                if self._mixed is None:
                    self._mixed = MixedLoRA(self._peft)
                if self._mixed.supported(names):
                    with self._mixed.rows(names):
                        out = self._peft(input_ids=ids, attention_mask=mask)
                else:  # DoRA and the like: peft's own per-adapter slicing
                    out = self._peft(input_ids=ids, attention_mask=mask, adapter_names=names)
            hidden = out.last_hidden_state
            if len(poolings) == 1:
                return pool(hidden, mask, poolings.pop())
            return torch.stack(
                [
                    pool(hidden[i : i + 1], mask[i : i + 1], s.info.pooling)[0]
                    for i, s in enumerate(slots)
                ]
            )
        # IA3 / prefix / prompt tuning: one forward per adapter group.
        result: torch.Tensor | None = None
        for key in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == key]
            if key == BASE_KEY:
                with self._peft.disable_adapter():
                    out = self._peft(input_ids=ids[rows], attention_mask=mask[rows])
            else:
                self._peft.set_adapter(key)
                out = self._peft(input_ids=ids[rows], attention_mask=mask[rows])
            vec = pool(out.last_hidden_state, mask[rows], slots[rows[0]].info.pooling)
            if result is None:
                result = vec.new_empty(len(names), vec.shape[-1])
            result[rows] = vec
        assert result is not None
        return result
