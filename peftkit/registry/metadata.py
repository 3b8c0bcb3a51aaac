"""What an adapter folder says about itself, and whether it agrees with an entry.

A folder peftkit saved holds ``task.json`` (method, labels, template, verbalizer and, when
trained on a peftkit base, ``base_fingerprint``, ``base`` and ``quantization``); an export
and every version folder hold ``peftkit.json`` (the entry's metadata and its files'
hashes); a peft folder holds ``adapter_config.json`` (its ``peft_type``). Here those are
read with plain json (no torch), turned into the metadata :meth:`Registry.register` and
:meth:`Registry.import_folder` record (arguments first, the folder's files for what they
leave out), and checked against the files: ``task.json`` and the head's number of rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, IntegrityError
from peftkit.registry.entries import Entry, check_metadata, check_name
from peftkit.registry.files import META_FILE, OWN_FILES, PEFT_FILES, open_regular, refuse_links

FORMAT = "peftkit-adapter/1"  # what an export's and a version folder's peftkit.json is
TASK_FILE = "task.json"
# The metadata a task.json can give register(): the keys TaskInfo.to_dict writes.
FROM_TASK = (
    "method",
    "labels",
    "base_fingerprint",
    "base",
    "quantization",
    "template",
    "verbalizer",
)
REQUIRED = ("method", "labels", "base_fingerprint")
# What a task.json may also give (written after training's calibration): read when the
# folder has a task.json, never required.
OPTIONAL_FROM_TASK = ("calibration",)


def register_metadata(folder: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """register()'s metadata, checked: each argument in ``given`` that is not None, else
    the value the folder's ``task.json`` records (``calibration`` too, when it has one:
    it is never required); ConfigError naming the folder and the
    required fields (method, labels, base_fingerprint) that neither gives.

    >>> register_metadata(Path("runs/sst2/adapter"), {"method": None, ...})  # doctest: +SKIP
    {'method': 'lora', 'labels': ('neg', 'pos'), 'base_fingerprint': '9f2c...', ...}
    """
    meta = dict(given)
    missing = [k for k in FROM_TASK if meta[k] is None]
    optional = [k for k in OPTIONAL_FROM_TASK if meta.get(k) is None]
    task_file = folder / TASK_FILE
    if not missing and not (optional and task_file.is_file() and not task_file.is_symlink()):
        return check_metadata(meta)
    missing += optional
    refuse_links(folder)  # the folder exists and task.json is read from no link
    found = read_task_json(folder, f"adapter folder {folder}")
    task = found or {}
    taken = [k for k in missing if task.get(k) is not None]
    meta.update({k: task[k] for k in taken})
    lacking = [k for k in REQUIRED if meta[k] is None]
    if lacking:
        raise ConfigError(_lacking_message(folder, lacking, has_task=found is not None))
    try:
        return check_metadata(meta)
    except ConfigError as exc:
        if not taken:
            raise
        raise ConfigError(f"{exc} ({', '.join(taken)} read from {folder / TASK_FILE})") from None


def _lacking_message(folder: Path, lacking: list[str], *, has_task: bool) -> str:
    where = f"its {TASK_FILE} records none" if has_task else f"it has no {TASK_FILE}"
    example = {"method": "method='lora'", "labels": "labels=['neg', 'pos']"}
    args = ", ".join(example.get(k, "base_fingerprint=base.fingerprint.id") for k in lacking)
    return (
        f"cannot register adapter folder {folder}: no {', '.join(lacking)} given and {where}; "
        f"pass {args}, or save the folder with model.save_pretrained(folder) on a peftkit "
        "base (load_base), which records them"
    )


def import_metadata(
    folder: Path, given: Mapping[str, Any]
) -> tuple[str, dict[str, Any], dict[str, str] | None]:
    """import_folder()'s name, metadata and expected file hashes: each argument in
    ``given`` that is not None, else the folder's ``peftkit.json`` (an export), the method
    else ``adapter_config.json``'s ``peft_type``. The hashes are those an export records
    (None for a plain peft folder); ConfigError for a folder that is not a peft folder
    or holds a link, and naming what neither gives."""
    refuse_links(folder)  # before any file of it is read
    missing = [f for f in PEFT_FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(
            f"{folder} is not a peft adapter folder: no {' or '.join(missing)}"
            f" (save it with save_pretrained(..., safe_serialization=True))"
        )
    saved = read_json(folder / META_FILE) if (folder / META_FILE).is_file() else {}
    args = {k: saved.get(k) if v is None else v for k, v in given.items()}
    if args.get("calibration") is None:  # a plain folder peftkit saved: its task.json's
        args["calibration"] = (read_task_json(folder, f"{folder}") or {}).get("calibration")
    if args["method"] is None:
        args["method"] = peft_type(folder / "adapter_config.json")
    lacking = [k for k in ("name", "labels", "base_fingerprint") if args[k] is None]
    if lacking:
        raise ConfigError(
            f"cannot import {folder}: it has no {META_FILE} giving "
            f"{', '.join(lacking)}; "
            + (
                "give it one ('peftkit adapters import FOLDER --name NAME', or "
                "Registry.import_folder(folder, 'NAME'))"
                if lacking == ["name"]
                else "import a folder 'peftkit adapters export' wrote, or pass them from "
                "Python: Registry.import_folder(folder, 'sst2', labels=['neg', 'pos'], "
                "base_fingerprint=fp.id)"
            )
        )
    name = check_name(args.pop("name"))
    args["task"], args["tags"] = args["task"] or "", args["tags"] or ()
    recorded = saved.get("files")
    expected = None
    if isinstance(recorded, dict):  # an export: check it arrived intact
        expected = {k: v for k, v in recorded.items() if k not in OWN_FILES}
    return name, check_metadata(args), expected


def peft_type(config_path: Path) -> str:
    """``adapter_config.json``'s ``peft_type``, lower-cased (``"lora"``)."""
    value = read_json(config_path).get("peft_type")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{config_path} has no peft_type; pass method= (e.g. method='lora')")
    return value.lower()


