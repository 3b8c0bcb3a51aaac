"""Experiment trackers (``training.log_with``): Accelerate's TensorBoard, MLflow and W&B
trackers, fed by the training loop (``train/loss``, ``train/learning_rate``,
``train/epoch`` every ``log_every`` steps; ``eval/<metric>`` at every evaluation) and, at the
end, the test metrics (``test/<metric>``) and the classification report as text.

The experiment (project) is ``training.tracker_project`` (a recipe's name by default) and the
run is ``training.tracker_run`` (the run folder's name by default). By default every tracker
writes under the training run's folder:

- ``tensorboard``: event files in ``<run>/tensorboard/<project>/``;
- ``mlflow``: the tracking URI in force (``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``),
  else a local store in ``<run>/mlruns`` (MLflow's file store, which MLflow 3 keeps in
  maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE=true``: set for the run, then unset);
  the report is the run's ``report.txt`` artifact;
- ``wandb``: wandb's own settings (``WANDB_MODE=offline`` keeps it local), files in ``<run>/wandb``.

Each tracker's library comes with peftkit's extra of the same name; a missing one is a
``ConfigError`` raised when the recipe is checked (:func:`check_installed`). Only the main
process tracks. No heavy import at module level.

A resumed run continues its tracker's run. At its first start a run writes ``tracker.json``
(which tracker, project, run name and run id) into its folder; when training resumes from a
checkpoint, :func:`init_kwargs` passes the run back: MLflow's ``run_id`` (the run is set
running again; its parameters are kept, new ones added), W&B's ``id`` with
``resume="allow"``, and TensorBoard writes on in the same log dir with ``purge_step`` set to
the step after the checkpoint, so the steps the interrupted half logged past its checkpoint
are hidden rather than shown twice. Steps are the loop's global step, so they go on from the
checkpoint. MLflow cannot delete metric values: a step logged past the last checkpoint
before the interruption keeps both values in its metric history (the resumed one last). A run
that starts over (no checkpoint yet) starts a new tracker run, as does one whose recorded
MLflow run is not in the tracking store in force (a warning says so).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from peftkit.config.training import TRACKERS, TrainConfig
from peftkit.errors import ConfigError
from peftkit.paths import atomic_write_text

__all__ = [
    "TRACKERS",
    "Tracking",
    "accelerator_kwargs",
    "check_installed",
    "init_kwargs",
    "log_row",
    "named",
    "read_record",
    "start",
]
log = logging.getLogger(__name__)

LIBRARY = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # its module
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
REPORT_KEY = "test/report"
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"
TRACKER_FILE = "tracker.json"  # the tracker's run this run folder logs to, for a resume
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def check_installed(name: str | None, where: str = "") -> None:
    """``ConfigError`` (one line, naming the extra) when tracker ``name``'s library is not
    installed; nothing is imported. ``where`` (a recipe's file) starts the message."""
    if name is None:
        return
    module = LIBRARY[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}training.log_with: {name} needs the {module} package, which is not "
            f"installed: pip install 'peftkit[{name}]'"
        )


def named(config: TrainConfig, project: str, run: str) -> TrainConfig:
    """``config`` with the tracker's project and run defaulting to ``project`` and ``run``
    (a recipe's name and its run folder's); unchanged when it tracks nothing."""
    if config.log_with is None:
        return config
    return replace(
        config,
        tracker_project=config.tracker_project or project,
        tracker_run=config.tracker_run or run[:250],
    )


def accelerator_kwargs(config: TrainConfig, run_dir: str | Path) -> dict[str, Any]:
    """What the run's ``Accelerator`` is made with to track (nothing when it does not)."""
    if config.log_with is None:
        return {}
    return {"log_with": config.log_with, "project_dir": str(Path(run_dir) / TENSORBOARD_DIR)}


