"""The run folder: what one ``peftkit run`` leaves behind, and runs side by side.

    runs/quickstart-20250101-120000/
      recipe.yaml         the resolved recipe (after overrides)
      environment.json    versions, device, processes, command line
      metrics.json        test metrics, trainable parameters, time, peak memory (written last:
                          a folder without it is an interrupted run, resumed by the same command)
      report.txt|.json    the classification report: per class and averages
      predictions.jsonl   one line per test row: text, gold and predicted label, probabilities
                          (calibrated, as served, when a temperature was fit; abstained)
      confusion.png       the confusion matrix
      curves.png          loss and validation metric curves (training runs)
      history.json        the training log rows; checkpoints/ for resuming
      run.log             everything the run printed and logged

``compare(["runs/a", "runs/b"])`` reads each ``metrics.json`` into one row per run, and
``peftkit.metrics.table.format_table(rows, COMPARE_COLUMNS)`` lays them out for a terminal;
two runs scored on the same test rows are compared row by row by
``peftkit.run.predictions.compare_two``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import resource
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import ConfigError
from peftkit.paths import atomic_write_text

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; a second run is not detected
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "COMPARE_COLUMNS",
    "compare",
    "default_run_dir",
    "check_run_dir",
    "environment",
    "lock_run_dir",
    "peak_rss_mb",
    "prepare_run_dir",
    "run_id",
    "run_log",
    "write_json",
    "write_report",
]

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
ENVIRONMENT_FILE = "environment.json"
LOG_FILE = "run.log"
COMPARE_COLUMNS = (
    ("run", "run"),
    ("recipe", "recipe"),
    ("method", "method"),
    ("accuracy", "accuracy"),
    ("accuracy_ci95", "95% interval"),
    ("macro_f1", "macro-F1"),
    ("macro_f1_ci95", "95% interval"),
    ("trainable", "trainable params"),
    ("train_seconds", "train s"),
    ("peak_rss_mb", "peak RSS MiB"),
)


# --- the folder ---------------------------------------------------------------------------------


def run_name(name: str, data_name: str) -> str:
    """A run folder's name: the recipe's, and the data's when the recipe's does not say it
    (``zero-shot-sst2`` on AG News runs as ``zero-shot-sst2-ag_news``)."""
    plain = re.sub(r"[^A-Za-z0-9]+", "", data_name.lower())
    if not plain or plain in re.sub(r"[^A-Za-z0-9]+", "", name.lower()):
        return name
    return f"{name}-{re.sub(r'[^A-Za-z0-9._-]+', '-', data_name).strip('-.')}"[:128]


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>`` (a suffix is added if that exists already)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{name}-{stamp}-{n}"
    return path


def interrupted_run(root: str | Path, name: str, resolved: dict[str, Any]) -> Path | None:
    """The newest ``root/<name>-*`` folder that holds this same recipe and never finished."""
    found = [p for p in Path(root).glob(f"{name}-*") if p.is_dir() and not p.is_symlink()]
    candidates = sorted(found, key=lambda p: p.stat().st_mtime)
    for path in reversed(candidates):
        if _is_interrupted(path, resolved):
            return path
    return None


def _is_interrupted(path: Path, resolved: dict[str, Any]) -> bool:
    recipe = path / RECIPE_FILE
    if recipe.is_symlink() or not recipe.is_file() or (path / METRICS_FILE).is_file():
        return False
    from peftkit.config.schema import load_yaml, read_text

    try:
        return load_yaml(read_text(recipe, "recipe"), str(recipe)) == resolved
    except ConfigError:  # unreadable, not UTF-8, or not peftkit's YAML: not this run's
        return False


RUN_FILE = "run.json"  # written first: marks a folder as a peftkit run, holds the run id
LOCK_FILE = "run.lock"
# What a run writes at the top of its folder; --overwrite removes these and nothing else.
RUN_ENTRIES = frozenset(
    {RECIPE_FILE, METRICS_FILE, ENVIRONMENT_FILE, LOG_FILE, RUN_FILE, LOCK_FILE}
    | {"history.json", "results.json", "predictions.jsonl", "checkpoints", "tasks"}
    | {"adapter", "registered.json"}
    | {"tensorboard", "mlruns", "wandb", "tracker.json"}  # training.log_with's stores, run
)
RUN_SUFFIXES: tuple[str, ...] = (
    *("report.txt", "report.json", "confusion.png", "curves.png", "predictions.jsonl"),
    *("calibration.json", "reliability.png", "risk_coverage.png", "risk_coverage.json"),
)


def is_run_entry(name: str) -> bool:
    """Whether a top-level entry of a run folder is one a run writes."""
    return name in RUN_ENTRIES or name.endswith(RUN_SUFFIXES) or name.startswith(f".{RECIPE_FILE}")


def check_run_dir(path: str | Path, resolved: dict[str, Any], *, overwrite: bool = False) -> bool:
    """Check, without writing anything, that ``path`` can take this run; True when it holds
    an unfinished run of this same recipe (to resume). A ConfigError says what is in the way.

    A folder may be replaced (``overwrite``) only when peftkit recognises it as one of its
    run folders and everything in it is what a run writes; a folder with anything else in it
    is refused with what was found, so ``--overwrite`` never deletes a user's files.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a link" if path.is_symlink() else "a file"
        raise ConfigError(f"run folder {path} is {kind}, not a folder; give another --run-dir")
    if not path.exists():
        return False
    entries = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
    if not entries:
        return False
    foreign = [n for n in entries if not is_run_entry(n)]
    recognised = not foreign and ((path / RUN_FILE).is_file() or (path / RECIPE_FILE).is_file())
    if overwrite:
        if not recognised:
            shown = ", ".join(foreign[:8] or entries[:8]) + (", ..." if len(entries) > 8 else "")
            raise ConfigError(
                f"--overwrite replaces only a peftkit run folder, and {path} is not one "
                f"(it holds {shown}); nothing was deleted. Give another --run-dir"
            )
        return False
    if _is_interrupted(path, resolved):
        return True
    if recognised and not _holds_results(path):
        return False  # a run that failed before its first result: reused
    if foreign:
        raise ConfigError(
            f"run folder {path} already exists and is not a peftkit run folder (it holds "
            f"{', '.join(foreign[:8])}); give another --run-dir"
        )
    why = (
        "holds a finished run"
        if (path / METRICS_FILE).is_file()
        else "is not an unfinished run of this same recipe"
    )
    raise ConfigError(
        f"run folder {path} already exists and {why}; give another --run-dir, or "
        "--overwrite to replace it"
    )