# -- checks against the files --------------------------------------------------------------


def check_files_agree(folder: Path, meta: Mapping[str, Any], where: str) -> None:
    """IntegrityError when ``meta`` disagrees with the folder's task.json or head shape."""
    task = read_task_json(folder, where)
    head_rows = None
    if (folder / "head.safetensors").is_file():
        try:
            weight = safetensors_shapes(folder / "head.safetensors").get("weight")
        except (OSError, ValueError) as exc:
            raise IntegrityError(
                f"{where}: head.safetensors is not a readable safetensors file ({exc})"
            ) from None
        head_rows = weight[0] if weight else None
    check_agrees(meta, task, head_rows, where)


def check_agrees(
    meta: Mapping[str, Any],
    task: Mapping[str, Any] | None,
    head_rows: int | None,
    where: str,
) -> None:
    """IntegrityError when ``meta`` (what an index row or peftkit.json says) disagrees with
    the folder's ``task.json`` (``task``) or its head's number of rows, naming both values."""
    labels = list(meta["labels"])
    if task is not None:
        for field, given in (("labels", labels), ("method", meta["method"])):
            found = list(task[field]) if field == "labels" else task.get(field)
            if field in task and found != given:
                raise IntegrityError(
                    f"{where}: the metadata gives {field} {given!r} but task.json gives "
                    f"{found!r}; fix the metadata (or pass {field}=...) to match the files"
                )
        recorded = task.get("base_fingerprint")
        if recorded is not None and recorded != meta["base_fingerprint"]:
            raise IntegrityError(
                f"{where}: the metadata gives base_fingerprint {meta['base_fingerprint']!r} "
                f"but task.json records {recorded!r}; the adapter was trained on that base"
            )
    if head_rows is not None and head_rows != len(labels):
        raise IntegrityError(
            f"{where}: head.safetensors has {head_rows} output rows but the metadata gives "
            f"{len(labels)} labels {labels!r}; the labels must be the head's classes, in order"
        )


# -- reading and writing the files ---------------------------------------------------------


def read_task_json(folder: Path, where: str) -> dict[str, Any] | None:
    """The folder's ``task.json`` object, or None when it has none; IntegrityError when
    it cannot be read or holds something else."""
    path = folder / TASK_FILE
    if not path.is_file():
        return None
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{where}: task.json cannot be read: {exc}") from None
    if not isinstance(task, dict):
        raise IntegrityError(f"{where}: task.json must hold a JSON object")
    return task


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (never read through a link); ConfigError otherwise."""
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link; give the file itself")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (no tensor is read).

    The format is an 8-byte little-endian header length, then a JSON header mapping each
    tensor name to its dtype, shape and offsets.
    """
    with open_regular(path) as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size <= 100 << 20:
            raise ValueError(f"header length {size} is not that of a safetensors file")
        header = json.loads(fh.read(size))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return {
        k: tuple(int(n) for n in v["shape"])
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("shape"), list)
    }


def meta_dict(entry: Entry) -> dict[str, Any]:
    """The ``peftkit.json`` object of ``entry``: its metadata, files and ``format``."""
    meta = {"format": FORMAT, **entry.to_dict()}
    del meta["path"]
    return meta


def write_meta_file(folder: Path, entry: Entry) -> None:
    """``folder/peftkit.json``: the entry's metadata with its files' hashes, fsynced."""
    with open(folder / META_FILE, "x", encoding="utf-8") as fh:
        json.dump(meta_dict(entry), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
