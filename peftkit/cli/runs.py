"""``peftkit run`` and ``peftkit eval`` (a recipe into a run folder), ``peftkit compare``
(run folders side by side)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from peftkit.errors import ConfigError


def add_run_parsers(sub: argparse._SubParsersAction) -> None:
    for name, help_text in (
        ("run", "run a recipe: train, evaluate on the test split, register the adapter"),
        ("eval", "run a zero-/few-shot prompt recipe (no training)"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("recipe", help="built-in recipe name (see 'peftkit recipes list') or path")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
        p.add_argument("--run-dir", help="run folder (default: runs/<recipe>-<timestamp>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
        p.add_argument("--registry", help="registry folder (default: the recipe's, 'registry')")
        p.set_defaults(func=cmd_run, command=name)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="several run folders side by side; two runs on the same test rows: their paired "
        "difference with its 95%% interval and McNemar's test",
    )
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON rows instead of a table (two runs: {runs, paired})",
    )
    p.set_defaults(func=cmd_compare)


# --- run / eval ----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from peftkit.config.recipes import load_recipe
    from peftkit.run.pipeline import run_recipe

    for flag, value in (("--run-dir", args.run_dir), ("--registry", args.registry)):
        if value is not None and not value.strip():
            raise ConfigError(f"{flag} is empty; give a folder (or leave {flag} out)")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "eval" and recipe.prompt is None:
        raise ConfigError(
            f"{recipe.source}: 'peftkit eval' runs prompt recipes (with 'prompt:'); "
            f"this one trains an adapter: use 'peftkit run {args.recipe}'"
        )
    # the same folders again (never --overwrite: that would throw the checkpoint away)
    folders = [
        (flag, value)
        for flag, value in (("--run-dir", args.run_dir), ("--registry", args.registry))
        if value
    ]
    words = [args.command, args.recipe, *args.overrides, *(w for f in folders for w in f)]
    again = shlex.join(["peftkit", *words])
    args.resume_hint = f"to resume from the last checkpoint, run: {again}"
    try:
        with _report_to_stdout():
            outcome = run_recipe(
                recipe, run_dir=args.run_dir, registry=args.registry, overwrite=args.overwrite
            )
    except KeyboardInterrupt as exc:  # the loop says where it stopped: one line with the hint
        if str(exc):
            args.resume_hint = f"{exc}; to resume from it, run: {again}"
        raise
    args.resume_hint = None
    return 0 if outcome.run_dir else 1


class _MainProcess(logging.Filter):
    """Under ``accelerate launch`` every process runs the recipe; one prints its report."""

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def _report_to_stdout() -> Iterator[None]:
    """The run's report (logger ``peftkit.run``) printed on stdout, as the command's output."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_MainProcess())
    report = logging.getLogger("peftkit.run")
    old = report.level
    report.setLevel(logging.INFO)
    report.addHandler(handler)
    try:
        yield
    finally:
        report.removeHandler(handler)
        report.setLevel(old)


# --- compare -------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    from peftkit.metrics.table import format_table
    from peftkit.run.folders import COMPARE_COLUMNS, compare

    rows = compare(args.runs)
    if len(args.runs) != 2:
        print(json.dumps(rows, indent=2) if args.json else format_table(rows, COMPARE_COLUMNS))
        return 0
    from peftkit.run.predictions import compare_two, comparison_text

    a, b = (Path(r).name for r in args.runs)
    try:
        paired, why = compare_two(*args.runs)
    except ConfigError as exc:  # a run without per-row predictions: the table alone
        paired, why = None, str(exc)
    if args.json:
        found = paired.to_dict() if paired is not None else {"reason": why}
        print(json.dumps({"runs": rows, "paired": {"a": a, "b": b, **found}}, indent=2))
        return 0
    print(format_table(rows, COMPARE_COLUMNS))
    print("\n" + (comparison_text(paired, a, b) if paired is not None else why))
    return 0
