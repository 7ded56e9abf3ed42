"""The HTTP face of ``gradad serve``: a Starlette application over a :class:`Service`.

Endpoints (all JSON unless said; the OpenAPI schema is :mod:`gradad.serve.openapi`): GET / (the
page), /healthz, /readyz, /metrics (Prometheus text), /openapi.json; POST /v1/inspect; GET
/v1/inspections, /v1/inspections/{id} and its heatmap.png, overlay.png and image; GET and PUT
/v1/threshold; GET /v1/status; POST /v1/pause and /v1/resume (the folder source).

An error is ``{"error": message, "status": code}``.
"""
from __future__ import annotations

import asyncio
import hmac
import math
import time
from datetime import datetime, timezone

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Match, Route

from .config import valid_label
from .images import ImageRejected, decode_image
from .inspector import Job, QueueFull
from .metrics import CONTENT_TYPE
from .openapi import openapi_schema
from .page import PAGE_HTML
from .service import format_time, inspection_json

__all__ = ["create_app"]

OPEN_PATHS = ("/healthz", "/")  # no token needed: the process answers / the page's shell (it holds no data)
RETRY_AFTER_S = 1


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def route_label(routes, scope) -> str:
    """The route template a request belongs to, for the metrics' labels (ids are not labels)."""
    for route in routes:
        if route.matches(scope)[0] != Match.NONE:  # FULL, or PARTIAL: the path with another method
            return route.path
    return "other"


