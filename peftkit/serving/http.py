"""The HTTP app of ``peftkit serve``: thin FastAPI routes over one :class:`Scheduler`.

    app = create_app(scheduler, Registry(root, read_only=True), fingerprint, config, keys)

Routes (OpenAPI page at ``/docs``)::

    POST   /v1/classify               {"adapter": "sst2", "inputs": ["...", ...]} or
                                      {"inputs": [{"text": ..., "text_pair": ..., "adapter": "agnews@3"}]}
                                      options top_k (probabilities kept per row), return_probs
    GET    /v1/adapters               registered for this base: labels, method, metrics, resident
    GET    /v1/adapters/{name}        one adapter, every version
    POST   /v1/adapters/{name}/load   admin: make it (name or name@N) resident
    DELETE /v1/adapters/{name}        admin: take it (or one version) out of memory
    POST   /v1/reload                 admin: re-read the registry, load the latest of what is resident
    GET    /health  /ready  /metrics  alive; serving; Prometheus text (open to all)

Each row is answered with label, score, probabilities, ``abstained`` (the adapter's
reject option declined: its label and score are still its best), the adapter as asked and the
``name@N`` that answered: a name or an alias (``sst2@production``) is pinned to its version
when the request is admitted, so a version registered or an alias moved meanwhile serves
the next request on, and a request in flight finishes on the version it started with. With API keys, every ``/v1`` route needs
``Authorization: Bearer <key>`` (401), the admin routes a key marked admin (403);
``/health``, ``/ready`` and ``/metrics`` stay open for probes and scrapers, and say nothing
about the data. Every error is ``{"error": "<one line>"}`` with its status (see
``status_of``) and one log line; never a traceback. The request and answer models, and the
422 message for a request they refuse, are in :mod:`peftkit.serving.schemas`.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from peftkit.config.serve import ServeConfig
from peftkit.errors import PeftkitError, RegistryError
from peftkit.registry.entries import Entry
from peftkit.registry.store import Registry
from peftkit.serving.catalog import ApiError, Catalog
from peftkit.serving.metrics import ServeMetrics
from peftkit.serving.scheduler import Overloaded, RequestTimeout, Row, Scheduler
from peftkit.serving.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    InputRow,
    validation_message,
)

__all__ = ["ApiError", "create_app", "status_of"]

log = logging.getLogger(__name__)


def status_of(exc: Exception, root: object = None) -> ApiError:
    """The answer to an error from the scheduler or the model: 503 + Retry-After when
    overloaded, 504 on timeout, 404 for a version gone from the registry, 409 for an
    adapter this server cannot serve (corrupt files, another base, another family)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Overloaded):
        return ApiError(503, str(exc), {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, RequestTimeout):
        return ApiError(504, str(exc))
    # the registry's folder is the server's business, not the client's
    message = str(exc) if root is None else str(exc).replace(str(root), "<registry>")
    if type(exc) is RegistryError:
        return ApiError(404, message)
    if isinstance(exc, PeftkitError):
        return ApiError(409, f"cannot serve this adapter: {message}")
    log.error("internal error: %s: %s", type(exc).__name__, " ".join(str(exc).split()))
    return ApiError(500, f"internal error ({type(exc).__name__}); the server log has it")


# -- the app ------------------------------------------------------------------------------


def create_app(
    scheduler: Scheduler,
    registry: Registry,
    fingerprint: str,
    config: ServeConfig,
    keys: Mapping[str, bool] | None = None,
) -> FastAPI:
    """The app serving ``scheduler``'s model (its adapters preloaded: ``/ready`` says
    whether the scheduler runs). ``keys`` maps each API key to whether it is an admin key
    (None: no auth)."""
    app = FastAPI(title="peftkit serve", version="1", summary="text classification adapters")
    catalog = Catalog(registry, fingerprint)
    metrics = ServeMetrics(scheduler)
    scheduler.observe = metrics.observe
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth(keys))])
    admin = [Depends(_admin(keys))]

    @v1.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        start, names = time.monotonic(), []
        try:
            rows = _rows(body, config, catalog)
            names = [r.ref.partition("@")[0] for r in rows]
            predictions = await scheduler.submit(rows)
        except Exception as exc:
            error = status_of(exc, registry.root)
            metrics.request(names, error.status, time.monotonic() - start)
            raise error from None
        metrics.request(names, 200, time.monotonic() - start)
        asked = [_asked(item, body.adapter) for item in body.inputs]
        return {
            "results": [
                {**_result(p, body.top_k, body.return_probs), "adapter": a}
                for p, a in zip(predictions, asked, strict=True)
            ]
        }

    @v1.get("/adapters")
    async def adapters() -> dict[str, Any]:
        grouped = _grouped(catalog.entries())
        return {
            "adapters": [
                _summary(v, scheduler.resident, catalog.aliases(v[0].name))
                for v in grouped.values()
            ]
        }

    @v1.get("/adapters/{name}")
    async def adapter(name: str) -> dict[str, Any]:
        entry = catalog.pin(name, "name")
        versions = _grouped(catalog.entries())[entry.name]
        return {
            **_summary(versions, scheduler.resident, catalog.aliases(entry.name)),
            "versions": [_version(e, scheduler.resident) for e in versions],
        }

    @v1.post("/adapters/{name}/load", dependencies=admin)
    async def load(name: str) -> dict[str, Any]:
        ref = catalog.pin(name, "name").ref
        await _job(scheduler, lambda model: model.load(ref), registry.root)
        return {"loaded": ref, "resident": list(scheduler.resident)}

    @v1.delete("/adapters/{name}", dependencies=admin)
    async def unload(name: str) -> dict[str, Any]:
        catalog.pin(name, "name")  # 404 for a name that is not registered
        before = set(scheduler.resident)
        await _job(scheduler, lambda model: model.evict(name), registry.root)
        return {
            "unloaded": sorted(before - set(scheduler.resident)),
            "resident": list(scheduler.resident),
        }

    @v1.post("/reload", dependencies=admin)
    async def reload() -> dict[str, Any]:
        names = sorted({ref.partition("@")[0] for ref in scheduler.resident})
        latest = [catalog.pin(n, "resident").ref for n in names if n in catalog.names()]
        await _job(scheduler, lambda model: [model.load(ref) for ref in latest], registry.root)
        return {"generation": registry.generation(), "resident": list(scheduler.resident)}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = scheduler.running
        body = {"ready": ok, "resident": list(scheduler.resident)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(v1)
    app.state.metrics = metrics
    return app


def _rows(body: ClassifyRequest, config: ServeConfig, catalog: Catalog) -> list[Row]:
    """The request's rows, each with its adapter pinned to ``name@N``; limits checked."""
    if not body.inputs:
        raise ApiError(422, "inputs is empty: give at least one text")
    if len(body.inputs) > config.max_request_rows:
        raise ApiError(
            413,
            f"inputs has {len(body.inputs)} rows; this server takes at most "
            f"max_request_rows={config.max_request_rows} per request: split it",
        )
    rows = []
    for i, item in enumerate(body.inputs):
        row = InputRow(text=item, adapter=None) if isinstance(item, str) else item
        ref = row.adapter or body.adapter
        if ref is None:
            raise ApiError(422, f"inputs.{i}: no adapter: give 'adapter' on the request or the row")
        for field, text in (("text", row.text), ("text_pair", row.text_pair)):
            if text is not None and len(text) > config.max_text_chars:
                raise ApiError(
                    413,
                    f"inputs.{i}.{field} has {len(text)} characters; at most "
                    f"max_text_chars={config.max_text_chars}",
                )
        where = f"inputs.{i}.adapter" if row.adapter else "adapter"
        rows.append(Row(row.text, catalog.pin(ref, where).ref, row.text_pair))
    return rows


def _asked(item: str | InputRow, default: str | None) -> str:
    """The adapter reference a row asked for (``sst2``, ``sst2@production``), as given."""
    return (None if isinstance(item, str) else item.adapter) or default or ""


def _result(prediction: Any, top_k: int | None, return_probs: bool) -> dict[str, Any]:
    out = {
        "label": prediction.label,
        "score": prediction.score,
        "ref": prediction.ref,
        "adapter": prediction.adapter,
        "abstained": prediction.abstained,
    }
    if return_probs:
        ranked = sorted(prediction.probs.items(), key=lambda kv: -kv[1])
        out["probs"] = dict(ranked[:top_k] if top_k else ranked)
    return out


def _grouped(entries: list[Entry]) -> dict[str, list[Entry]]:
    grouped: dict[str, list[Entry]] = {}
    for e in entries:
        grouped.setdefault(e.name, []).append(e)
    return grouped


def _summary(
    versions: list[Entry], resident: tuple[str, ...], aliases: Mapping[str, str]
) -> dict[str, Any]:
    latest = versions[-1]
    return {
        "name": latest.name,
        "latest": latest.ref,
        "versions": [e.version for e in versions],
        "aliases": dict(aliases),
        "method": latest.method,
        "task": latest.task,
        "labels": list(latest.labels),
        "metrics": latest.metrics,
        "resident": [e.ref for e in versions if e.ref in resident],
    }


def _version(entry: Entry, resident: tuple[str, ...]) -> dict[str, Any]:
    keys = ("ref", "version", "method", "labels", "metrics", "created", "tags")
    return {**{k: entry.to_dict()[k] for k in keys}, "resident": entry.ref in resident}


async def _job(scheduler: Scheduler, job: Callable[[Any], Any], root: object) -> Any:
    try:
        return await scheduler.call(job)
    except Exception as exc:
        raise status_of(exc, root) from None


# -- auth, limits, errors -----------------------------------------------------------------


def _auth(keys: Mapping[str, bool] | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        request.state.admin = keys is None
        if keys is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(
                401,
                "this route needs 'Authorization: Bearer <key>' with a key from the server's api key file",
                {"WWW-Authenticate": "Bearer"},
            )
        found = None
        for key, is_admin in keys.items():  # every key compared: the time says nothing
            if hmac.compare_digest(given.strip().encode(), key.encode()):
                found = is_admin
        if found is None:
            raise ApiError(401, "the API key is not valid", {"WWW-Authenticate": "Bearer"})
        request.state.admin = found

    return check


def _admin(keys: Mapping[str, bool] | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if keys is not None and not request.state.admin:
            raise ApiError(
                403, "this route needs an admin key (a line 'KEY admin' in the api key file)"
            )

    return check


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before the app
    reads it (declared by Content-Length, or counted while it streams in)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        message = f"the request body is larger than max_body_bytes={self.limit}: send fewer or shorter rows"
        log.warning("%s %s -> 413: %s", scope["method"], scope["path"], message)
        await JSONResponse({"error": message}, status_code=413)(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    def answer(
        request: Request, status: int, message: str, headers: Mapping[str, str] | None = None
    ) -> JSONResponse:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, status, message)
        return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc.status, str(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(request, 422, validation_message(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return answer(request, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return answer(request, 500, f"internal error ({type(exc).__name__}); the server log has it")