@dataclass
class Tracking:
    """The trackers of one training run, started on ``acc`` (empty on other processes)."""

    acc: Any
    local_uri: str | None = None  # the MLflow store this run set, unset again at close
    allowed_file_store: bool = False  # this run set MLFLOW_ALLOW_FILE_STORE

    def final(self, metrics: dict[str, Any], report: str | None, step: int) -> None:
        """The test metrics (``test/<name>``) and the report's text, at the last step."""
        trackers = list(getattr(self.acc, "trackers", ()))
        if not trackers:
            return
        values = {f"test/{k}": v for k, v in metrics.items() if _number(v)}
        if values:
            self.acc.log(values, step=step)
        if report is None:
            return
        for tracker in trackers:
            if tracker.name == "mlflow":  # MLflow's metrics are numbers: the text is an artifact
                import mlflow

                mlflow.log_text(report, "report.txt")
            elif tracker.name == "tensorboard":  # markdown: indented, it keeps its columns
                tracker.log({REPORT_KEY: _indented(report)}, step=step)
            else:
                tracker.log({REPORT_KEY: report}, step=step)

    def close(self, *, failed: bool = False) -> None:
        """End every tracker's run (an MLflow run that ``failed`` is marked so) and give back
        the MLflow settings this run made. Safe to call twice."""
        trackers = getattr(self.acc, "trackers", None) or []
        try:
            for tracker in trackers:
                if failed and tracker.name == "mlflow":
                    import mlflow

                    mlflow.end_run(status="FAILED")
                else:
                    tracker.finish()  # not acc.end_training(): it ends the process group too
        finally:
            trackers.clear()
            self._restore()

    def _restore(self) -> None:
        if self.local_uri is not None:
            import mlflow

            if mlflow.get_tracking_uri() == self.local_uri:
                mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # back to the default
            self.local_uri = None
        if self.allowed_file_store:
            os.environ.pop(ALLOW_FILE_STORE, None)
            self.allowed_file_store = False


def start(
    acc: Any,
    config: TrainConfig,
    run_dir: str | Path,
    params: dict[str, Any],
    resumed_from: int = 0,
) -> Tracking:
    """Start ``config.log_with``'s run on ``acc`` (made with :func:`accelerator_kwargs`),
    logging ``params`` (the run's settings) as its configuration, and record it in
    ``run_dir/tracker.json``; training that resumed from a checkpoint at step
    ``resumed_from`` continues the run recorded there (:func:`init_kwargs`)."""
    tracking = Tracking(acc)
    name = config.log_with
    if name is None:
        return tracking
    check_installed(name)
    if name not in {str(t) for t in getattr(acc, "log_with", ())}:
        raise ConfigError(
            f"training.log_with: {name}, but the Accelerator given to train() was made without "
            f"it: make it with log_with={name!r} (or let train() make it)"
        )
    if not acc.is_main_process:
        return tracking
    run_dir = Path(run_dir)
    run = config.tracker_run or run_dir.name
    project = config.tracker_project or "peftkit"
    previous = read_record(run_dir) if resumed_from > 0 else None
    kwargs = init_kwargs(name, project, run, run_dir, previous, resumed_from)
    values = {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))}
    try:
        if name == "mlflow":
            _local_mlflow_store(tracking, run_dir / MLFLOW_DIR)
            if "run_id" in kwargs and not _mlflow_run_exists(kwargs["run_id"]):
                log.warning(
                    "training.log_with: mlflow: run %s (recorded in %s) is not in the tracking "
                    "store %s; starting a new MLflow run",
                    kwargs.pop("run_id"),
                    run_dir / TRACKER_FILE,
                    _mlflow_uri(),
                )
        elif name == "wandb":
            run_dir.mkdir(parents=True, exist_ok=True)
        # MLflow refuses to change a logged parameter: a continued run adds only new ones
        keep_params = name == "mlflow" and "run_id" in kwargs
        acc.init_trackers(
            project, config=None if keep_params else values, init_kwargs={name: kwargs}
        )
        if keep_params:
            _add_mlflow_params(kwargs["run_id"], values)
        record = {"log_with": name, "project": project, "run": run,
                  "run_id": _started_run_id(name, kwargs)}  # fmt: skip
        if name == "mlflow":
            record["tracking_uri"] = _mlflow_uri()
        recorded = None if previous is None else previous.get("run_id")
        if "run_id" in kwargs or "purge_step" in kwargs or kwargs.get("id") == recorded:
            log.info("training.log_with: %s: continuing run %s from step %d", name,
                     record["run_id"] or run, resumed_from)  # fmt: skip
        write_record(run_dir, record)
    except BaseException:
        tracking.close(failed=True)
        raise
    return tracking


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The run folder's ``tracker.json`` (None when there is none); ConfigError, one line
    naming the file, when it is not one peftkit wrote."""
    path = Path(run_dir) / TRACKER_FILE
    if not path.exists() and not path.is_symlink():
        return None
    fix = "delete it to start a new tracker run"
    if path.is_symlink() or not path.is_file():
        raise ConfigError(f"{path}: the tracker record must be a plain file; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable tracker record ({exc}); {fix}") from None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("log_with") not in TRACKERS
        or not isinstance(data.get("project"), str)
        or not (run_id is None or isinstance(run_id, str) and _RUN_ID.fullmatch(run_id))
    ):
        raise ConfigError(
            f"{path}: not a tracker record (log_with one of {', '.join(TRACKERS)}, a project, "
            f"a run_id of letters, digits, '-' or '_'); {fix}"
        )
    return data


def write_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``tracker.json`` into ``run_dir`` (atomically: a reader sees old or new)."""
    path = Path(run_dir) / TRACKER_FILE
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def init_kwargs(
    name: str,
    project: str,
    run: str,
    run_dir: str | Path,
    previous: dict[str, Any] | None = None,
    resumed_from: int = 0,
) -> dict[str, Any]:
    """Accelerate's ``init_kwargs[name]`` for tracker ``name``'s run ``run`` in
    ``project``: when training resumed from a checkpoint at step ``resumed_from`` (> 0) and
    ``previous`` (the folder's ``tracker.json``) recorded a run of the same tracker and
    project, that run is continued (MLflow ``run_id``; W&B ``id`` with ``resume="allow"``;
    TensorBoard's ``purge_step`` hides what the interrupted half logged past the checkpoint)."""
    same = (
        previous
        if resumed_from > 0
        and previous is not None
        and previous.get("log_with") == name
        and previous.get("project") == project
        and previous.get("run_id")
        else None
    )
    if name == "mlflow":
        return {"run_name": run, **({"run_id": same["run_id"]} if same else {})}
    if name == "wandb":
        # an id chosen here, not by wandb: it is recorded before the run starts
        run_id = same["run_id"] if same else uuid.uuid4().hex[:12]
        return {"name": run, "dir": str(run_dir), "id": run_id, "resume": "allow"}
    return {"purge_step": resumed_from + 1} if resumed_from > 0 else {}


