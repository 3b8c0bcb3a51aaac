"""The registry's side of peft: :meth:`Registry.load_path` (a verified folder to load in
place), :meth:`Registry.export` (a copy plain peft loads) and :meth:`Registry.import_folder`
(a peft folder in). They are :class:`~peftkit.registry.store.Registry` methods defined here
and bound in its class body (``export = exchange.export``), so ``self`` is the registry;
the work itself is ``staging`` (the files) and ``metadata`` (what a folder says).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.errors import FingerprintMismatch
from peftkit.registry import check
from peftkit.registry.entries import META_FIELDS, Entry, describe_base
from peftkit.registry.files import META_FILE
from peftkit.registry.metadata import import_metadata
from peftkit.registry.staging import export_entry, register_folder

if TYPE_CHECKING:
    from peftkit.registry.store import Registry


def load_path(
    self: Registry,
    ref: str | Entry,
    *,
    expected_fingerprint: str | None = None,
    expected_base: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> Entry:
    """The entry to load, checked: trained on ``expected_fingerprint`` (the loaded
    base's id; ``expected_base`` only makes the error clearer) and files intact.

    >>> e = reg.load_path("sst2", expected_fingerprint=fp.id)   # doctest: +SKIP
    >>> model.load_adapter(str(e.path), adapter_name=e.name)     # doctest: +SKIP
    """
    entry = self.get(ref)
    if expected_fingerprint is not None and entry.base_fingerprint != expected_fingerprint:
        raise FingerprintMismatch(
            f"adapter {entry.ref} was trained on base "
            f"{describe_base(entry.base_fingerprint, entry.base)}, but the loaded base is "
            f"{describe_base(expected_fingerprint, expected_base or {})}; load the base it "
            f"was trained on, or use an adapter trained on this base"
        )
    return check.verify_entry(entry, self._adapters) if verify else entry


def export(self: Registry, ref: str | Entry, dest: str | Path) -> Path:
    """Write the entry to ``dest`` (new or empty folder) as a folder plain peft loads:
    its files (adapter_config.json, adapter_model.safetensors, head.safetensors...)
    plus ``peftkit.json`` with the entry's metadata. Every file is written new (never
    through a link).

    >>> reg.export("sst2@1", "out/sst2")                           # doctest: +SKIP
    >>> PeftModel.from_pretrained(base_model, "out/sst2")         # doctest: +SKIP
    """
    entry = self.get(ref)
    return export_entry(entry, Path(dest), partial(check.verify_entry, entry, self._adapters))


def import_folder(
    self: Registry,
    folder: str | Path,
    name: str | None = None,
    *,
    method: str | None = None,
    task: str | None = None,
    labels: Iterable[str] | None = None,
    base_fingerprint: str | None = None,
    base: Mapping[str, Any] | None = None,
    quantization: str | None = None,
    template: str | None = None,
    verbalizer: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    tags: Iterable[str] | None = None,
    lineage: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> Entry:
    """Register a peft folder (``save_pretrained`` output, or an :meth:`export`).

    Metadata comes from the arguments, else from the folder's ``peftkit.json``;
    ``method`` falls back to ``adapter_config.json``'s ``peft_type`` (``"lora"``).
    A plain peft folder needs ``name``, ``labels`` and ``base_fingerprint``. The labels
    and method are checked against ``task.json`` and the head's shape; an export's
    files against the hashes its ``peftkit.json`` records. Symbolic links are refused
    and files that are not part of an adapter folder are left out.
    """
    folder = Path(folder).expanduser()
    given = {k: v for k, v in locals().items() if k in META_FIELDS or k == "name"}
    new_name, meta, expected = import_metadata(folder, given)
    return register_folder(
        self._db,
        self.root,
        new_name,
        folder,
        meta,
        exclude={META_FILE},
        expected=expected,
        imported=True,
    )
