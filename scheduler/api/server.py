"""The HTTP side of the daemon: XML-RPC on /RPC2 (TCP and an optional unix socket), /metrics and /download
(a backed-up disk by its backup URL: scheduler/api/download.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from scheduler import errors
from scheduler.api.download import download_handler
from scheduler.api.rpc import (
    ApiError,
    ErrorCode,
    Registry,
    coerce_args,
    error_code,
    failure,
    fault,
    parse_request,
    success,
)

log = logging.getLogger(__name__)

Authenticate = Callable[[Any], Awaitable[Any]]


@dataclass
class Dispatcher:
    registry: Registry
    authenticate: Authenticate
    context: Any

    async def handle(self, body: bytes) -> bytes:
        try:
            name, args = parse_request(body)
        except ApiError as exc:
            return fault(-32700, str(exc))
        method = self.registry.methods.get(name)
        if method is None:
            return fault(-506, f"Unknown method: {name[:200]}")
        started = time.perf_counter()
        try:
            caller = None
            if method.needs_session:
                if not args:
                    raise ApiError("the first argument must be the session string")
                caller = await self.authenticate(args[0])
                args = args[1:]
            values = coerce_args(method, args)
            result = await method.handler(self.context, caller, *values)
        except ApiError as exc:
            return failure(f"[{name}] {exc}", ErrorCode.XML_RPC_API)
        except errors.VmschedError as exc:
            log.info("%s refused: %s", name, exc)
            return failure(f"[{name}] {exc}", error_code(exc))
        except Exception:
            log.exception("internal error in %s", name)
            return failure(f"[{name}] internal error; see the vmsched log", ErrorCode.INTERNAL)
        log.debug("%s done in %.1f ms", name, (time.perf_counter() - started) * 1000)
        return success(result)


def make_app(dispatcher: Dispatcher, max_request_bytes: int, metrics: Callable[[], str] | None = None) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes)

    async def rpc(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > max_request_bytes:
            return _too_large(max_request_bytes)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _too_large(max_request_bytes)
        reply = await dispatcher.handle(body)
        return web.Response(body=reply, content_type="text/xml")

    async def metrics_page(request: web.Request) -> web.Response:
        text = metrics() if metrics else ""
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    app.router.add_post("/RPC2", rpc)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/download", download_handler(dispatcher.authenticate, dispatcher.context))
    return app


def _too_large(limit: int) -> web.Response:
    body = failure(f"request larger than MESSAGE_SIZE ({limit} bytes)", ErrorCode.XML_RPC_API)
    return web.Response(status=413, body=body, content_type="text/xml")