def _started_run_id(name: str, kwargs: dict[str, Any]) -> str | None:
    if name == "mlflow":
        import mlflow

        active = mlflow.active_run()
        return None if active is None else str(active.info.run_id)
    return kwargs.get("id")  # W&B's, chosen by init_kwargs; TensorBoard has none


def _mlflow_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())


def _mlflow_run_exists(run_id: str) -> bool:
    """Whether the tracking store in force holds MLflow run ``run_id`` (not deleted)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = urlparse(_mlflow_uri())
    if uri.scheme in ("", "file") and not Path(url2pathname(uri.path)).exists():
        return False  # a file store not made yet (or removed) holds no run
    try:
        found = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return found.info.lifecycle_stage != "deleted"


def _add_mlflow_params(run_id: str, values: dict[str, Any]) -> None:
    """Log the parameters MLflow run ``run_id`` does not have yet; a changed one keeps its
    first value (MLflow refuses to change it), said in one line."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    kept = MlflowClient().get_run(run_id).data.params
    new = [
        (k, v) for k, v in values.items() if k not in kept and len(str(v)) <= MAX_PARAM_VAL_LENGTH
    ]
    for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(new[i : i + MAX_PARAMS_TAGS_PER_BATCH]))
    changed = sorted(k for k, v in values.items() if k in kept and kept[k] != str(v))
    if changed:
        log.info(
            "training.log_with: mlflow: run %s keeps its first values of %s (a resumed run "
            "cannot change a logged parameter)",
            run_id,
            ", ".join(changed),
        )


def log_row(acc: Any, row: dict[str, Any]) -> None:
    """One row of the loop's history to the trackers: a step's loss, learning rate and epoch
    (``train/...``) or an evaluation (``eval/...``), at its step."""
    if not getattr(acc, "trackers", None):
        return
    values = {}
    for key, value in row.items():
        if key == "step" or not _number(value):
            continue
        if key.startswith("eval_"):
            values[f"eval/{key[len('eval_') :]}"] = value
        else:
            values[f"train/{'learning_rate' if key == 'lr' else key}"] = value
    if values:
        acc.log(values, step=int(row["step"]))


def _local_mlflow_store(tracking: Tracking, folder: Path) -> None:
    """Point MLflow at a file store in ``folder`` unless a tracking URI is set already."""
    import mlflow

    if mlflow.is_tracking_uri_set():  # MLFLOW_TRACKING_URI, or set by the caller
        return
    if ALLOW_FILE_STORE not in os.environ:
        os.environ[ALLOW_FILE_STORE] = "true"
        tracking.allowed_file_store = True
    tracking.local_uri = folder.absolute().as_uri()
    mlflow.set_tracking_uri(tracking.local_uri)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _indented(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())
