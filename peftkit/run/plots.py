"""Pictures of a run: the confusion matrix, the training curves, the reliability diagram
and the risk-coverage curve, as image files.

Drawn on a bare ``matplotlib.figure.Figure`` (the Agg renderer), never through pyplot's
global state, so it works headless, in threads and in tests; nothing is ever shown::

    from peftkit.metrics.report import classification_report
    from peftkit.run.plots import plot_confusion, plot_history

    report = classification_report(y_true, y_pred, labels)
    plot_confusion(report, run_dir / "confusion.png", title="sst2 · lora")
    plot_history(history, run_dir / "curves.png")

The format follows the suffix (``.png``, ``.svg`` or ``.pdf``); files are written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from peftkit.errors import ConfigError, DataError
from peftkit.metrics.report import ClassificationReport
from peftkit.paths import atomic_write_bytes

FORMATS = ("png", "svg", "pdf")
DPI = 110
MAX_ANNOTATED = 20  # write the count in each cell up to this many labels
MAX_LABEL_CHARS = 28
# Keys in eval rows that are bookkeeping, not metrics (names as transformers logs them).
NOT_METRICS = frozenset(
    {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_epoch"}
)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ConfigError(
            f"cannot write a plot to {path}: the suffix must be one of "
            + ", ".join("." + f for f in FORMATS)
        )
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=DPI, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _short(label: str) -> str:
    """A tick label: cut to MAX_LABEL_CHARS, with ``$`` escaped (matplotlib reads mathtext)."""
    if len(label) > MAX_LABEL_CHARS:
        label = label[: MAX_LABEL_CHARS - 1] + "…"
    return label.replace("$", r"\$")


# --- confusion matrix -------------------------------------------------------------------


def plot_confusion(report: ClassificationReport, path: Path, title: str = "") -> Path:
    """Draw ``report.confusion`` (rows true, columns predicted) to ``path``; returns the path.

    Cell colour is the fraction of the true class (so rare classes stay visible); counts
    are written in the cells up to 20 labels. The figure and fonts scale so that ~80
    labels stay readable. Example:
    ``plot_confusion(classification_report(y_true, y_pred, labels), Path("confusion.png"))``
    """
    counts = np.asarray(report.confusion, dtype=np.int64)
    n = len(report.labels)
    if counts.shape != (n, n):
        raise DataError(
            f"report.confusion has shape {counts.shape} but there are {n} labels; "
            f"expected ({n}, {n})"
        )
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)

    side = min(max(4.8, 0.27 * n + 3.0), 26.0)
    font = 10 if n <= 10 else 8 if n <= 25 else 7 if n <= 50 else 6
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    colorbar.set_label("share of the true class", fontsize=9)
    colorbar.ax.tick_params(labelsize=8)

    names = [_short(label) for label in report.labels]
    ax.set_xticks(
        range(n),
        names,
        fontsize=font,
        rotation=45 if n <= MAX_ANNOTATED else 90,
        ha="right" if n <= MAX_ANNOTATED else "center",
        rotation_mode="anchor" if n <= MAX_ANNOTATED else "default",
    )
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted", fontsize=max(10, round(side / 2.5)))
    ax.set_ylabel("true", fontsize=max(10, round(side / 2.5)))
    ax.tick_params(length=2)
    if n <= MAX_ANNOTATED:
        _annotate(ax, counts, share, font)

    headline = (
        f"accuracy {report.accuracy:.3f} · macro F1 {report.macro.f1:.3f} · n = {report.support}"
    )
    title = title.replace("$", r"\$")
    ax.set_title(f"{title}\n{headline}" if title else headline, fontsize=max(11, round(side / 2)))
    return _save(fig, path)


def _annotate(ax: Any, counts: np.ndarray, share: np.ndarray, font: int) -> None:
    for (t, p), count in np.ndenumerate(counts):
        color = "white" if share[t, p] > 0.55 else "black" if count else "0.7"
        ax.text(p, t, str(count), ha="center", va="center", fontsize=font, color=color)


# --- training curves --------------------------------------------------------------------


def plot_history(
    history: Sequence[Mapping[str, Any]], path: Path, *, loss_label: str = "train"
) -> Path:
    """Draw the loss (left) and eval metrics (right) against the step to ``path``.

    ``history`` holds training rows such as ``{"step": 10, "epoch": 0.5, "loss": 0.7,
    "lr": 2e-5}`` and eval rows such as ``{"step": 20, "eval_accuracy": 0.8,
    "eval_macro_f1": 0.7}``. ``eval_loss`` joins the loss panel; the learning rate, when
    logged (``lr`` or ``learning_rate``), is drawn faintly on the loss panel's right axis.
    ``loss_label`` names the training loss (a contrastive run's is the pair loss, not the
    cross-entropy ``eval_loss`` is). Example: ``plot_history(history, Path("curves.png"))``.
    """
    train: dict[str, list[tuple[float, float]]] = {"loss": [], "eval_loss": [], "lr": []}
    metrics: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(history):
        step = _step(row, i)
        for key, value in row.items():
            if not _is_number(value):
                continue
            if key in ("loss", "eval_loss"):
                train[key].append((step, float(value)))
            elif key in ("lr", "learning_rate"):
                train["lr"].append((step, float(value)))
            elif key.startswith("eval_") and key not in NOT_METRICS:
                metrics.setdefault(key, []).append((step, float(value)))
    if not (train["loss"] or train["eval_loss"] or metrics):
        raise DataError(f"history has {len(history)} rows but no 'loss' or 'eval_*' values to plot")

    fig = Figure(figsize=(12.0, 4.4))
    loss_ax, metric_ax = fig.subplots(1, 2)
    _loss_panel(loss_ax, train, loss_label)
    _metric_panel(metric_ax, metrics)
    fig.set_layout_engine("constrained")
    return _save(fig, path)


def _step(row: Mapping[str, Any], index: int) -> float:
    if not isinstance(row, Mapping):
        raise DataError(f"history[{index}] must be a mapping like {{'step': 10, 'loss': 0.7}}")
    step = row.get("step")
    if step is None or not _is_number(step):
        raise DataError(f"history[{index}] has no numeric 'step' (keys: {sorted(row)})")
    return float(step)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _xy(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    points = sorted(points)
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def _loss_panel(ax: Any, train: dict[str, list[tuple[float, float]]], label: str) -> None:
    ax.set_title("loss", fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if train["loss"]:
        x, y = _xy(train["loss"])
        smooth = len(y) >= 20
        ax.plot(
            x,
            y,
            color="tab:blue",
            alpha=0.35 if smooth else 1.0,
            lw=1,
            label=label if not smooth else f"{label} (raw)",
        )
        if smooth:  # a moving average over ~5% of the points shows the trend
            ax.plot(
                x,
                _moving_average(y, max(3, len(y) // 20)),
                color="tab:blue",
                lw=2,
                label=f"{label} (smoothed)",
            )
    if train["eval_loss"]:
        x, y = _xy(train["eval_loss"])
        ax.plot(x, y, "o-", color="tab:orange", lw=1.5, ms=4, label="eval (cross-entropy)")
    if not (train["loss"] or train["eval_loss"]):
        _empty(ax, "no loss logged")
        return
    handles, names = ax.get_legend_handles_labels()
    if train["lr"]:
        lr_ax = ax.twinx()
        x, y = _xy(train["lr"])
        lr_ax.plot(x, y, "--", color="0.55", lw=1, label="learning rate")
        lr_ax.set_ylabel("learning rate", color="0.45", fontsize=9)
        lr_ax.tick_params(axis="y", colors="0.45", labelsize=8)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        more = lr_ax.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    ax.legend(handles, names, fontsize=8, loc="upper right")


def _metric_panel(ax: Any, metrics: dict[str, list[tuple[float, float]]]) -> None:
    ax.set_title("eval metrics", fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if not metrics:
        _empty(ax, "no eval metrics logged")
        return
    for key in sorted(metrics):
        x, y = _xy(metrics[key])
        name = key.removeprefix("eval_")
        ax.plot(x, y, "o-", lw=1.5, ms=4, label=f"{name} (last {y[-1]:.3f})")
    ax.legend(fontsize=8, loc="best")


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points, skipping non-finite values (a NaN loss)."""
    valid = np.isfinite(y)
    sums = np.concatenate([[0.0], np.cumsum(np.where(valid, y, 0.0))])
    counts = np.concatenate([[0], np.cumsum(valid)])
    start = np.maximum(np.arange(1, len(y) + 1) - window, 0)
    total, n = sums[1:] - sums[start], counts[1:] - counts[start]
    return np.divide(total, n, out=np.full(len(y), np.nan), where=n > 0)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_xticks([])
    ax.set_yticks([])


