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

The parser is built here; each group of commands adds its own subparsers and handlers:
``runs`` (run, eval, compare), ``adapters`` (adapters ...), ``predict``, ``library``
(recipes, presets, prompts) and ``serve``. Handlers import heavy modules (torch, the model
stack, the web server) only when they run, so ``peftkit --help`` stays quick.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from peftkit.cli import adapters, library, predict, runs, serve
from peftkit.cli.common import DEFAULT_REGISTRY
from peftkit.errors import PeftkitError

__all__ = ["DEFAULT_REGISTRY", "build_parser", "main"]


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
    # in the order `peftkit --help` lists them
    runs.add_run_parsers(sub)  # run, eval
    adapters.add_parsers(sub)
    predict.add_parser(sub)
    library.add_parsers(sub)  # recipes, presets, prompts
    serve.add_parser(sub)
    runs.add_compare_parser(sub)
    return parser
