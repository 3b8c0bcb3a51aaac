"""``peftkit serve --ray``: the same HTTP service as a Ray Serve deployment of N replicas.

    peftkit serve --registry /mnt/registry --ray --replicas 4 --port 8000
    curl http://127.0.0.1:8000/v1/classify -H 'serve_multiplexed_model_id: sst2' \\
         -H 'Content-Type: application/json' -d '{"adapter": "sst2", "inputs": ["a fine film"]}'

Each replica is what one ``peftkit serve`` process holds, without uvicorn: its own base, an
``AdaptedModel`` over the registry opened read-only, a ``Scheduler`` batching rows across the
requests it gets, and the app of ``peftkit.serving.http`` (the same routes, limits, API keys
and errors). Ray Serve's proxy listens on host:port and hands each request to one replica.

**Routing by adapter** (Ray Serve model multiplexing). A request with the header
``serve_multiplexed_model_id: <adapter>`` goes to a replica that holds that adapter; when none
does, to one holding the fewest, which then holds it too. A replica holds an adapter once it has
answered a ``/v1/classify`` request carrying that header (so an unauthenticated or malformed
request makes no replica load anything); it holds at most ``max_resident``, and the one Ray
lets go first (least recently used) is evicted from its ``AdaptedModel`` as well. The header
only routes: the body still says each row's adapter, and a request without it goes to any
replica, which loads what its rows name. Every answer names its replica in ``X-Peftkit-Replica``.

**Starting and stopping.** ``ray.init()`` joins the cluster at ``RAY_ADDRESS`` when it is set,
or starts a local Ray instance; each replica takes one CPU. On a cluster every node needs
this peftkit installed and the registry at the same path (a read-only mount is enough).
SIGTERM or SIGINT ends serving: the app is deleted (each replica answers what it holds, then
its scheduler drains and its model is closed), a local Ray instance is shut down, exit 0.

Nothing here imports ray, torch or the web stack until a function runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from peftkit.config.serve import ServeConfig
from peftkit.errors import ConfigError, PeftkitError
from peftkit.serving.serve import Plan, build_service

__all__ = [
    "APP_NAME",
    "MODEL_ID_HEADER",
    "REPLICA_HEADER",
    "build_deployment",
    "deployment_options",
    "replica_app",
    "serve_on_ray",
]

log = logging.getLogger(__name__)
# in a replica: Ray Serve writes "ray.serve" to the replica's log; a child logger with its own
# level, because Ray raises that logger to WARNING while the app shuts down
replica_log = logging.getLogger("ray.serve.peftkit")
APP_NAME = "peftkit"  # the Ray Serve application (and deployment) name
MODEL_ID_HEADER = "serve_multiplexed_model_id"  # Ray Serve's; its value: an adapter name
REPLICA_HEADER = "x-peftkit-replica"


def serve_on_ray(config: ServeConfig, plan: Plan) -> int:
    """Deploy ``config.replicas`` replicas on Ray Serve at host:port and serve until SIGTERM
    or SIGINT; 0 after a clean stop."""
    import ray
    from ray import serve

    address = os.environ.get("RAY_ADDRESS")
    try:
        ray.init()  # joins RAY_ADDRESS when set, else starts a local instance
    except Exception as exc:
        where = f"join the Ray cluster at RAY_ADDRESS={address}" if address else "start Ray"
        raise ConfigError(f"cannot {where}: {_last_line(exc)}") from None
    stop: list[int] = []  # the signals received (see _stop_on_signals)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        each = deployment_options(config)["ray_actor_options"]["num_cpus"]
        if not address and cpus < (config.replicas or 1) * each:
            per = "a CPU" if config.threads is None else f"{each} CPUs (--threads)"
            raise ConfigError(
                f"--replicas {config.replicas} needs {per} per replica; the local Ray "
                f"instance has {cpus}: give fewer, or join a larger cluster with RAY_ADDRESS"
            )
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
        except Exception as exc:  # Ray's proxy could not bind host:port
            raise ConfigError(
                f"Ray Serve cannot listen on {config.host}:{config.port} ({_last_line(exc)}); "
                "is another server using it? choose another with --port"
            ) from None
        try:
            serve.run(build_deployment(config, plan), name=APP_NAME, route_prefix="/")
        except Exception as exc:  # a replica failed to start: its error is in the status
            raise ConfigError(
                f"Ray Serve could not start the replicas: {_replica_error(serve, exc)}"
            ) from None
        log.info(
            "serving %d registered adapters with %d Ray Serve replicas at http://%s:%d%s",
            plan.registered,
            config.replicas or 1,
            config.host,
            config.port,
            "; /v1 needs an API key" if plan.keys else "",
        )
        with _stop_on_signals(stop):
            while not stop:
                time.sleep(0.2)  # a signal's handler runs here, between two sleeps
    finally:
        if address:  # another's cluster: take back only this application
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
        else:
            serve.shutdown()
            ray.shutdown()
    log.info("stopped")
    return 0


def build_deployment(config: ServeConfig, plan: Plan) -> Any:
    """The bound Ray Serve application (``serve.run(build_deployment(config, plan))``): one
    deployment of ``config.replicas`` replicas, each running :func:`replica_app`."""
    from ray import serve

    def build() -> Any:  # run by each replica when it starts
        return replica_app(config, plan)

    deployment = serve.deployment(**deployment_options(config))(serve.ingress(build)())
    return deployment.bind()


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """The Ray Serve deployment's options: each replica reserves as many CPUs as it runs
    torch threads (``threads``; one when not given), so Ray places no more replicas on a
    node than its cores can run without contending."""
    return {
        "name": APP_NAME,
        "num_replicas": config.replicas or 1,
        # enough requests inside a replica for its scheduler to fill forwards; more wait
        # in the proxy, where they can still go to another replica
        "max_ongoing_requests": 4 * config.max_batch_rows,
        "graceful_shutdown_timeout_s": config.request_timeout_s + 5,
        "ray_actor_options": {"num_cpus": config.threads or 1},
    }


def replica_app(config: ServeConfig, plan: Plan) -> Any:
    """One replica's app: the base and the preloaded adapters loaded, the scheduler started,
    ``create_app``'s routes, plus adapter holding for Ray Serve's routing (see the module
    docstring). Runs inside a Ray Serve replica."""
    from ray import serve

    replica_log.setLevel(logging.INFO)
    service = build_service(config, plan, replica_log)
    scheduler, app = service.scheduler.start(), service.app

    @serve.multiplexed(max_num_models_per_replica=config.max_resident)
    async def hold(adapter: str) -> _Held:
        await scheduler.call(lambda m: m.load(adapter))
        return _Held(adapter, scheduler)

    replica = serve.get_replica_context().replica_id.unique_id
    app.add_middleware(HoldAdapters, hold=hold, replica=replica)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with inner(app) as state:
            yield state
        await asyncio.to_thread(service.close, config.request_timeout_s)
        replica_log.info("peftkit replica %s stopped", replica)

    app.router.lifespan_context = lifespan
    replica_log.info("peftkit replica %s ready on %s", replica, service.base.fingerprint.describe())
    return app


class HoldAdapters:
    """ASGI middleware of a replica's app: after a ``/v1/classify`` answered 2xx, the adapter
    its ``serve_multiplexed_model_id`` names is held (``hold``: Ray Serve's multiplexed
    loader, which routes that adapter here from then on); every answer names the replica."""

    def __init__(self, app: Any, hold: Callable[[str], Awaitable[Any]], replica: str) -> None:
        self.app = app
        self.hold = hold
        self.replica = replica.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def tagged(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, tagged)
        if 200 <= status < 300 and scope["path"] == "/v1/classify":
            await self._hold()

    async def _hold(self) -> None:
        from ray import serve

        adapter = serve.get_multiplexed_model_id()
        if not adapter:
            return
        try:
            await self.hold(adapter)
        except PeftkitError as exc:  # a header naming no adapter: it routes nothing
            replica_log.info("%s %r not held: %s", MODEL_ID_HEADER, adapter, exc)


class _Held:
    """An adapter Ray Serve counts as held by this replica (a multiplexed model). When Ray's
    LRU lets it go it awaits the *instance's* ``__del__`` (Python's finalizer is looked up on
    the type, which has none, so it runs only then): the AdaptedModel evicts it too."""

    def __init__(self, adapter: str, scheduler: Any) -> None:
        self.adapter = adapter

        async def release() -> None:
            try:
                await scheduler.call(lambda m: m.evict(adapter))
            except PeftkitError as exc:
                replica_log.info("adapter %s not evicted: %s", adapter, exc)

        self.__del__ = release


def _replica_error(serve: Any, exc: Exception) -> str:
    """Why the deployment failed: the last line of the error a replica raised (the status
    Ray Serve keeps), else of the error ``serve.run`` raised."""
    try:
        message = serve.status().applications[APP_NAME].deployments[APP_NAME].message
    except Exception:  # no status to read: Ray's own error says what it can
        return _last_line(exc)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1].removeprefix("peftkit.errors.")[:500] if lines else _last_line(exc)


def _last_line(exc: Exception) -> str:
    """The last line of a Ray error (its cause, after Ray's traceback of the remote call)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


@contextlib.contextmanager
def _stop_on_signals(stop: list[int]) -> Any:
    """SIGTERM and SIGINT are appended to ``stop`` while the block runs (the previous
    handlers after). The handler takes no lock: it runs in the main thread between two
    bytecodes, and a ``threading.Event.set`` there can find the Event's lock held by the
    ``wait`` it interrupted, which hung the process on a second signal."""
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda signum, _: stop.append(signum)) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
