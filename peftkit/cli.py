"""The ``peftkit`` command.

    peftkit run quickstart                              # train, evaluate, register, report
    peftkit run recipes/sst2-lora.yaml data.source=../shared/data/sst2 training.epochs=1
    peftkit eval zero-shot-sst2 data.source=../shared/data/sst2
    peftkit adapters list | show NAME | rm NAME | export NAME DEST | import FOLDER
    peftkit adapters verify [NAME] | doctor | rebuild
    peftkit adapters promote NAME@V --alias production --gate "accuracy on DATA >= alias - 0.5"
    echo "stocks fell" | peftkit predict --adapter quickstart
    peftkit compare runs/*

Exit status: 0 when it worked; 1 with one line ``peftkit: error: ...`` on stderr for bad input
or a refused operation; 2 for bad command-line usage; 130 when interrupted (Ctrl-C, or the
SIGTERM a job scheduler sends: a training run then says where its checkpoint is, as for Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, DataError, PeftkitError

DEFAULT_REGISTRY = "registry"
SHOWN_PROMOTIONS = 5  # the latest decisions `adapters show` lists


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftkit`` console script; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():
        # transformers/hub draw their own bars ("Loading weights"): quiet them in logs too
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.func(args) or 0)
    except PeftkitError as exc:
        print(f"peftkit: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = getattr(args, "resume_hint", None)
        print(f"peftkit: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `peftkit ... | head`
        return 0
    except OSError as exc:  # a file or folder the command was pointed at: one line, no trace
        where = f": {exc.filename}" if exc.filename else ""
        print(f"peftkit: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    """SIGTERM (a scheduler's stop, ``kill``) ends a command as Ctrl-C does."""
    raise KeyboardInterrupt


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit",
        description="Parameter-efficient adaptation and prompting for text classification.",
        epilog="Run 'peftkit COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

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

    p = sub.add_parser("adapters", help="list, show, remove, export or import registered adapters")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry folder")
    asub = p.add_subparsers(title="actions", metavar="ACTION", required=True)
    a = asub.add_parser("list", help="every version, or one name's")
    a.add_argument("name", nargs="?")
    a.add_argument("--tag")
    a.set_defaults(func=cmd_adapters_list)
    a = asub.add_parser("show", help="one entry as JSON (NAME, NAME@VERSION or NAME@ALIAS)")
    a.add_argument("ref")
    a.set_defaults(func=cmd_adapters_show)
    a = asub.add_parser("alias", help="point NAME@ALIAS at a version (moved atomically)")
    a.add_argument("ref", help="NAME@VERSION (or NAME: its latest)")
    a.add_argument("alias", help="e.g. production")
    a.set_defaults(func=cmd_adapters_alias)
    a = asub.add_parser(
        "promote",
        help="move NAME@ALIAS to NAME@VERSION only when every gate holds (exit 1: refused)",
        description="Score NAME@VERSION and the alias's current version on each gate's test "
        "rows (paired, 95%% bootstrap intervals); move the alias only when every gate holds; "
        "record the decision in the registry either way.",
    )
    a.add_argument("ref", help="the candidate, NAME@VERSION")
    a.add_argument("--alias", required=True, help="e.g. production")
    a.add_argument(
        "--gate",
        action="append",
        required=True,
        help="'METRIC on DATA >= alias - 0.5' or '... >= 0.85' (repeat, or join with ' and ')",
    )
    a.add_argument("--batch-size", type=_positive_int, default=32, help="rows a forward")
    a.add_argument("--json", action="store_true", help="the decision as JSON")
    a.set_defaults(func=cmd_adapters_promote)
    a = asub.add_parser("unalias", help="remove NAME@ALIAS")
    a.add_argument("name")
    a.add_argument("alias")
    a.set_defaults(func=cmd_adapters_unalias)
    a = asub.add_parser("rm", help="remove NAME@VERSION, NAME's latest, or --all versions")
    a.add_argument("ref")
    a.add_argument("--all", action="store_true", help="every version of NAME")
    a.set_defaults(func=cmd_adapters_rm)
    a = asub.add_parser("export", help="write an entry as a folder plain peft loads")
    a.add_argument("ref")
    a.add_argument("dest")
    a.set_defaults(func=cmd_adapters_export)
    a = asub.add_parser("import", help="register an exported folder")
    a.add_argument("folder")
    a.add_argument("--name")
    a.set_defaults(func=cmd_adapters_import)
    a = asub.add_parser("verify", help="re-hash one entry's files (REF) or every entry's")
    a.add_argument("ref", nargs="?")
    a.add_argument("--json", action="store_true", help="the report as JSON")
    a.set_defaults(func=cmd_adapters_verify)
    a = asub.add_parser(
        "doctor", help="check the index and every folder; report what disagrees (exit 1)"
    )
    a.add_argument("--json", action="store_true", help="the report as JSON")
    a.set_defaults(func=cmd_adapters_doctor)
    a = asub.add_parser(
        "rebuild",
        help="re-index version folders from their peftkit.json (a lost or damaged index) and "
        "restore aliases, promotion decisions and later metrics from journal.jsonl",
    )
    a.add_argument("--json", action="store_true", help="the report as JSON")
    a.set_defaults(func=cmd_adapters_rebuild)

    p = sub.add_parser("predict", help="classify texts with a registered adapter (JSONL out)")
    p.add_argument("texts", nargs="*", help="texts (default: --file, else one per stdin line)")
    p.add_argument("--adapter", required=True, help="NAME or NAME@VERSION")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry folder")
    p.add_argument(
        "--file", help="a text file (one text per line), or JSONL with 'text' (and 'text_pair')"
    )
    p.add_argument("--batch-size", type=_positive_int, default=32, help="rows a forward")
    p.set_defaults(func=cmd_predict)

    for kind, help_text in (
        ("recipes", "the built-in recipes"),
        ("presets", "the built-in adapter presets"),
        ("prompts", "the built-in prompt sets"),
    ):
        p = sub.add_parser(kind, help=help_text)
        ksub = p.add_subparsers(title="actions", metavar="ACTION", required=True)
        k = ksub.add_parser("list", help=f"list {help_text}")
        k.set_defaults(func=cmd_library_list, kind=kind)
        k = ksub.add_parser("show", help="print one file")
        k.add_argument("name")
        k.set_defaults(func=cmd_library_show, kind=kind)

    p = sub.add_parser(
        "serve",
        help="serve registered adapters over HTTP (needs the serve extra)",
        description="Serve a registry's adapters on one base behind one HTTP endpoint; every "
        "flag overrides the --config file's serve: block.",
    )
    from peftkit.serving.serve import add_arguments as serve_arguments

    serve_arguments(p)
    p.set_defaults(func=cmd_serve)

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
    return parser


# --- run / eval ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from peftkit.serving.serve import main as serve_main

    return serve_main(args)


def cmd_run(args: argparse.Namespace) -> int:
    from peftkit.config.recipes import load_recipe
    from peftkit.run.pipeline import run_recipe

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
    again = "peftkit " + shlex.join(words)
    args.resume_hint = f"run '{again}' again to resume from the last checkpoint"
    with _report_to_stdout():
        outcome = run_recipe(
            recipe, run_dir=args.run_dir, registry=args.registry, overwrite=args.overwrite
        )
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


# --- adapters -------------------------------------------------------------------------------------


def _registry(args: argparse.Namespace):
    from peftkit.registry.store import Registry

    root = Path(args.registry)
    if not root.is_dir():
        raise ConfigError(f"no registry at {root.resolve()}; give --registry DIR")
    return Registry(root)


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from peftkit.metrics.table import format_table

    registry = _registry(args)
    entries = registry.list(args.name, tag=args.tag)
    if not entries:
        print(f"no adapters in {args.registry}{_unindexed_hint(registry)}", file=sys.stderr)
        return 0
    held: dict[str, list[str]] = {}
    for alias, target in registry.aliases(args.name).items():
        held.setdefault(target, []).append(alias.partition("@")[2])
    rows = [
        {
            "ref": e.ref,
            "aliases": ",".join(held.get(e.ref, [])),
            "method": e.method,
            "task": e.task,
            "labels": len(e.labels),
            "accuracy": e.metrics.get("accuracy"),
            "95% interval": _interval(e.metrics.get("accuracy_ci95")),
            "base": (e.base or {}).get("source", e.base_fingerprint[:12]),
            "created": e.created[:19],
            "tags": ",".join(e.tags),
        }
        for e in entries
    ]
    columns = [(k, k) for k in rows[0]]
    print(format_table(rows, columns))
    return 0


def _interval(ci: object) -> str:
    """``[0.9061, 0.9671]`` for a stored ``[low, high]``; empty for an entry without one."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"[{float(ci[0]):.4f}, {float(ci[1]):.4f}]"
    return ""


def _unindexed_hint(registry) -> str:
    """Say so when version folders exist that the index does not list (a lost index)."""
    from peftkit.registry.files import version_folders

    indexed = {(e.name, e.version) for e in registry.list()}
    found = [(n, v) for n, v, _ in version_folders(registry.root / "adapters")]
    lost = [f"{n}@{v}" for n, v in found if (n, v) not in indexed]
    if not lost:
        return ""
    shown = ", ".join(lost[:5]) + (", ..." if len(lost) > 5 else "")
    return (
        f"; but {len(lost)} version folder(s) are not in its index ({shown}): see "
        "'peftkit adapters doctor', and 'peftkit adapters rebuild' to index them again"
    )


def cmd_adapters_show(args: argparse.Namespace) -> int:
    from peftkit.adapters.folder import read_task

    registry = _registry(args)
    entry = registry.get(args.ref)
    aliases = [
        a.partition("@")[2] for a, t in registry.aliases(entry.name).items() if t == entry.ref
    ]
    # with how its files are read: pooling, max length, head, a rewriting start it came from;
    # and the latest promotion decisions of its name (newest first)
    shown = {
        **entry.to_dict(),
        "aliases": aliases,
        "adapter": read_task(entry.path).to_dict(),
        "promotions": [p.to_dict() for p in registry.promotions(entry.name, SHOWN_PROMOTIONS)],
    }
    print(json.dumps(shown, indent=2, default=str))
    return 0


def cmd_adapters_alias(args: argparse.Namespace) -> int:
    before, now = _registry(args).alias(args.ref, args.alias)
    name = now.partition("@")[0]
    print(f"{name}@{args.alias}: {before or '(new)'} -> {now}")
    return 0


def cmd_adapters_promote(args: argparse.Namespace) -> int:
    from peftkit.run.promote import decision_text, plan_promotion, promote

    plan = plan_promotion(_registry(args), args.ref, args.alias, args.gate)  # loads no model
    decision = promote(plan, batch_size=args.batch_size)
    print(json.dumps(decision.to_dict(), indent=2) if args.json else decision_text(decision))
    return 0 if decision.passed else 1


def cmd_adapters_unalias(args: argparse.Namespace) -> int:
    before = _registry(args).unalias(args.name, args.alias)
    print(f"removed {args.name}@{args.alias} (it pointed at {before})")
    return 0


def cmd_adapters_rm(args: argparse.Namespace) -> int:
    gone = _registry(args).remove(args.ref, all_versions=args.all)
    print("removed " + ", ".join(e.ref for e in gone))
    return 0


def cmd_adapters_export(args: argparse.Namespace) -> int:
    dest = _registry(args).export(args.ref, args.dest)
    print(f"exported {args.ref} to {dest}")
    return 0


def cmd_adapters_import(args: argparse.Namespace) -> int:
    from peftkit.registry.store import Registry

    Path(args.registry).mkdir(parents=True, exist_ok=True)
    entry = Registry(args.registry).import_folder(args.folder, args.name)
    print(f"imported {args.folder} as {entry.ref}")
    return 0


def cmd_adapters_verify(args: argparse.Namespace) -> int:
    return _print_report(_registry(args).check(args.ref), args.json)


def cmd_adapters_doctor(args: argparse.Namespace) -> int:
    return _print_report(_registry(args).doctor(), args.json)


def cmd_adapters_rebuild(args: argparse.Namespace) -> int:
    return _print_report(_registry(args).rebuild_index(), args.json)


def _print_report(report, as_json: bool) -> int:
    """Print a registry check's report; the exit status is 1 when it found problems."""
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.lines()))
    return 0 if report.healthy else 1


