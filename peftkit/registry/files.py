"""The files of an adapter folder as the registry copies and checks them.

Which files an adapter folder consists of (:data:`ADAPTER_FILES`; anything else is left
out), refusing symbolic links (a registration copies regular files only, never through a
link), copies that hash and fsync every byte, comparing recorded hashes with what is on
disk, and listing the version folders under ``adapters/``. The names of the registry's own
files (:data:`META_FILE`, :data:`PENDING_FILE`) live here too: every other registry module
skips them when it hashes a folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Container, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError
from peftkit.registry.entries import version_number

CHUNK = 1 << 20
META_FILE = "peftkit.json"  # an entry's metadata, in each version folder and each export
PENDING_FILE = ".peftkit-pending"  # marks a folder this registry staged and has not committed
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what plain peft loads
OWN_FILES = frozenset({META_FILE, PENDING_FILE})  # written by the registry, not hashed
# What an adapter folder consists of (see peftkit.adapters.folder): peft's files, the head and
# task description, a full fine-tune's body, peft's model card, and tokenizer files.
# Anything else (notes, pickles such as adapter_model.bin, a stale peftkit.json) is left out.
ADAPTER_FILES = frozenset(
    {
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
        "task.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
    }
)
_SHARD = re.compile(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors")


def walk(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every file under ``folder``, sorted."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for fname in sorted(filenames + links):  # linked folders: listed, not followed
            path = Path(dirpath, fname)
            yield path.relative_to(folder).as_posix(), path


def is_adapter_file(rel: str) -> bool:
    """Whether ``rel`` (a path relative to the folder) is part of an adapter folder."""
    return rel in ADAPTER_FILES or _SHARD.fullmatch(rel) is not None


def links_in(folder: Path) -> list[str]:
    """Relative paths of every symbolic link under ``folder`` (found with lstat, never
    followed)."""
    return [rel for rel, p in walk(folder) if os.path.islink(p)]


def refuse_links(folder: Path) -> None:
    """ConfigError unless ``folder`` is a folder with no symbolic link anywhere inside."""
    if not folder.is_dir():
        raise ConfigError(f"adapter folder {folder} does not exist or is not a folder")
    links = links_in(folder)
    if links:
        raise ConfigError(
            f"adapter folder {folder} holds symbolic links: {_some(links)}; the registry "
            f"copies regular files only (replace each link by the file itself, or remove it)"
        )


def source_files(
    folder: Path, exclude: Container[str] = ()
) -> tuple[list[tuple[str, Path]], list[str]]:
    """The adapter files of ``folder`` to copy, and the relative paths left out.

    A symbolic link anywhere in the folder, or an adapter file that is not a regular file,
    is refused (ConfigError naming them): a registration copies bytes it can vouch for.
    """
    refuse_links(folder)
    found = [(rel, p) for rel, p in walk(folder) if rel not in exclude]
    files = [(rel, p) for rel, p in found if is_adapter_file(rel)]
    left_out = [rel for rel, _ in found if not is_adapter_file(rel)]
    odd = [rel for rel, p in files if not stat.S_ISREG(os.lstat(p).st_mode)]
    if odd:
        raise ConfigError(
            f"adapter folder {folder} holds entries that are not regular files: {', '.join(odd)}"
        )
    if not files:
        what = f" (it holds only {_some(left_out)})" if left_out else ""
        raise ConfigError(
            f"adapter folder {folder} is empty{what}; give the folder save_pretrained wrote "
            f"(adapter_config.json, adapter_model.safetensors, head.safetensors, task.json...)"
        )
    return files, left_out


def _some(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def fill_stage(stage: Path, sources: Iterable[tuple[str, Path]]) -> dict[str, str]:
    """Copy ``sources`` into ``stage``, fsynced; returns {relpath: sha256}."""
    files = copy_files(sources, stage)
    fsync_tree(stage)
    return files


def copy_files(sources: Iterable[tuple[str, Path]], dst: Path) -> dict[str, str]:
    """Copy each (relpath, source) to ``dst / relpath``; returns {relpath: sha256}."""
    hashes = {}
    for rel, source in sources:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        hashes[rel] = copy_hashed(source, dst / rel)
    return hashes


def open_regular(path: Path):
    """``open(path, "rb")`` that never follows a link and refuses anything but a regular
    file (OSError), so a file swapped for a link after a check is not read through."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def copy_hashed(src: Path, dst: Path) -> str:
    """Copy ``src`` to the new file ``dst`` (``"xb"``: never written through a link)."""
    digest, buf = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buf)
    with open_regular(src) as fin, open(dst, "xb") as fout:
        while n := fin.readinto(buf):
            digest.update(view[:n])
            fout.write(view[:n])
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def sha256(path: Path) -> str:
    with open_regular(path) as fh:
        if hasattr(hashlib, "file_digest"):  # Python 3.11+
            return hashlib.file_digest(fh, "sha256").hexdigest()
        digest = hashlib.sha256()
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
        return digest.hexdigest()


def compare_hashes(expected: Mapping[str, str], actual: Mapping[str, Any]) -> list[str]:
    """Problems between recorded hashes and ``actual`` (relpath -> path, or -> sha256)."""
    problems = []
    for rel, want in expected.items():
        if rel not in actual:
            problems.append(f"file {rel!r} is missing (expected sha256 {want})")
            continue
        value = actual[rel]
        try:
            got = value if isinstance(value, str) else sha256(value)
        except OSError as exc:
            why = "a symbolic link" if os.path.islink(value) else (exc.strerror or str(exc))
            problems.append(f"file {rel!r} cannot be read ({why})")
            continue
        if got != want:
            problems.append(f"file {rel!r} has sha256 {got}, expected {want}")
    problems += [f"file {rel!r} is not in the index" for rel in actual if rel not in expected]
    return problems


def fsync_tree(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def version_folders(adapters: Path) -> Iterator[tuple[str, int, Path]]:
    """(name, version, path) of every ``adapters/<name>/<number>`` folder, links included
    (a link is listed, never entered); a number that is no version is left out (see
    :func:`unusable_version_folders`)."""
    for named, folder in _numbered_folders(adapters):
        version = version_number(folder.name)
        if version is not None:
            yield named, version, folder


def unusable_version_folders(adapters: Path) -> Iterator[Path]:
    """Every ``adapters/<name>/<digits>`` folder whose number is no version (0, or above
    what the index can hold): never indexed, reported by the checks."""
    for _, folder in _numbered_folders(adapters):
        if version_number(folder.name) is None:
            yield folder


def _numbered_folders(adapters: Path) -> Iterator[tuple[str, Path]]:
    if not adapters.is_dir():
        return
    for named in sorted(adapters.iterdir()):
        if named.is_symlink() or not named.is_dir():
            continue
        for folder in sorted(named.iterdir()):
            if re.fullmatch(r"[0-9]+", folder.name):
                yield named.name, folder
