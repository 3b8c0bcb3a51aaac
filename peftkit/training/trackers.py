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
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from peftkit.config.training import TRACKERS, TrainConfig
from peftkit.errors import ConfigError

__all__ = [
    "TRACKERS",
    "Tracking",
    "accelerator_kwargs",
    "check_installed",
    "log_row",
    "named",
    "start",
]

LIBRARY = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # its module
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
REPORT_KEY = "test/report"
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"


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


def start(acc: Any, config: TrainConfig, run_dir: str | Path, params: dict[str, Any]) -> Tracking:
    """Start ``config.log_with``'s run on ``acc`` (made with :func:`accelerator_kwargs`),
    logging ``params`` (the run's settings) as its configuration."""
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
    kwargs: dict[str, Any] = {}
    if name == "mlflow":
        _local_mlflow_store(tracking, run_dir / MLFLOW_DIR)
        kwargs = {"run_name": run}
    elif name == "wandb":
        run_dir.mkdir(parents=True, exist_ok=True)
        kwargs = {"name": run, "dir": str(run_dir)}
    try:
        acc.init_trackers(
            config.tracker_project or "peftkit",
            config={k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))},
            init_kwargs={name: kwargs},
        )
    except BaseException:
        tracking.close(failed=True)
        raise
    return tracking


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
