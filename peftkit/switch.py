"""Hot-swap: one base in memory, many task adapters, switch in microseconds, mixed batches.

    from peftkit import AdaptedModel, Registry, load_base
    model = AdaptedModel(load_base("minilm"), Registry("registry"), max_resident=8)
    model.use("sst2")                      # loads once (hash and base checked), then O(1)
    model.predict(["a gripping film"])     # -> [Prediction(label='positive', ...)]
    model.predict_mixed(["a gripping film", "stocks fell"], adapters=["sst2", "agnews"])

LoRA adapters (and head-only probes) share one peft model: switching only changes which
adapter the next forward applies, so ``use()`` touches no module; a batch may mix
adapters (rank-stacked, see ``peftkit.mixed``: about the cost of a single-adapter batch),
and each row gets its own head, label set included. IA3, prefix
and prompt-tuning adapters are served too, one adapter group per forward. Forwards run
under a lock, so the object is safe to share between threads.
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

from peftkit.adapters import Head, body_of, peft_quiet, pool
from peftkit.artifacts import TaskInfo, load_head, read_task
from peftkit.batching import apply_template, collate, pad_id, padding_batches
from peftkit.errors import ConfigError, RegistryError
from peftkit.mixed import MixedLoRA
from peftkit.registry import Entry, Registry

LORA_FAMILY = ("lora", "qlora")
PROMPT_FAMILY = ("prefix", "prompt-tuning")


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    probs: dict[str, float]
    adapter: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "label": self.label,
            "score": self.score,
            "probs": self.probs,
        }


@dataclass
class _Resident:
    entry: Entry
    info: TaskInfo
    head: Head
    key: str  # the adapter name inside the peft model ("__base__" for a probe)


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
        self._peft: Any = None  # the PeftModel once a peft adapter is loaded
        self._family: str | None = None
        self._resident: OrderedDict[str, _Resident] = OrderedDict()
        self._current: str | None = None
        self._lock = threading.RLock()
        self._pad = pad_id(base.tokenizer)
        self._device = next(self._body.parameters()).device
        self._serial = 0
        # Evicted LoRA slots keep their (stale) weights: the next adapter of the same shape
        # is hot-swapped into one (peft's hotswap_adapter, a copy in place) instead of
        # building new layers, which is most of a load's cost.
        self._free: dict[str, tuple] = {}
        self._shape: dict[str, tuple] = {}
        self._mixed: MixedLoRA | None = None  # rebuilt lazily after adapters change

    # -- residency ------------------------------------------------------------------------

    @property
    def current(self) -> str | None:
        return self._current

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def use(self, ref: str) -> AdaptedModel:
        """Make ``ref`` (``name`` or ``name@N``) the adapter that ``predict`` uses."""
        with self._lock:
            if ref in self._resident:
                self._resident.move_to_end(ref)
            else:
                self.load(ref)
            self._current = ref
        return self

    def load(self, ref: str) -> str:
        """Make ``ref`` resident (fingerprint and hashes checked); returns ``ref``."""
        with self._lock:
            if ref in self._resident:
                self._resident.move_to_end(ref)
                return ref
            fp = self.base.fingerprint
            entry = self.registry.load_path(
                ref, expected_fingerprint=fp.id, expected_base=fp.to_dict(), verify=self.verify
            )
            info = read_task(entry.path)
            if info.method == "full":
                raise ConfigError(
                    f"{entry.ref} is a full fine-tune (a whole model, not an "
                    "adapter); load its export with load_base(folder) instead"
                )
            head = load_head(entry.path, info, self._device)
            key = self._attach(entry, info)
            self._invalidate()
            while len(self._resident) >= self.max_resident:
                self._evict_lru()
            self._resident[ref] = _Resident(entry=entry, info=info, head=head, key=key)
            return ref

    def evict(self, ref: str) -> None:
        with self._lock:
            slot = self._resident.pop(ref, None)
            if slot is not None:
                self._detach(slot)
            if self._current == ref:
                self._current = None

    def _evict_lru(self) -> None:
        ref, slot = self._resident.popitem(last=False)
        self._detach(slot)
        if self._current == ref:
            self._current = None

    def _attach(self, entry: Entry, info: TaskInfo) -> str:
        import peft

        if info.method == "probe":
            return "__base__"
        family = "lora" if info.method in LORA_FAMILY else info.method
        if self._family is not None and family != self._family:
            raise ConfigError(
                f"{entry.ref} is a {info.method} adapter, but this AdaptedModel serves "
                f"{self._family} adapters; peft cannot hold both on one base. Load another "
                f"base for {info.method} adapters"
            )
        shape = _lora_shape(entry.path) if family == "lora" else None
        reused = self._reuse_slot(entry, shape)
        if reused is not None:
            return reused
        self._serial += 1
        key = f"a{self._serial}"
        if shape is not None:
            self._shape[key] = shape
        if self._peft is None:
            # low_cpu_mem_usage: create the adapter weights empty and load them in place
            # (no random init that the checkpoint overwrites anyway).
            with peft_quiet():
                self._peft = peft.PeftModel.from_pretrained(
                    self._body, str(entry.path), adapter_name=key, is_trainable=False
                )
            self._family = family
        else:
            self._peft.load_adapter(str(entry.path), adapter_name=key, is_trainable=False)
        self._peft.eval()
        return key

    def close(self) -> None:
        """Take every adapter out of the base, leaving it as it was loaded."""
        with self._lock:
            self._resident.clear()
            self._free.clear()
            self._shape.clear()
            self._current = None
            self._invalidate()
            if self._peft is not None:
                if self._family == "lora" or self._family == "ia3":
                    self._peft.unload()  # prompt learning injected nothing into the base
                self._peft = None
                self._family = None

    def _reuse_slot(self, entry: Entry, shape: tuple | None) -> str | None:
        """Hot-swap ``entry`` into a free LoRA slot of the same shape, if there is one."""
        from peft.utils.hotswap import hotswap_adapter

        key = next((k for k, v in self._free.items() if shape is not None and v == shape), None)
        if key is None or self._peft is None:
            return None
        del self._free[key]
        try:
            hotswap_adapter(
                self._peft, str(entry.path), adapter_name=key, torch_device=str(self._device)
            )
        except Exception:  # incompatible after all: drop the slot, load the usual way
            self._peft.delete_adapter(key)
            self._shape.pop(key, None)
            return None
        return key

    def _invalidate(self) -> None:
        if self._mixed is not None:
            self._mixed.close()
            self._mixed = None

    def _detach(self, slot: _Resident) -> None:
        if slot.key == "__base__" or self._peft is None:
            return
        self._invalidate()
        if slot.key in self._shape and len(self._free) < self.max_resident:
            self._free[slot.key] = self._shape[slot.key]  # keep the layers for reuse
            return
        self._peft.delete_adapter(slot.key)
        self._shape.pop(slot.key, None)

    # -- prediction -----------------------------------------------------------------------

    def predict_proba(self, texts: Sequence[str], adapter: str | None = None) -> np.ndarray:
        """Class probabilities (rows × the adapter's labels)."""
        ref = self._ref(adapter)
        return self._probs(list(texts), [ref] * len(texts))[0][0]

    def predict(self, texts: Sequence[str], adapter: str | None = None) -> list[Prediction]:
        ref = self._ref(adapter)
        return self.predict_mixed(texts, [ref] * len(texts))

    def predict_mixed(self, texts: Sequence[str], adapters: Sequence[str]) -> list[Prediction]:
        """One batch where row ``i`` goes through adapter ``adapters[i]`` and its own head."""
        if len(texts) != len(adapters):
            raise ConfigError(f"{len(texts)} texts but {len(adapters)} adapter names")
        groups, order, label_sets = self._probs(list(texts), list(adapters))
        out: list[Prediction | None] = [None] * len(texts)
        for probs, rows, ref, labels in zip(
            groups, order, self._unique(adapters), label_sets, strict=True
        ):
            for p, i in zip(probs, rows, strict=True):
                k = int(p.argmax())
                out[i] = Prediction(
                    label=labels[k],
                    score=float(p[k]),
                    probs={lab: float(v) for lab, v in zip(labels, p, strict=True)},
                    adapter=ref,
                )
        return [p for p in out if p is not None]

    def _ref(self, adapter: str | None) -> str:
        ref = adapter or self._current
        if ref is None:
            raise RegistryError("no adapter in use: call use(name) or pass adapter=name")
        return ref

    @staticmethod
    def _unique(adapters: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(adapters))

    def _probs(
        self, texts: list[str], adapters: list[str]
    ) -> tuple[list[np.ndarray], list[list[int]], list[tuple[str, ...]]]:
        """Probabilities per distinct adapter (in first-seen order), their row indices and
        label sets."""
        refs = self._unique(adapters)
        if len(refs) > self.max_resident:
            raise ConfigError(
                f"this batch names {len(refs)} adapters but max_resident={self.max_resident}; "
                "create the AdaptedModel with a larger max_resident or split the batch"
            )
        with self._lock:
            for ref in refs:
                self.load(ref)
            groups, rows = self._probs_loaded(texts, adapters)
            return groups, rows, [self._resident[ref].info.labels for ref in refs]

    @torch.inference_mode()
    def _probs_loaded(
        self, texts: list[str], adapters: list[str]
    ) -> tuple[list[np.ndarray], list[list[int]]]:
        """Probabilities per distinct adapter for resident adapters (lock held)."""
        slots = [self._resident[a] for a in adapters]
        enc = self._encode(texts, slots)
        refs = self._unique(adapters)
        rows = [[i for i, a in enumerate(adapters) if a == ref] for ref in refs]
        probs: list[np.ndarray] = [np.empty(0)] * len(texts)
        # rows sorted by length and cut where padding would pile up (any adapter mix)
        for idx in padding_batches([len(e) for e in enc], self.batch_size):
            tensors = collate([enc[i] for i in idx], self._pad)
            pooled = self._features(tensors, [slots[i] for i in idx])
            for ref in dict.fromkeys(adapters[i] for i in idx):
                local = [j for j, i in enumerate(idx) if adapters[i] == ref]
                head = self._resident[ref].head
                logits = head(pooled[local].to(head.linear.weight.dtype))
                for j, p in zip(local, torch.softmax(logits.float(), -1).numpy(), strict=True):
                    probs[idx[j]] = p
        out = [np.stack([probs[i] for i in r]) for r in rows]
        return out, rows

    def _encode(self, texts: list[str], slots: list[_Resident]) -> list[list[int]]:
        """Token ids per row: the row's adapter template applied, cut to its max length
        (from the left for templates, so the prompt's answer cue survives)."""
        formatted = [
            apply_template(s.info.template, [t])[0] for t, s in zip(texts, slots, strict=True)
        ]
        tok = self.base.tokenizer
        enc = list(tok(formatted, truncation=False, verbose=False)["input_ids"])
        for i, slot in enumerate(slots):
            limit = slot.info.max_length
            if len(enc[i]) <= limit:
                continue
            if slot.info.template is not None:
                enc[i] = enc[i][-limit:]
            else:
                enc[i] = tok(formatted[i], truncation=True, max_length=limit)["input_ids"]
        return enc

    def _features(self, tensors: dict[str, torch.Tensor], slots: list[_Resident]) -> torch.Tensor:
        ids = tensors["input_ids"].to(self._device)
        mask = tensors["attention_mask"].to(self._device)
        names = [s.key for s in slots]
        poolings = {s.info.pooling for s in slots}
        if self._peft is None or self._family == "lora":
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
            if key == "__base__":
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


def _lora_shape(folder: Path) -> tuple | None:
    """What must match for one LoRA adapter to be hot-swapped into another's layers."""
    import json

    try:
        cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    targets = cfg.get("target_modules")
    targets = tuple(sorted(targets)) if isinstance(targets, list) else targets
    keys = (
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "use_dora",
        "bias",
        "fan_in_fan_out",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
    )
    return (targets, *(json.dumps(cfg.get(k), sort_keys=True) for k in keys))