class Guard:
    """ASGI middleware: the bearer token (when one is set) and the requests-by-status counter."""

    def __init__(self, app, service, routes):
        self.app, self.service, self.routes = app, service, routes
        token = service.config.token
        self.expected = None if token is None else f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label, status = route_label(self.routes, scope), [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and scope["path"] not in OPEN_PATHS:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    response = error(401, "this service needs `Authorization: Bearer TOKEN`",
                                     headers={"WWW-Authenticate": "Bearer"})
                    return await response(scope, receive, counted_send)
            await self.app(scope, receive, counted_send)
        finally:
            self.service.metrics.requests.inc(route=label, status=str(status[0]))


def parse_time(value: str, name: str) -> float:
    """A query's time: unix seconds or ISO 8601 (a time without a zone is UTC)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} must be unix seconds or an ISO 8601 time, got {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (ValueError carrying 413) as soon as it is known to exceed ``limit``:
    from Content-Length before reading, or while reading a chunked body."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ImageRejected(413 if length.isdigit() else 400,
                            f"the request body has {length} bytes; this service takes at most {limit} (--max-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ImageRejected(413, f"the request body is over {limit} bytes (--max-bytes)")
    return bytes(body)


async def image_from_request(request: Request, limit: int) -> tuple:
    """(image bytes, {'item_id', 'station'}) from a raw image/* body or a multipart field ``image``."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (kind.startswith("image/") or kind == "multipart/form-data"):
        raise ImageRejected(415, f"Content-Type {kind or '(none)'} is not accepted: send the image as the raw "
                                 f"body with Content-Type image/* or as the multipart/form-data field 'image'")
    body = await read_body(request, limit)
    labels = {k: request.query_params.get(k) for k in ("item_id", "station")}
    if kind.startswith("image/"):
        return body, labels

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as failure:  # the multipart parser's own errors: the body is malformed
        raise ImageRejected(422, f"the multipart body cannot be parsed: {failure}") from None
    part = form.get("image")
    if part is None or isinstance(part, str):
        raise ImageRejected(422, "the multipart body has no file field 'image'")
    part_type = (part.content_type or "application/octet-stream").split(";")[0].strip().lower()
    if not (part_type.startswith("image/") or part_type == "application/octet-stream"):
        raise ImageRejected(415, f"the field 'image' has Content-Type {part_type}, not image/*")
    for key in labels:
        if isinstance(form.get(key), str) and form.get(key):
            labels[key] = form[key]
    return await part.read(), labels


def create_app(service) -> Starlette:
    """The application of a :class:`gradad.serve.service.Service` (not yet started)."""
    config, store = service.config, service.store

    def not_ready():
        if service.error is not None:
            return error(503, f"the model failed to load: {service.error}")
        return error(503, "the model is still loading", headers={"Retry-After": str(RETRY_AFTER_S)})

    async def page(request):
        return HTMLResponse(PAGE_HTML)

    async def healthz(request):
        return JSONResponse({"status": "ok"})

    async def readyz(request):
        return JSONResponse({"ready": True, "model": service.model_name}) if service.ready.is_set() else not_ready()

    async def metrics(request):
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(request):
        return JSONResponse(openapi_schema())

    async def inspect(request):
        received = time.time()
        if not service.ready.is_set():
            return not_ready()
        try:
            data, labels = await image_from_request(request, config.max_bytes)
            for key, value in labels.items():
                if value is not None and not valid_label(value):
                    raise ImageRejected(422, f"{key} must be 1-128 letters, digits or _ . : / @ + -, got {value!r}")
            began = time.perf_counter()
            rgb, suffix = await run_in_threadpool(decode_image, data, config.max_pixels)
        except ImageRejected as rejected:
            service.metrics.rejected.inc(reason=str(rejected.status))
            return error(rejected.status, str(rejected))
        job = Job(rgb=rgb, received_at=received, item_id=labels["item_id"], station=labels["station"],
                  kept=(suffix, data) if config.keep_images else None,
                  timings={"decode": (time.perf_counter() - began) * 1000})
        try:
            future = service.inspector.submit(job)
        except QueueFull as full:
            service.metrics.rejected.inc(reason="queue_full")
            return error(503, f"busy: {full}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            inspection = await asyncio.wrap_future(future)
        except RuntimeError as failure:
            return error(500, str(failure))
        service.metrics.latency.observe(time.time() - received)
        row = dict(vars(inspection), model_name=service.model_name)
        return JSONResponse(inspection_json(row))

    async def inspections(request):
        query = request.query_params
        try:
            limit = int(query.get("limit", "50"))
            before = int(query["before"]) if "before" in query else None
            if not 1 <= limit <= 500:
                raise ValueError(f"limit must be 1..500, got {limit}")
            anomalous = {"true": True, "false": False, None: None}[query.get("anomalous")]
            since = parse_time(query["since"], "since") if "since" in query else None
            until = parse_time(query["until"], "until") if "until" in query else None
        except KeyError:
            return error(422, f"anomalous must be true or false, got {query.get('anomalous')!r}")
        except ValueError as bad:
            return error(422, f"bad query: {bad}")
        rows = await run_in_threadpool(store.list, limit=limit + 1, before=before, anomalous=anomalous,
                                       station=query.get("station"), since=since, until=until)
        more = len(rows) > limit
        items = [inspection_json(r) for r in rows[:limit]]
        return JSONResponse({"items": items, "next": f"{rows[limit - 1]['seq']}" if more else None,
                             "cursor_field": "before"})

    async def one(request):
        row = await run_in_threadpool(store.get, request.path_params["id"])
        if row is None:
            return error(404, f"no inspection {request.path_params['id']!r}")
        return JSONResponse(inspection_json(row))

    async def file(request):
        name = request.path_params["file"]
        if name not in ("heatmap.png", "overlay.png", "image"):
            return error(404, f"no file {name!r}: an inspection has heatmap.png, overlay.png and, with "
                              f"--keep-images, image")
        row = await run_in_threadpool(store.get, request.path_params["id"])
        if row is None:
            return error(404, f"no inspection {request.path_params['id']!r}")
        relative = row[{"heatmap.png": "heatmap", "overlay.png": "overlay", "image": "image"}[name]]
        if relative is None:
            return error(404, "this inspection's image was not kept (start the service with --keep-images)")
        media = "image/png" if name.endswith(".png") else None
        return FileResponse(store.path(relative), media_type=media, headers={"Cache-Control": "max-age=86400"})

    async def threshold(request):
        if request.method == "GET":
            return JSONResponse({"threshold": service.threshold, "source": service.threshold_source,
                                 "changes": await run_in_threadpool(store.threshold_changes)})
        if not service.ready.is_set():
            return not_ready()
        try:
            value = (await request.json())["threshold"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError
        except Exception:
            return error(422, 'send {"threshold": a finite number} as JSON')
        previous, changed_at = await run_in_threadpool(service.inspector.set_threshold, float(value))
        service.threshold_source = "set at run time (PUT /v1/threshold)"
        return JSONResponse({"threshold": float(value), "previous": previous,
                             "changed_at": format_time(changed_at)})

    async def status(request):
        return JSONResponse(await run_in_threadpool(service.status))

    async def pause_or_resume(request):
        if config.watch is None:
            return error(409, "there is no folder source to pause or resume (start the service with --watch DIR)")
        if service.folder is None:
            return not_ready()
        action = service.folder.pause if request.url.path.endswith("pause") else service.folder.resume
        await run_in_threadpool(action)
        return JSONResponse({"paused": service.folder.paused})

    routes = [
        Route("/", page, methods=["GET"]), Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]), Route("/v1/inspect", inspect, methods=["POST"]),
        Route("/v1/inspections", inspections, methods=["GET"]),
        Route("/v1/inspections/{id}", one, methods=["GET"]),
        Route("/v1/inspections/{id}/{file}", file, methods=["GET"]),
        Route("/v1/threshold", threshold, methods=["GET", "PUT"]), Route("/v1/status", status, methods=["GET"]),
        Route("/v1/pause", pause_or_resume, methods=["POST"]), Route("/v1/resume", pause_or_resume, methods=["POST"]),
    ]

    async def not_found(request, exc):
        return error(exc.status_code, getattr(exc, "detail", "") or f"HTTP {exc.status_code}")

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.add_middleware(Guard, service=service, routes=routes)
    return app
