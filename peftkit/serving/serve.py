"""``peftkit serve``: a registry's adapters on one base, behind one HTTP endpoint.

    peftkit serve --registry registry --adapters sst2,agnews@3 --port 8000
    python -m peftkit.serving.serve --config serve.yaml --port 9000   # the same, no CLI
    peftkit serve --registry registry --ray --replicas 4   # Ray Serve (see serving/ray_serve.py)

Before the base loads, everything given is checked: the settings (file and flags, see
``peftkit.config.serve``), the registry (opened read-only), the base (``--base``, or the
one the registered adapters were trained on: refused, naming each, when they disagree), the
adapters to preload and the API key file. Then the base, an ``AdaptedModel`` with the
preloaded adapters, the scheduler and the app; uvicorn serves on host:port. SIGTERM or
SIGINT: uvicorn stops accepting and answers the requests in flight, then the scheduler
drains and the AdaptedModel is closed; the exit status is 0.

The CLI wires ``add_arguments`` and ``main``; this module imports neither torch nor the
web stack until ``main`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import errno
import importlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from peftkit.config.schema import read_text
from peftkit.config.serve import ServeConfig, flag_name, load_serve_config
from peftkit.errors import ConfigError, PeftkitError, RegistryError
from peftkit.registry.entries import describe_base
from peftkit.registry.store import Registry

__all__ = [
    "Plan",
    "Service",
    "add_arguments",
    "build_service",
    "check_listen",
    "check_startup",
    "main",
    "read_api_keys",
    "token_counter",
]

log = logging.getLogger("peftkit.serving.serve")  # also when run as __main__
EXTRA = ("fastapi", "uvicorn", "prometheus_client")
MIN_KEY_CHARS = 16


@dataclass(frozen=True)
class Plan:
    """What startup found: the base to load, the fingerprint the adapters expect (None
    with ``--base``), the API keys (key -> admin; None: no auth), the adapters registered."""

    source: str
    quantization: str | None
    fingerprint: str | None
    keys: dict[str, bool] | None
    registered: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``peftkit serve`` (each overrides the ``--config`` file's setting)."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with a serve: block")
    parser.add_argument("--registry", metavar="DIR", help="the adapter registry (read-only)")
    parser.add_argument("--base", metavar="SOURCE", help="default: the adapters' own base")
    parser.add_argument(
        "--adapters",
        metavar="A,B@2",
        type=lambda s: [x.strip() for x in s.split(",")],  # an empty entry is refused later
        help="adapters to load at start (others load on their first request)",
    )
    parser.add_argument("--host", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, help="default 8000")
    for field in dataclasses.fields(ServeConfig):
        if field.name.startswith(("max_", "request_")):
            kind = float if field.type in (float, "float") else int
            parser.add_argument(
                flag_name(field.name), type=kind, metavar="N", help=f"default {field.default}"
            )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads for forwards (default: one per core; fewer when the machine "
        "runs other work, whose threads would otherwise contend with the server's)",
    )
    parser.add_argument(
        "--api-key-file", metavar="FILE", help="one key per line ('KEY' or 'KEY admin')"
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        default=None,
        help="serve as a Ray Serve deployment (needs the ray extra; RAY_ADDRESS: join that cluster)",
    )
    parser.add_argument(
        "--replicas", type=int, metavar="N", help="with --ray: replicas, each its own base (1)"
    )


def main(args: argparse.Namespace) -> int:
    """Run the server as ``args`` say; 0 after a clean stop, 1 (one line on stderr) for
    bad settings, a missing extra or a port that cannot be bound."""
    missing = [m for m in EXTRA if not _importable(m)]
    if missing:
        print(
            f"peftkit: error: peftkit serve needs the serve extra ({', '.join(missing)} "
            "missing): pip install 'peftkit[serve]'",
            file=sys.stderr,
        )
        return 1
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(ServeConfig)}
        config = load_serve_config(getattr(args, "config", None), flags)
        if config.ray and not _importable("ray.serve"):
            print(
                "peftkit: error: peftkit serve --ray needs the ray extra (ray[serve] "
                "missing): pip install 'peftkit[ray]'",
                file=sys.stderr,
            )
            return 1
        if config.ray:
            from peftkit.serving.ray_serve import serve_on_ray

            return serve_on_ray(config, check_startup(config))
        plan = check_startup(config)
        check_listen(config.host, config.port)  # before the base loads, not after
        return serve(config, plan)
    except PeftkitError as exc:
        print(f"peftkit: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


def check_startup(config: ServeConfig) -> Plan:
    """Everything that can be checked before the base loads (no torch): the registry, the
    base, the adapters to preload, the API key file."""
    registry = Registry(config.registry, read_only=True)
    entries = registry.list()
    source, quantization, fingerprint = config.base, None, None
    if source is None:
        source, quantization, fingerprint = _registered_base(registry, entries)
    for ref in config.adapters:
        try:
            registry.get(ref)
        except RegistryError as exc:
            raise ConfigError(f"--adapters: {exc}") from None
    keys = None if config.api_key_file is None else read_api_keys(config.api_key_file)
    return Plan(source, quantization, fingerprint, keys, len({e.name for e in entries}))


def check_listen(host: str, port: int) -> None:
    """Refuse a host:port this process cannot listen on, naming the flag to change: the
    host resolved (a name or an IP address) and a socket bound to it for a moment."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"--host {host}: not an IP address or a host name this machine resolves "
            f"({reason}); give one such as 127.0.0.1 or 0.0.0.0"
        ) from None
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind(address)
    except OSError as exc:
        raise ConfigError(listen_problem(host, port, exc)) from None


