"""``peftkit adapters ...``: list, show, alias, promote, remove, export, import registered
adapters, and check or rebuild the registry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peftkit.cli.common import DEFAULT_REGISTRY, open_registry, positive_int
from peftkit.errors import ConfigError, RegistryError

SHOWN_PROMOTIONS = 5  # the latest decisions `adapters show` lists


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    a.add_argument("--batch-size", type=positive_int, default=32, help="rows a forward")
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
        "doctor",
        help="check the index, every folder and the journal; report what disagrees (exit 1)",
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


# --- reading --------------------------------------------------------------------------------------


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from peftkit.metrics.table import format_table

    registry = open_registry(args)
    entries = registry.list(args.name, tag=args.tag)
    if not entries and args.name is not None and not registry.list(args.name):
        try:
            registry.get(args.name)  # the error `show NAME` gives: close names, versions
        except RegistryError as exc:
            raise RegistryError(f"{exc}{_unindexed_hint(registry)}") from None
    if not entries:
        tagged = "" if args.tag is None else f" tagged {args.tag!r}"
        named = "" if args.name is None else f" of {args.name!r}"
        where = f"{args.registry}{_unindexed_hint(registry)}"
        print(f"no adapters{named}{tagged} in {where}", file=sys.stderr)
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

    registry = open_registry(args)
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


# --- aliases and promotion ------------------------------------------------------------------------


def cmd_adapters_alias(args: argparse.Namespace) -> int:
    before, now = open_registry(args).alias(args.ref, args.alias)
    name = now.partition("@")[0]
    print(f"{name}@{args.alias}: {before or '(new)'} -> {now}")
    return 0


def cmd_adapters_promote(args: argparse.Namespace) -> int:
    from peftkit.run.promote import decision_text, plan_promotion, promote

    plan = plan_promotion(open_registry(args), args.ref, args.alias, args.gate)  # loads no model
    decision = promote(plan, batch_size=args.batch_size)
    print(json.dumps(decision.to_dict(), indent=2) if args.json else decision_text(decision))
    return 0 if decision.passed else 1


def cmd_adapters_unalias(args: argparse.Namespace) -> int:
    before = open_registry(args).unalias(args.name, args.alias)
    print(f"removed {args.name}@{args.alias} (it pointed at {before})")
    return 0


# --- moving entries -------------------------------------------------------------------------------


def cmd_adapters_rm(args: argparse.Namespace) -> int:
    gone = open_registry(args).remove(args.ref, all_versions=args.all)
    print("removed " + ", ".join(e.ref for e in gone))
    return 0


def cmd_adapters_export(args: argparse.Namespace) -> int:
    dest = open_registry(args).export(args.ref, args.dest)
    print(f"exported {args.ref} to {dest}")
    return 0


def cmd_adapters_import(args: argparse.Namespace) -> int:
    from peftkit.registry.store import Registry

    if not Path(args.folder).is_dir():  # before a new registry is made for it
        raise ConfigError(f"adapter folder {args.folder} does not exist or is not a folder")
    Path(args.registry).mkdir(parents=True, exist_ok=True)
    entry = Registry(args.registry).import_folder(args.folder, args.name)
    print(f"imported {args.folder} as {entry.ref}")
    return 0


# --- checks ---------------------------------------------------------------------------------------


def cmd_adapters_verify(args: argparse.Namespace) -> int:
    return _print_report(open_registry(args).check(args.ref), args.json)


def cmd_adapters_doctor(args: argparse.Namespace) -> int:
    return _print_report(open_registry(args).doctor(), args.json)


def cmd_adapters_rebuild(args: argparse.Namespace) -> int:
    return _print_report(open_registry(args).rebuild_index(), args.json)


def _print_report(report, as_json: bool) -> int:
    """Print a registry check's report; the exit status is 1 when it found problems."""
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.lines()))
    return 0 if report.healthy else 1