# --- predict --------------------------------------------------------------------------------------


def cmd_predict(args: argparse.Namespace) -> int:
    texts, pairs = _read_texts(args)  # before the model loads: bad input costs nothing
    registry = _registry(args)
    entry = registry.get(args.adapter)
    source = (entry.base or {}).get("source")
    if not source:
        raise ConfigError(f"{entry.ref} does not record its base model's source; cannot load it")
    from peftkit.models.base import load_base
    from peftkit.serving.adapted import AdaptedModel

    base = load_base(source, quantization=entry.quantization)
    model = AdaptedModel(base, registry, batch_size=args.batch_size)
    preds = model.use(args.adapter).predict(texts, text_pairs=pairs)
    for i, (text, pred) in enumerate(zip(texts, preds, strict=True)):
        row = {"text": text} if pairs is None else {"text": text, "text_pair": pairs[i]}
        print(json.dumps({**row, **pred.to_dict()}, ensure_ascii=False))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _read_texts(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """The texts to classify (and their second texts, when JSONL rows carry ``text_pair``)."""
    if args.texts and args.file:
        raise ConfigError("give texts as arguments or --file, not both")
    if args.texts:
        return list(args.texts), None
    if args.file:
        where = f"--file {args.file}"
        path = Path(args.file)
        if not path.is_file():
            raise ConfigError(
                f"{where}: {'a folder, not a file' if path.is_dir() else 'no such file'}"
            )
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{where}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    else:
        lines, where = _stdin_lines(), "standard input"
    rows = [_row_of(line, i + 1, where) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise ConfigError(f"no texts in {where} (empty lines only)")
    with_pair = [r[1] is not None for r in rows]
    if any(with_pair) and not all(with_pair):
        line = with_pair.index(False) + 1 if with_pair[0] else with_pair.index(True) + 1
        raise DataError(
            f"{where}: some rows carry a 'text_pair' and some do not (non-empty row {line} "
            "differs from the first); give a pair for every row or for none"
        )
    texts = [r[0] for r in rows]
    return texts, ([str(r[1]) for r in rows] if all(with_pair) else None)


def _stdin_lines() -> list[str]:
    stdin = sys.stdin
    try:
        interactive = stdin is None or getattr(stdin, "closed", False) or stdin.isatty()
        if not interactive:
            return stdin.read().splitlines()
    except (OSError, ValueError) as exc:  # closed underneath us, or not decodable
        if isinstance(exc, UnicodeDecodeError):
            raise DataError(f"standard input is not UTF-8 text ({exc.reason})") from None
        raise ConfigError(
            f"no texts: standard input cannot be read ({exc}); give texts as arguments or --file"
        ) from None
    raise ConfigError("no texts: give them as arguments, with --file, or on stdin")


def _row_of(line: str, lineno: int, where: str) -> tuple[str, str | None]:
    """A line as (text, text_pair): a JSON object's fields, else the line itself."""
    if line.lstrip().startswith("{"):
        try:
            row: Any = json.loads(line)
        except ValueError:
            return line, None
        if isinstance(row, dict):
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise DataError(f"{where}, line {lineno}: a JSON row needs a non-empty 'text'")
            pair = row.get("text_pair")
            if pair is not None and not isinstance(pair, str):
                raise DataError(f"{where}, line {lineno}: 'text_pair' must be a string")
            return row["text"], pair
    return line, None


# --- libraries and compare ------------------------------------------------------------------------


_KINDS = {"recipes": "recipes", "presets": "adapters", "prompts": "prompts"}  # CLI word -> library


def cmd_library_list(args: argparse.Namespace) -> int:
    from peftkit.config.library import available, library_dir

    folder = library_dir(_KINDS[args.kind])
    for name in available(_KINDS[args.kind]):
        print(f"{name:<28} {_summary(folder / f'{name}.yaml')}")
    return 0


def cmd_library_show(args: argparse.Namespace) -> int:
    from peftkit.config.library import find

    print(find(_KINDS[args.kind], args.name).read_text(encoding="utf-8"), end="")
    return 0


def _summary(path: Path) -> str:
    """The first comment line of a YAML file that is not the command that runs it."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith(("peftkit ", "Run:", "run:")):
            return text
        if line and not line.startswith("#"):
            break
    return ""


def cmd_compare(args: argparse.Namespace) -> int:
    from peftkit.metrics.table import format_table
    from peftkit.run.folders import COMPARE_COLUMNS, compare

    rows = compare(args.runs)
    if len(args.runs) != 2:
        print(json.dumps(rows, indent=2) if args.json else format_table(rows, COMPARE_COLUMNS))
        return 0
    from peftkit.errors import ConfigError
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
