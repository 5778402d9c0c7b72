"""``GET /download?url=<backup URL>``: one backed-up disk, streamed as its qcow2 file (a disk at an increment
of a chain: its links merged into one self-contained qcow2 on the backup server first).

The session travels in the ``Authorization`` header, never in the URL (URLs end up in logs): ``Bearer
user:password`` as XML-RPC sessions are written, or HTTP Basic (``curl -u user:password``). The caller needs
USE on the backup image the URL belongs to (its owner, or an administrator). The bytes come from the
datastore's server (:mod:`drivers.datastore.stream`) and are relayed as they arrive, with Content-Length and
the image's id in ``X-Vmsched-Image-Id`` so a client can check them against the image's CHECKSUMS. A merged
chain has no recorded sha256 of its own: every link is checked against its own on the server before the
merge, and ``X-Vmsched-Merged-Links`` says how many links were merged.

Errors are plain-text bodies: 400 a malformed URL, 401 no or bad session, 403 not the caller's image,
404 no such image, URL or file, 501 what vmsched cannot read (a DS_MAD without a reader), 502 the backup
server did not answer or the read failed, 503 a daemon without host connections.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from drivers.datastore.layout import disk_file_name
from drivers.datastore.stream import open_disk_at
from scheduler.api.permissions import Caller, Right, require
from scheduler.backup import urls as backup_urls
from scheduler.errors import ActionError, AuthError, DriverError, NotFound, PermissionDenied, ValidationError

log = logging.getLogger(__name__)

IMAGE_HEADER = backup_urls.IMAGE_HEADER
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def session_from(header: str | None) -> str:
    """The ``user:password`` session of an Authorization header (Bearer or Basic)."""
    scheme, _, value = (header or "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            return base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError("malformed Basic credentials") from None
    raise AuthError("no session: send 'Authorization: Bearer user:password'")


def download_handler(authenticate: Callable[[Any], Awaitable[Caller]], ctx: Any) -> Handler:
    """The aiohttp handler of ``GET /download``; ``ctx`` is the API's :class:`scheduler.api.Context`."""

    async def download(request: web.Request) -> web.StreamResponse:
        try:
            caller = await authenticate(session_from(request.headers.get("Authorization")))
            located = _locate(ctx, request.query.get("url", ""))
            require(caller, located.image.ownership.uid, Right.USE, "IMAGE", located.image.id, "download")
            if ctx.links is None:
                return _error(503, "this daemon has no host connections")
            return await _send(request, ctx, located)
        except AuthError as exc:
            return _error(401, str(exc), {"WWW-Authenticate": 'Bearer realm="vmsched"'})
        except PermissionDenied as exc:
            return _error(403, str(exc))
        except NotFound as exc:
            return _error(404, str(exc))
        except ValidationError as exc:
            return _error(400, str(exc))
        except ActionError as exc:
            return _error(501, str(exc))
        except DriverError as exc:
            return _error(502, str(exc))

    return download


def _locate(ctx: Any, text: str) -> backup_urls.Located:
    if not text:
        raise ValidationError("give the backup URL: /download?url=<backup URL>")
    return backup_urls.locate(text, ctx.state.images.all(), ctx.state.datastores.all())


async def _send(request: web.Request, ctx: Any, located: backup_urls.Located) -> web.StreamResponse:
    url, image = located.url, located.image
    began, sent = time.monotonic(), 0
    headers = {"Content-Type": "application/octet-stream", "Content-Disposition": f'attachment; filename="{url.file_name}"',
               IMAGE_HEADER: str(image.id)}
    digests: list[str] = []
    if len(url.chain) > 1:  # merged: no recorded sha256 is the result's, each link's is checked where it lies
        digests = [backup_urls.expected_sha256(image, disk_file_name(url.disk_id, n)) for n, _ in url.chain]
        headers[backup_urls.MERGED_HEADER] = str(len(url.chain))
    async with open_disk_at(located.datastore, ctx.links.settings, ctx.links.pool, located.vm_id, url.chain,
                            url.disk_id, url.path, digests) as stream:
        response = web.StreamResponse(headers={**headers, "Content-Length": str(stream.size)})
        await response.prepare(request)
        try:
            async for chunk in stream.chunks():
                await response.write(chunk)
                sent += len(chunk)
        except DriverError as exc:  # the headers are gone: cut the connection so the client sees it short
            log.warning("download of %s (image %s) failed after %d bytes: %s", url, image.id, sent, exc)
            if request.transport is not None:
                request.transport.close()
            return response
        except ConnectionResetError:
            log.info("download of %s (image %s): the client left after %d bytes", url, image.id, sent)
            return response
        await response.write_eof()
    log.info("image %s: %s downloaded (%d bytes in %.1f s)", image.id, url.file_name, sent, time.monotonic() - began)
    return response


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)