# --- confidence -------------------------------------------------------------------------


def plot_reliability(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    path: Path,
    *,
    title: str = "",
    temperature: float | None = None,
) -> Path:
    """Reliability diagrams side by side: accuracy per confidence bin against the diagonal,
    before and after temperature scaling (``metrics.calibration.reliability``'s dicts), with
    each side's ECE and the share of rows per bin drawn faintly."""
    fig = Figure(figsize=(10.0, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
    after_name = "after" if temperature is None else f"after (T = {temperature:.3f})"
    for ax, data, name in zip(axes, (before, after), ("before", after_name), strict=True):
        _reliability_panel(ax, data, name)
    axes[0].set_ylabel("accuracy")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.set_layout_engine("constrained")
    return _save(fig, path)


def _reliability_panel(ax: Any, data: Mapping[str, Any], name: str) -> None:
    edges = np.asarray(data["edges"], dtype=float)
    width = np.diff(edges)
    count = np.asarray(data["count"], dtype=float)
    acc = np.array([np.nan if a is None else a for a in data["accuracy"]], dtype=float)
    conf = np.array([np.nan if c is None else c for c in data["confidence"]], dtype=float)
    filled = count > 0
    left, w, a, c = edges[:-1][filled], width[filled], acc[filled], conf[filled]
    ax.plot([0, 1], [0, 1], "--", color="0.5", lw=1, label="perfectly calibrated")
    ax.bar(left, a, width=w, align="edge", color="tab:blue", edgecolor="white", alpha=0.8,
           label="accuracy")  # fmt: skip
    ax.bar(left, np.abs(c - a), bottom=np.minimum(a, c), width=w, align="edge",
           color="tab:red", alpha=0.3, label="gap to mean confidence")  # fmt: skip
    share = ax.twinx()
    share.step(edges, np.r_[count, count[-1:]] / max(count.sum(), 1), where="post",
               color="0.35", lw=1, alpha=0.7)  # fmt: skip
    share.set_ylim(0, 1)
    share.set_ylabel("share of rows (line)", color="0.4", fontsize=8)
    share.tick_params(axis="y", colors="0.4", labelsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_title(f"{name}: ECE {data['ece']:.4f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def plot_risk_coverage(curve: Mapping[str, Any], path: Path, *, title: str = "") -> Path:
    """The risk (error rate among answered rows) against the coverage (share answered) as
    the threshold falls (``metrics.calibration.risk_coverage``'s dict), the chosen
    threshold's point marked when ``curve["chosen"]`` holds one."""
    coverage = np.asarray(curve["coverage"], dtype=float)
    risk = np.asarray(curve["risk"], dtype=float)
    if coverage.size == 0:
        raise DataError("the risk-coverage curve has no points (no row was answered)")
    fig = Figure(figsize=(6.0, 4.4))
    ax = fig.subplots()
    ax.step(coverage, risk, where="post", color="tab:blue", lw=1.5,
            label=f"risk (AURC {curve.get('aurc', float('nan')):.4f})")  # fmt: skip
    chosen = curve.get("chosen")
    if chosen:
        ax.plot([chosen["coverage"]], [chosen["risk"]], "o", color="tab:red", ms=7,
                label=f"threshold {chosen['threshold']:.3f}")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.05, float(np.nanmax(risk)) * 1.1))
    ax.set_xlabel("coverage (share of rows answered)")
    ax.set_ylabel("risk (error rate among answered)")
    ax.set_title(title or "risk-coverage", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.set_layout_engine("constrained")
    return _save(fig, path)
