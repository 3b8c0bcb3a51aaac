"""``peftkit predict``: classify texts (arguments, a file, or stdin) with a registered adapter;
one JSON line a text."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from peftkit.cli.common import DEFAULT_REGISTRY, open_registry, positive_int
from peftkit.data.dataset import not_utf8
from peftkit.errors import ConfigError, DataError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify texts with a registered adapter (JSONL out)")
    p.add_argument("texts", nargs="*", help="texts (default: --file, else one per stdin line)")
    p.add_argument("--adapter", required=True, help="NAME or NAME@VERSION")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry folder")
    p.add_argument(
        "--file", help="a text file (one text per line), or JSONL with 'text' (and 'text_pair')"
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows a forward")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    texts, pairs = _read_texts(args)  # before the model loads: bad input costs nothing
    registry = open_registry(args)
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


def _read_texts(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """The texts to classify (and their second texts, when JSONL rows carry ``text_pair``)."""
    if args.texts and args.file:
        raise ConfigError("give texts as arguments or --file, not both")
    if args.texts:
        for i, text in enumerate(args.texts, 1):
            if not text.strip():
                raise ConfigError(f"text argument {i} is empty; give a non-empty text")
            _check_encodable(text, f"text argument {i}")
        return list(args.texts), None
    if args.file:
        where = f"--file {args.file}"
        path = Path(args.file)
        if not path.is_file():
            raise ConfigError(f"{where}: {_not_a_file(path)}")
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
    jsonl = args.file is not None and Path(args.file).suffix.lower() in (".jsonl", ".ndjson")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    jsonl = jsonl or any(_json_object(line) is not None for _, line in numbered)
    rows = [_row_of(line, n, where, jsonl) for n, line in numbered]
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


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return "a folder, not a file"
    if path.exists():
        return "not a regular file (a device, pipe or socket); give a text or JSONL file"
    return "no such file"


def _json_object(line: str) -> dict | None:
    """The JSON object a line holds, or None (not JSON, or JSON but not an object)."""
    if not line.lstrip().startswith("{"):
        return None
    try:
        row: Any = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _check_encodable(text: str, where: str) -> None:
    """Refuse text the tokenizer cannot take (``dataset.not_utf8``), naming ``where``."""
    problem = not_utf8(text)
    if problem is not None:
        raise DataError(f"{where}: {problem}; give UTF-8 text")


def _row_of(line: str, lineno: int, where: str, jsonl: bool) -> tuple[str, str | None]:
    """A line as (text, text_pair): a JSON object's fields, else the line itself. In a
    JSON-lines input (a .jsonl file, or one with JSON rows) a line that opens a JSON object
    must be one: a broken row is an error, not a text."""
    here = f"{where}, line {lineno}"
    row = _json_object(line)
    if row is None:
        if jsonl and line.lstrip().startswith("{"):
            try:
                json.loads(line)
            except ValueError as exc:
                raise DataError(f"{here}: not valid JSON ({exc}); fix or remove the row") from None
        _check_encodable(line, here)
        return line, None
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        raise DataError(f"{here}: a JSON row needs a non-empty 'text'")
    pair = row.get("text_pair")
    if pair is not None and not isinstance(pair, str):
        raise DataError(f"{here}: 'text_pair' must be a string")
    _check_encodable(row["text"], f"{here}, 'text'")
    if pair is not None:
        _check_encodable(pair, f"{here}, 'text_pair'")
    return row["text"], pair
