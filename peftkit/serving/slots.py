"""The peft side of an :class:`~peftkit.serving.adapted.AdaptedModel`: one ``PeftModel``
over the base's body holding each resident adapter under a slot key (``a1``, ``a2``...).

An evicted LoRA slot keeps its (stale) weights: the next adapter of the same shape is
hot-swapped into one (peft's ``hotswap_adapter``, a copy in place) instead of building new
layers, which is most of a load's cost. peft is imported when the first adapter is attached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.adapters.folder import TaskInfo
from peftkit.adapters.model import peft_quiet
from peftkit.config.presets import method_row
from peftkit.errors import ConfigError
from peftkit.registry.entries import Entry

if TYPE_CHECKING:
    import torch

BASE_KEY = "__base__"  # a probe's slot: the bare base, no adapter


class PeftSlots:
    """The PeftModel (``peft``, None until an adapter is attached), the adapter family it
    serves (``family``: peft cannot hold two on one base) and the free LoRA slots."""

    def __init__(self, body: Any, device: torch.device) -> None:
        self.body = body
        self.device = device
        self.peft: Any = None
        self.family: str | None = None
        self._serial = 0
        self._free: dict[str, tuple] = {}  # evicted LoRA slots, kept for hot-swapping
        self._shape: dict[str, tuple] = {}

    def attach(self, entry: Entry, info: TaskInfo) -> str:
        """Load ``entry``'s adapter (a free slot of its shape reused if there is one);
        returns its slot key."""
        import peft

        row = method_row(info.method)
        if row.saved_as == "head":  # a probe: the bare base, its own head
            return BASE_KEY
        family = row.family
        if self.family is not None and family != self.family:
            raise ConfigError(
                f"{entry.ref} is a {info.method} adapter, but this AdaptedModel serves "
                f"{self.family} adapters; peft cannot hold both on one base. Load another "
                f"base for {info.method} adapters"
            )
        shape = _lora_shape(entry.path) if family == "lora" else None
        reused = self._reuse(entry, shape)
        if reused is not None:
            return reused
        self._serial += 1
        key = f"a{self._serial}"
        if shape is not None:
            self._shape[key] = shape
        if self.peft is None:
            # low_cpu_mem_usage: create the adapter weights empty and load them in place
            # (no random init that the checkpoint overwrites anyway).
            with peft_quiet():
                self.peft = peft.PeftModel.from_pretrained(
                    self.body, str(entry.path), adapter_name=key, is_trainable=False
                )
            self.family = family
        else:
            self.peft.load_adapter(str(entry.path), adapter_name=key, is_trainable=False)
        self.peft.eval()
        return key

    def detach(self, key: str, *, keep_free: int) -> None:
        """Take slot ``key`` out: a LoRA slot is kept for reuse while fewer than
        ``keep_free`` are free, anything else deleted from the PeftModel."""
        if key in self._shape and len(self._free) < keep_free:
            self._free[key] = self._shape[key]  # keep the layers for reuse
            return
        self.peft.delete_adapter(key)
        self._shape.pop(key, None)

    def close(self) -> None:
        """Take every adapter out of the base, leaving it as it was loaded."""
        self._free.clear()
        self._shape.clear()
        if self.peft is not None:
            if self.family == "lora" or self.family == "ia3":
                self.peft.unload()  # prompt learning injected nothing into the base
            self.peft = None
            self.family = None

    def _reuse(self, entry: Entry, shape: tuple | None) -> str | None:
        """Hot-swap ``entry`` into a free LoRA slot of the same shape, if there is one."""
        from peft.utils.hotswap import hotswap_adapter

        key = next((k for k, v in self._free.items() if shape is not None and v == shape), None)
        if key is None or self.peft is None:
            return None
        del self._free[key]
        try:
            hotswap_adapter(
                self.peft, str(entry.path), adapter_name=key, torch_device=str(self.device)
            )
        except Exception:  # incompatible after all: drop the slot, load the usual way
            self.peft.delete_adapter(key)
            self._shape.pop(key, None)
            return None
        return key


def _lora_shape(folder: Path) -> tuple | None:
    """What must match for one LoRA adapter to be hot-swapped into another's layers."""
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