def prepare_run_dir(
    path: str | Path, resolved: dict[str, Any], *, overwrite: bool = False
) -> tuple[Path, bool]:
    """Create the run folder (or reuse an interrupted run of the same recipe).

    Returns ``(path, resuming)``. An existing folder is an error (see :func:`check_run_dir`)
    unless ``overwrite`` (the entries a run writes are removed), it holds an unfinished run
    of this very recipe (training resumes from its last checkpoint), or it holds no result
    at all (empty, or what a run that failed before training left: reused, the log
    appended to). Call it while holding the folder's lock (:func:`lock_run_dir`).
    """
    path = Path(path)
    resuming = check_run_dir(path, resolved, overwrite=overwrite)
    if overwrite and path.is_dir():
        for entry in path.iterdir():
            if entry.name == LOCK_FILE:
                continue  # held by this run
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    if not (path / RUN_FILE).is_file():
        write_json(path / RUN_FILE, {"run_id": uuid.uuid4().hex, "created": _now_iso()})
    atomic_write_text(path / RECIPE_FILE, yaml.safe_dump(resolved, sort_keys=False))
    return path, resuming


def run_id(path: str | Path) -> str:
    """The id a run folder was given when it was made (kept across resumes)."""
    try:
        return str(json.loads((Path(path) / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{Path(path) / RUN_FILE}: cannot read the run id ({exc})") from None


@contextmanager
def lock_run_dir(path: str | Path) -> Iterator[Path]:
    """Hold ``path``'s lock for the duration: a second run into the same folder is refused,
    naming the process that holds it. The folder is created if needed (and removed again
    if it is still empty when the run is refused before writing anything)."""
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        links = os.fstat(fd).st_nlink
        if links > 1:  # truncating it would empty the file under its other names too
            raise ConfigError(
                f"run folder {path}: its {LOCK_FILE} has {links} hard links, and peftkit "
                "never writes through a link; remove that file, or give another --run-dir"
            )
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
                raise ConfigError(
                    f"run folder {path} is in use by another run ({holder}); wait for it to "
                    "finish, or give another --run-dir"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()} since {_now_iso()}".encode(), 0)
        yield path
    except BaseException:
        _drop_if_bare(path, created)
        raise
    finally:
        os.close(fd)


def _drop_if_bare(path: Path, created: bool) -> None:
    """Remove a folder this call created when it holds nothing but its lock."""
    if created and [p.name for p in path.iterdir()] == [LOCK_FILE]:
        (path / LOCK_FILE).unlink()
        path.rmdir()


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _holds_results(path: Path) -> bool:
    """Anything in the folder besides what every run writes before its first result."""
    before = (RECIPE_FILE, ENVIRONMENT_FILE, LOG_FILE, RUN_FILE, LOCK_FILE)
    return any(p.name not in before for p in path.iterdir())


def environment(num_processes: int = 1) -> dict[str, Any]:
    """Versions, device and command line, for ``environment.json``."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions: dict[str, str | None] = {}
    for name in ("peftkit", "torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cuda_devices": torch.cuda.device_count(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "num_processes": num_processes,
        "command": sys.argv,
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, data: Any) -> Path:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path


def write_report(
    run_dir: Path, report: Any, title: str = "", prefix: str = "", note: str = ""
) -> None:
    """``report.txt``, ``report.json`` and ``confusion.png`` (``prefix`` for extra tasks);
    ``note`` (the intervals line) ends ``report.txt``."""
    from peftkit.run.plots import plot_confusion

    text = report.to_text() + (f"\n{note}\n" if note else "")
    atomic_write_text(run_dir / f"{prefix}report.txt", text)
    write_json(run_dir / f"{prefix}report.json", report.to_dict())
    plot_confusion(report, run_dir / f"{prefix}confusion.png", title=title)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


@contextmanager
def run_log(run_dir: Path) -> Iterator[logging.Handler]:
    """Send peftkit's log records to ``run_dir/run.log`` for the duration.

    Warnings still reach the terminal: with no logging configured, Python prints them only
    while no handler exists at all, so a stderr handler for warnings comes with the file.
    """
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("peftkit")
    old = logger.level
    added: list[logging.Handler] = [handler]
    if not logging.getLogger().handlers:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("peftkit: %(levelname)s: %(message)s"))
        console.setLevel(logging.WARNING)
        added.append(console)
    for h in added:
        logger.addHandler(h)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield handler
    except BaseException as exc:
        # into the file only: the terminal gets the error from whoever catches it
        what = "was interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        msg = f"the run {what}: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
        handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, msg, (), None))
        raise
    finally:
        for h in added:
            logger.removeHandler(h)
        logger.setLevel(old)
        handler.close()


# --- side by side ----------------------------------------------------------------------------------


def compare(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run from its ``metrics.json`` (keys of :data:`COMPARE_COLUMNS`).

    >>> rows = compare(["runs/sst2-lora-1", "runs/sst2-ia3-1"])     # doctest: +SKIP
    >>> print(format_table(rows, COMPARE_COLUMNS))                  # doctest: +SKIP
    """
    rows = []
    for folder in run_dirs:
        path = Path(folder) / METRICS_FILE
        if not path.is_file():
            state = "unfinished (no metrics.json)" if Path(folder).is_dir() else "not a folder"
            raise ConfigError(f"{folder}: not a finished run folder: {state}")
        try:
            metrics = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path}: unreadable metrics ({exc})") from None
        if not isinstance(metrics, dict):
            raise ConfigError(
                f"{path}: metrics must be a JSON object of names to values, "
                f"got {type(metrics).__name__}"
            )
        for key, _ in COMPARE_COLUMNS:
            value = metrics.get(key)
            if value is None or key in ("run", "recipe", "method"):
                continue
            pair = key.endswith("_ci95")
            numbers = value if pair and isinstance(value, list) and len(value) == 2 else [value]
            if (pair and numbers is not value) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers
            ):
                shape = "a [low, high] pair of numbers" if pair else "a number"
                raise ConfigError(f"{path}: {key!r} must be {shape}, got {value!r}")
        row = {key: metrics.get(key) for key, _ in COMPARE_COLUMNS}
        row["run"] = Path(folder).name
        rows.append(row)
    return rows
