"""Where a run writes, made ready before any model loads, and removed again when the run is
refused while it is made ready or once the base is loaded (:class:`BaseRefused`).

:func:`prepare` checks, locks and writes the run folder, opens the registry and sends the
run's report to ``run.log`` on the main process; every process gets the run folder's path.
What it created (a folder that did not exist before) is recorded as a :class:`Made`: the
outermost folder it made on the way and the files it wrote there, each held open. A refused
run removes exactly those files (the same inode as the descriptor held, so a file put in
one's place stays) and then the folders, each only while empty. A folder that existed
before is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from peftkit.config.recipes import Recipe, recipe_to_dict
from peftkit.errors import ConfigError
from peftkit.run.folders import (
    ENVIRONMENT_FILE,
    LOCK_FILE,
    LOG_FILE,
    RECIPE_FILE,
    RUN_FILE,
    check_run_dir,
    default_run_dir,
    environment,
    interrupted_run,
    lock_run_dir,
    prepare_run_dir,
    run_log,
    write_json,
)

RUN_FILES = (RUN_FILE, LOCK_FILE, RECIPE_FILE, ENVIRONMENT_FILE, LOG_FILE)
"""The files preparing a run folder writes."""


class BaseRefused(ConfigError):
    """The recipe asks for something the loaded base does not have (checked before any
    training, so the folders the run made hold nothing and go)."""


@dataclass
class Made:
    """A folder a run created and what it wrote there.

    ``top``: the outermost folder created on the way to ``path``; ``files``: the files
    written (path relative to ``path`` -> a descriptor held open, so that the inode cannot
    be freed and reused by a file put in its place); ``folders``: the subfolders made.
    ``whole``: remove it only while it holds nothing else (a registry: its index records
    whatever another process registered into it meanwhile).
    """

    path: Path
    top: Path
    files: dict[str, int]
    folders: tuple[str, ...] = ()
    whole: bool = False
    # each folder's identity when recorded ("": ``path``), so one put in its place stays
    ids: dict[str, tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.ids = {
            rel: ident for rel in ("", *self.folders) if (ident := _dir_id(self.path / rel))
        }

    def remove(self) -> None:
        """Remove what was made (call :meth:`close` after, and after closing the registry)."""
        if self.whole and not _holds_only(self.path, self.files, self.folders):
            return
        unmake(self.path, self.top, self.files, self.folders, ids=self.ids)

    def close(self) -> None:
        """Let go of the descriptors held."""
        for fd in self.files.values():
            os.close(fd)
        self.files = {}


def prepare(recipe: Recipe, plan, state, stack, made, run_dir, registry, overwrite, runs_root,
            out: TextIO | None = None):  # fmt: skip
    """The run folder (checked, locked, written: on the main process; its path broadcast to
    every process), the registry (main process; else None) and whether the run resumes.
    The registry's closing, the run folder's lock and the run's report (to ``run.log``, and
    to ``out`` when given) go on ``stack``; each folder this call created is appended to
    ``made`` (a list of :class:`Made`) as it is made."""
    path, reg, resumed = None, None, False
    if state.is_main_process:
        path, reg, resumed = _prepare_main(recipe, plan, state, stack, made, run_dir,
                                           registry, overwrite, runs_root)  # fmt: skip
        if out is not None:
            stack.enter_context(_echo(out))
    return Path(_broadcast(state, str(path) if path else None)), reg, resumed


def _prepare_main(recipe, plan, state, stack, made, run_dir, registry, overwrite, runs_root):
    resolved = recipe_to_dict(recipe)
    if run_dir is None:
        found = interrupted_run(runs_root, plan.name, resolved)
        run_dir = found or default_run_dir(plan.name, runs_root)
    check_run_dir(run_dir, resolved, overwrite=overwrite)
    top = first_missing(Path(run_dir))
    reg_root = Path(registry or recipe.registry.path).expanduser()
    reg_top = first_missing(reg_root)
    reg = open_registry(recipe, reg_root)
    if reg is not None:
        if reg_top is not None:  # a new registry: everything in it is what opening wrote
            files, folders = _own_tree(reg.root)
            made.append(Made(reg.root, reg_top, files, folders, whole=True))
        # the registry closes before the descriptors above are: closing any descriptor of
        # its index drops the locks SQLite holds on it
        stack.callback(reg.close)
    stack.enter_context(lock_run_dir(run_dir))
    path, resumed = prepare_run_dir(run_dir, resolved, overwrite=overwrite)
    if resumed:
        print(f"peftkit: resuming the unfinished run in {path}", file=sys.stderr)
    write_json(path / ENVIRONMENT_FILE, environment(state.num_processes))
    stack.enter_context(run_log(path))
    if top is not None:
        made.append(Made(Path(path), top, own_files(Path(path))))
    return path, reg, resumed


def open_registry(recipe: Recipe, reg_root: Path):
    """The registry a training recipe registers into (opened before training, so a damaged
    or read-only one is refused before the work, not after it)."""
    if recipe.prompt is not None or not recipe.registry.enabled:
        if recipe.revisit or recipe.hotswap:
            raise ConfigError(
                f"{recipe.source}: 'revisit' and 'hotswap' load the adapters from the "
                "registry; set registry.enabled: true"
            )
        return None
    from peftkit.registry import Registry

    if reg_root.exists() and not reg_root.is_dir():
        raise ConfigError(f"registry {reg_root} is a file, not a folder; give another --registry")
    return Registry(reg_root)


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what making it creates),
    as an absolute path."""
    path = path.absolute()
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def own_files(folder: Path, names=RUN_FILES) -> dict[str, int]:
    """The regular files ``names`` (paths relative to ``folder``) that exist, each held open
    (a descriptor), so that its inode cannot be freed and reused by a file put in its place."""
    out = {}
    for name in names:
        with contextlib.suppress(OSError):
            fd = os.open(folder / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            if stat.S_ISREG(os.fstat(fd).st_mode):
                out[name] = fd
            else:
                os.close(fd)
    return out


def _own_tree(folder: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """Every regular file under ``folder`` (held open, see :func:`own_files`) and every
    subfolder, by path relative to ``folder``."""
    files, folders = _listing(folder)
    return own_files(folder, files), folders


def _listing(folder: Path) -> tuple[list[str], tuple[str, ...]]:
    """The files and the subfolders under ``folder`` (links are files: never followed)."""
    files: list[str] = []
    folders: list[str] = []
    for where, dirs, names in os.walk(folder):
        rel = Path(where).relative_to(folder)
        for d in dirs:
            (files if os.path.islink(Path(where, d)) else folders).append(str(rel / d))
        files.extend(str(rel / n) for n in names)
    return files, tuple(folders)


def _holds_only(folder: Path, files: dict[str, int], folders: tuple[str, ...]) -> bool:
    """Whether ``folder`` holds nothing but (some of) ``files`` and ``folders``."""
    there, subfolders = _listing(folder)
    return set(there) <= set(files) and set(subfolders) <= set(folders)


def _dir_id(folder: Path) -> tuple[int, int] | None:
    """``folder``'s (device, inode) when it is a folder itself (not a link to one)."""
    try:
        there = folder.lstat()
    except OSError:
        return None
    return (there.st_dev, there.st_ino) if stat.S_ISDIR(there.st_mode) else None


def unmake(
    path: Path,
    made: Path,
    own: dict[str, int],
    folders: tuple[str, ...] = (),
    ids: dict[str, tuple[int, int]] | None = None,
) -> None:
    """Remove what preparing the folder ``path`` wrote: the files in ``own`` that are still
    those very files (same inode as the descriptor held: a file or link put in one's place
    stays), its subfolders ``folders``, then ``path`` and the folders above it up to
    ``made``, the outermost it created, each only while empty: a folder another run wrote
    into meanwhile (a sibling run under a shared ``runs/``) stays. With ``ids`` (relative
    path -> identity recorded when made, ``""``: ``path``), a folder that is no longer the
    one recorded (another moved in, or a link) stays, and when ``path`` itself is not, no
    folder goes."""
    path, made = path.absolute(), made.absolute()

    def recorded(rel: str) -> bool:
        return ids is None or (ids.get(rel) is not None and _dir_id(path / rel) == ids[rel])

    for name, fd in own.items():
        with contextlib.suppress(OSError):
            held, there = os.fstat(fd), (path / name).lstat()
            if stat.S_ISREG(there.st_mode) and (there.st_dev, there.st_ino) == (
                held.st_dev,
                held.st_ino,
            ):
                (path / name).unlink()
    if not recorded(""):
        return
    for sub in sorted(folders, key=lambda f: -len(Path(f).parts)):  # the deepest first
        if recorded(sub):
            with contextlib.suppress(OSError):
                (path / sub).rmdir()
    for folder in (path, *path.parents):
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            return
        if folder == made:
            return


@contextlib.contextmanager
def _echo(out: TextIO):
    """The run's report (the ``peftkit.run`` logger) written to ``out`` as well, for the
    duration."""
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("peftkit.run")
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


def _broadcast(state, value: Any) -> Any:
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
