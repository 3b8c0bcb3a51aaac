"""The settings of ``peftkit serve``: one frozen, checked object from a file and flags.

A YAML file holds them under ``serve:`` (paths are relative to the working folder)::

    serve:
      registry: registry
      adapters: [sst2, agnews@3]     # preloaded; others load on their first request
      port: 8000
      max_batch_rows: 64

    from peftkit.config.serve import load_serve_config
    config = load_serve_config("serve.yaml", {"port": 9000})   # flags override the file
    config.port, config.host                                   # 9000, '127.0.0.1'

Every key is checked by ``peftkit.config.schema``: an unknown key, a wrong type or a value
out of range is a :class:`ConfigError` naming the file and line (or the flag) and the
closest valid key. Reading the settings imports no torch.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config.schema import Ctx, parse, read_text, read_yaml
from peftkit.errors import ConfigError, did_you_mean
from peftkit.registry.entries import split_ref

__all__ = ["ServeConfig", "flag_name", "load_serve_config"]


@dataclass(frozen=True)
class ServeConfig:
    """What one ``peftkit serve`` process serves, where, and within which limits."""

    registry: str  # the registry folder, opened read-only
    base: str | None = None  # None: the base the registered adapters were trained on
    adapters: tuple[str, ...] = ()  # refs loaded at start ("sst2", "agnews@3")
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    max_resident: int = 8  # adapters in memory at once (least recently used go)
    max_batch_rows: int = 64  # rows per forward
    max_batch_tokens: int = 8192  # tokens per forward (base tokenizer, before truncation)
    max_wait_ms: float = 0.0  # longest a forward waits for more rows (0: starts at once)
    max_queue_rows: int = 4096  # rows waiting; more is answered 503 + Retry-After
    max_request_rows: int = 256  # rows in one request; more is 413
    max_text_chars: int = 10_000  # characters in one text (or text_pair); more is 413
    max_body_bytes: int = 2_000_000  # bytes in one request body; more is 413
    request_timeout_s: float = 30.0  # a request not answered by then is 504
    threads: int | None = None  # torch threads for forwards (None: torch's default, the cores)
    api_key_file: str | None = None  # one key per line ("KEY" or "KEY admin"); None: no auth
    ray: bool = False  # serve as a Ray Serve deployment (peftkit.serving.ray_serve)
    replicas: int | None = None  # Ray Serve replicas, each with its own base (None: 1)

    def __post_init__(self) -> None:
        if not self.registry.strip():
            raise ConfigError("serve.registry must name the registry folder, got ''")
        if self.base is not None and not self.base.strip():
            raise ConfigError("serve.base must name a model (or be left out), got ''")
        for i, ref in enumerate(self.adapters, 1):
            if not ref.strip():
                raise ConfigError(
                    f"adapters entry {i} is empty; give adapter references separated "
                    "by commas (sst2,agnews@3)"
                )
            try:
                split_ref(ref)
            except ConfigError as exc:
                raise ConfigError(f"serve.adapters has a bad entry: {exc}") from None
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"serve.port must be between 1 and 65535, got {self.port}")
        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"serve.max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"serve.request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.replicas is not None and not self.ray:
            raise ConfigError(
                f"serve.replicas ({self.replicas}) applies to a Ray Serve deployment: give "
                "--ray too, or leave replicas out (one process serves without Ray)"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"serve.threads must be >= 1, got {self.threads}")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"serve.replicas must be >= 1, got {self.replicas}")
        if self.max_request_rows > self.max_queue_rows:
            raise ConfigError(
                f"serve.max_request_rows ({self.max_request_rows}) must be <= max_queue_rows "
                f"({self.max_queue_rows}): a larger request could never be queued"
            )


_POSITIVE = (
    "max_resident",
    "max_batch_rows",
    "max_batch_tokens",
    "max_queue_rows",
    "max_request_rows",
    "max_text_chars",
    "max_body_bytes",
)


def flag_name(key: str) -> str:
    """The command-line flag of a setting: ``max_batch_rows`` -> ``--max-batch-rows``."""
    return "--" + key.replace("_", "-")


def load_serve_config(
    path: str | Path | None = None, flags: Mapping[str, Any] | None = None
) -> ServeConfig:
    """The settings from ``path``'s ``serve:`` block (if given), then ``flags`` (setting ->
    value; ``None`` values are not given) over them, checked as one."""
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        raw, lines = _read_block(Path(path))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    raw.update(given)
    overridden: dict[tuple[str, ...], str] = {
        ("serve", k): f"{flag_name(k)} {_shown(v)}" for k, v in given.items()
    }
    if "registry" not in raw:
        raise ConfigError(
            f"{source}: no registry given: pass --registry DIR or set serve.registry "
            "in the file given with --config"
        )
    ctx = Ctx(source, lines, overridden)
    return typing.cast(ServeConfig, parse(ServeConfig, raw, ("serve",), ctx))


def _read_block(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """The ``serve:`` mapping of a YAML file and the line of each key in it."""
    data, lines = read_yaml(read_text(path, "serve settings file"), str(path))
    if not isinstance(data, dict) or "serve" not in data:
        raise ConfigError(
            f"{path}: a serve settings file is a mapping with one key, 'serve:', holding "
            f"the settings (valid keys: {', '.join(f.name for f in dataclasses.fields(ServeConfig))})"
        )
    for key in data:
        if key != "serve":
            where = f", line {lines[(str(key),)]}" if (str(key),) in lines else ""
            raise ConfigError(
                f"{path}{where}: unknown key {key!r}{did_you_mean(str(key), ['serve'])}; "
                "the file holds only 'serve:'"
            )
    block = data["serve"]
    if not isinstance(block, dict):
        raise ConfigError(
            f"{path}, line {lines[('serve',)]}: serve: must be a mapping of settings, got {block!r}"
        )
    return dict(block), lines


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)