def listen_problem(host: str, port: int, exc: OSError) -> str:
    """Why host:port cannot be listened on, and the flag that would fix it."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {host}:{port} ({reason}): is another server using it? "
            "choose another with --port"
        )
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {host}:{port} ({reason}): ports below 1024 need privileges; "
            "choose another with --port"
        )
    return f"cannot listen on {host}:{port} ({reason}); give another address with --host"


def _registered_base(registry: Registry, entries: list) -> tuple[str, str | None, str]:
    """The base every registered adapter was trained on: (source, quantization, id)."""
    if not entries:
        raise ConfigError(
            f"the registry at {registry.root} holds no adapters, so there is no base to "
            "serve: register one, or give --base SOURCE"
        )
    bases: dict[str, tuple[dict[str, Any], set[str]]] = {}
    for e in entries:
        bases.setdefault(e.base_fingerprint, (e.base, set()))[1].add(e.name)
    if len(bases) > 1:
        each = "; ".join(
            f"{describe_base(fp, base)} for {', '.join(sorted(names))}"
            for fp, (base, names) in bases.items()
        )
        raise ConfigError(
            f"the adapters in {registry.root} were trained on {len(bases)} different bases: "
            f"{each}; one server serves one base: give --base SOURCE"
        )
    fingerprint, (base, _) = next(iter(bases.items()))
    if not base.get("source"):
        raise ConfigError(
            f"the adapters in {registry.root} do not record their base's source; give --base SOURCE"
        )
    return str(base["source"]), base.get("quantization"), fingerprint


def read_api_keys(path: str) -> dict[str, bool]:
    """The keys of an API key file (key -> admin): one per line, ``KEY`` or ``KEY admin``;
    blank lines and ``#`` comments are skipped."""
    keys: dict[str, bool] = {}
    for n, line in enumerate(read_text(path, "api key file").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2 or (len(words) == 2 and words[1] != "admin"):
            raise ConfigError(f"{path}, line {n}: write 'KEY' or 'KEY admin', nothing else")
        if len(words[0]) < MIN_KEY_CHARS:
            raise ConfigError(
                f"{path}, line {n}: a key needs at least {MIN_KEY_CHARS} characters; make "
                "one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        keys[words[0]] = len(words) == 2
    if not keys:
        raise ConfigError(f"{path}: the api key file holds no key (one per line)")
    return keys


def token_counter(tokenizer: Any) -> Callable[[Sequence[str], Sequence[str | None]], list[int]]:
    """Rows' token counts by ``tokenizer`` (special tokens in, before truncation), on a copy
    of it: the scheduler calls it on the event loop while the worker thread tokenizes too,
    and a fast tokenizer must not be used by two threads at once. A fast tokenizer is
    counted through its own ``tokenizers.Tokenizer`` (truncation and padding off): the same
    ids as the transformers call, without its per-call overhead, which on a one-row request
    was about a third of the event loop's time (py-spy, bench_serve, 64 clients)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(backend.to_str())
        fast.no_truncation()
        fast.no_padding()

        def count_fast(texts: Sequence[str], pairs: Sequence[str | None]) -> list[int]:
            return [len(fast.encode(t, p).ids) for t, p in zip(texts, pairs, strict=True)]

        return count_fast
    own = copy.deepcopy(tokenizer)

    def count(texts: Sequence[str], pairs: Sequence[str | None]) -> list[int]:
        out = [0] * len(texts)
        for paired in (False, True):
            rows = [i for i, p in enumerate(pairs) if (p is not None) == paired]
            if rows:
                args: list[Any] = [[texts[i] for i in rows]]
                if paired:
                    args.append([pairs[i] for i in rows])
                ids = own(*args, truncation=False, verbose=False)["input_ids"]
                for i, row in zip(rows, ids, strict=True):
                    out[i] = len(row)
        return out

    return count


@dataclass
class Service:
    """What serves: the base, the AdaptedModel over the registry (read-only), the scheduler
    (not started) and the app. One per ``peftkit serve`` process or Ray Serve replica."""

    base: Any
    model: Any
    scheduler: Any
    app: Any

    def close(self, timeout: float | None = None) -> None:
        """Drain the scheduler (answering what it holds), then give the base back."""
        self.scheduler.close(timeout=timeout)
        self.model.close()


def build_service(config: ServeConfig, plan: Plan, say: logging.Logger = log) -> Service:
    """Load the base (its fingerprint checked against the adapters'), the AdaptedModel with
    the preloaded adapters, the scheduler and the app (``create_app``)."""
    import torch

    from peftkit.models.base import load_base
    from peftkit.serving.adapted import AdaptedModel
    from peftkit.serving.http import create_app
    from peftkit.serving.scheduler import Scheduler

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    base = load_base(plan.source, quantization=plan.quantization)
    if plan.fingerprint is not None and base.fingerprint.id != plan.fingerprint:
        raise ConfigError(
            f"the base at {plan.source!r} is not the one the adapters were trained on "
            f"(fingerprint {base.fingerprint.id}, expected {plan.fingerprint}); give --base"
        )
    model = AdaptedModel(
        base, Registry(config.registry, read_only=True), max_resident=config.max_resident
    )
    try:
        for ref in config.adapters:
            say.info("preloaded %s", model.load(ref))
    except BaseException:
        model.close()
        raise
    scheduler = Scheduler(
        model,
        max_batch_rows=config.max_batch_rows,
        max_batch_tokens=config.max_batch_tokens,
        max_wait_ms=config.max_wait_ms,
        max_queue_rows=config.max_queue_rows,
        timeout_s=config.request_timeout_s,
        count_tokens=token_counter(base.tokenizer),
    )
    registry = Registry(config.registry, read_only=True)
    app = create_app(scheduler, registry, base.fingerprint.id, config, plan.keys)
    return Service(base, model, scheduler, app)


def serve(config: ServeConfig, plan: Plan) -> int:
    """Load the base and the preloaded adapters, then serve until SIGTERM / SIGINT."""
    import torch
    import uvicorn

    service = build_service(config, plan)
    try:
        server = uvicorn.Server(
            uvicorn.Config(
                service.app,
                host=config.host,
                port=config.port,
                access_log=False,
                timeout_graceful_shutdown=int(config.request_timeout_s) + 5,
            )
        )
        service.scheduler.start()
        log.info(
            "serving %d registered adapters on %s at http://%s:%d (API docs at /docs; "
            "%d torch threads)%s",
            plan.registered,
            service.base.fingerprint.describe(),
            config.host,
            config.port,
            torch.get_num_threads(),
            "; /v1 needs an API key" if plan.keys else "",
        )
        try:
            with _signals_end_serving():
                server.run()
        except SystemExit:  # uvicorn could not bind host:port (it logged why)
            # taken since the check at startup: say why, naming the flag to change
            check_listen(config.host, config.port)
            raise ConfigError(
                f"cannot listen on {config.host}:{config.port}; is another server using "
                "it? choose another with --port (or --host)"
            ) from None
    finally:
        service.close(timeout=config.request_timeout_s)
    log.info("stopped")
    return 0


@contextlib.contextmanager
def _signals_end_serving() -> Iterator[None]:
    """SIGTERM and SIGINT handled as the end of serving. uvicorn catches them while it
    runs (stop accepting, answer what is in flight) and raises them again once it has
    stopped, for the handlers that were there before: these, so that the scheduler still
    drains, the model is closed and the exit status is 0, not death by the signal."""
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="peftkit serve", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
