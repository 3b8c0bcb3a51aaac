"""``peftkit serve``: the flags and the server live in ``peftkit.serving.serve``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve registered adapters over HTTP (needs the serve extra)",
        description="Serve a registry's adapters on one base behind one HTTP endpoint; every "
        "flag overrides the --config file's serve: block.",
    )
    from peftkit.serving.serve import add_arguments as serve_arguments

    serve_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from peftkit.serving.serve import main as serve_main

    return serve_main(args)
