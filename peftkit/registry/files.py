"""Files of the registry: staged, hashed, fsynced copies and their checks.

A registration copies an adapter folder's files (regular files only, never through a link,
and only the files an adapter folder consists of: :data:`ADAPTER_FILES`) into a staging
folder that it locks (``flock``) for as long as it lives, hashing and fsyncing every file;
the staged folder is then renamed into place.

Nothing here deletes a folder it cannot prove the registry wrote: every staging folder gets
a marker file (:data:`PENDING_FILE`, naming the registry's id and the process) when it is
created, and keeps it until the registration commits. Only a folder carrying this
registry's marker may be removed by a clean-up (``remove_if_orphan_stage``, and the
registry's own check of version folders); anything else unknown is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, IntegrityError, RegistryError
from peftkit.registry.entries import Entry, check_agrees

try:
    import fcntl
except ImportError:  # Windows: staging folders are then cleaned by age only
    fcntl = None  # type: ignore[assignment]

STALE_STAGE_S = 3600.0  # a staging folder this old is dead even if its pid was reused
CHUNK = 1 << 20
FORMAT = "peftkit-adapter/1"  # what an export's and a version folder's peftkit.json is
META_FILE = "peftkit.json"  # an entry's metadata, in each version folder and each export
PENDING_FILE = ".peftkit-pending"  # marks a folder this registry staged and has not committed
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


def write_marker(folder: Path, owner: str) -> None:
    """Mark ``folder`` as staged by the registry ``owner`` (its id) in this process."""
    payload = {"registry": owner, "pid": os.getpid(), "time": time.time()}
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(folder / PENDING_FILE, flags, 0o644), "w", encoding="utf-8") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def marked_by(folder: Path, owner: str) -> bool:
    """Whether ``folder`` carries the pending marker of the registry ``owner``."""
    path = folder / PENDING_FILE
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("registry") == owner


def clear_marker(folder: Path) -> None:
    """Take the pending marker out (the folder becomes an ordinary version folder)."""
    (folder / PENDING_FILE).unlink()
    fsync_dir(folder)


def is_inside(path: Path, within: Path) -> bool:
    """Whether ``path`` is a real folder strictly inside ``within``, reached without a
    link that leads out of it."""
    real, root = os.path.realpath(path), os.path.realpath(within)
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(within))
    return (
        os.path.isdir(path)
        and not os.path.islink(path)
        and real == os.path.join(root, rel)
        and not rel.startswith(os.pardir)
        and rel != os.curdir
    )


def remove_tree(path: Path, within: Path) -> None:
    """``shutil.rmtree(path)``, only when ``path`` is a real folder inside ``within``
    (no link on the way out of it); otherwise RegistryError, and nothing is removed."""
    if not os.path.lexists(path):
        return
    if not is_inside(path, within):
        real = os.path.realpath(path)
        raise RegistryError(
            f"refusing to remove {path}: it resolves to {real}, which is not a folder inside "
            f"{os.path.realpath(within)} (a symbolic link on the way?); remove it by hand if "
            "it is yours"
        )
    shutil.rmtree(path, ignore_errors=True)


def new_stage(tmp: Path, owner: str) -> tuple[Path, int | None]:
    """A new staging folder under ``tmp``, marked as ``owner``'s, and the fd of its lock
    (held while we live)."""
    stage = new_dir(tmp, f"stage-{os.getpid()}-")
    write_marker(stage, owner)
    if fcntl is None:
        return stage, None
    lock = os.open(stage, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new folder: nobody else holds it
    return stage, lock


def new_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named folder (with the umask's mode, unlike tempfile.mkdtemp's 0700)."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            return path


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


def move_into_place(stage: Path, final: Path) -> None:
    os.rename(stage, final)
    fsync_dir(final.parent)


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


def remove_if_orphan_stage(stage: Path, owner: str) -> None:
    """Remove a staging folder whose registration died: it carries ``owner``'s marker, its
    lock is free and its process is gone, or it is older than an hour (the only test where
    flock is missing). A folder without the marker is left alone."""
    match = re.match(r"stage-(\d+)-", stage.name)
    if os.path.islink(stage) or not marked_by(stage, owner):
        return
    try:
        age = time.time() - stage.stat().st_mtime
        fd = os.open(stage, os.O_RDONLY) if fcntl is not None else None
    except OSError:
        return
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # a live registration holds it
        dead = fd is not None and match is not None and not pid_alive(int(match.group(1)))
        if dead or age > STALE_STAGE_S:
            shutil.rmtree(stage, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def version_folders(adapters: Path) -> Iterator[tuple[str, int, Path]]:
    """(name, version, path) of every ``adapters/<name>/<number>`` folder, links included
    (a link is listed, never entered)."""
    if not adapters.is_dir():
        return
    for named in sorted(adapters.iterdir()):
        if named.is_symlink() or not named.is_dir():
            continue
        for folder in sorted(named.iterdir()):
            if folder.name.isdigit():
                yield named.name, int(folder.name), folder


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
    meta = {"format": FORMAT, **entry.to_dict()}
    del meta["path"]
    return meta


def write_meta_file(folder: Path, entry: Entry) -> None:
    """``folder/peftkit.json``: the entry's metadata with its files' hashes, fsynced."""
    with open(folder / META_FILE, "x", encoding="utf-8") as fh:
        json.dump(meta_dict(entry), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def export_files(entry: Entry, dest: Path, recheck: Callable[[], Entry]) -> None:
    """Copy the entry's files and its peftkit.json into ``dest`` through a new staging
    folder beside it, renamed into place once complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = new_dir(dest.parent, f".{dest.name}.export-")
    try:
        copied = copy_files(((r, entry.path / r) for r in entry.files), stage)
        if copied != entry.files:  # changed since the check a moment ago
            recheck()
        write_meta_file(stage, entry)
        fsync_tree(stage)
        if dest.exists():
            dest.rmdir()
        os.rename(stage, dest)
    except BaseException:
        remove_tree(stage, dest.parent)
        raise


def check_files_agree(folder: Path, meta: Mapping[str, Any], where: str) -> None:
    """IntegrityError when ``meta`` disagrees with the folder's task.json or head shape."""
    task = head_rows = None
    if (folder / "task.json").is_file():
        try:
            task = json.loads((folder / "task.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{where}: task.json cannot be read: {exc}") from None
        if not isinstance(task, dict):
            raise IntegrityError(f"{where}: task.json must hold a JSON object")
    if (folder / "head.safetensors").is_file():
        try:
            weight = safetensors_shapes(folder / "head.safetensors").get("weight")
        except (OSError, ValueError) as exc:
            raise IntegrityError(
                f"{where}: head.safetensors is not a readable safetensors file ({exc})"
            ) from None
        head_rows = weight[0] if weight else None
    check_agrees(meta, task, head_rows, where)


def read_json(path: Path) -> dict[str, Any]:
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link; give the file itself")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
