"""Where the daemon is, who is asking, one XML-RPC call, and one streaming GET (``/download``).

The endpoint comes from ``--endpoint``, else ``$VMSCHED_ENDPOINT``, else ``$ONE_XMLRPC``, else
:data:`DEFAULT_ENDPOINT`. The session (``user:password``) is the first line of the file named by
``$VMSCHED_AUTH``, else ``$ONE_AUTH``, else ``~/.one/one_auth``. Replies follow OpenNebula's
convention ``[ok, result, error_code, ...]``; a failed call becomes the matching exception of
:mod:`scheduler.errors`.
"""

from __future__ import annotations

import contextlib
import http.client
import urllib.parse
import xmlrpc.client
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from xml.parsers.expat import ExpatError

from scheduler.errors import ActionError, AuthError, NotFound, PermissionDenied, VmschedError

DEFAULT_ENDPOINT = "http://127.0.0.1:2633/RPC2"
DEFAULT_TIMEOUT = 60.0
STREAM_CHUNK = 1 << 20

# OpenNebula's ErrorCode values (RequestManager.h) and the exception each one becomes.
_ERROR_CODES: dict[int, type[VmschedError]] = {
    0x0100: AuthError,
    0x0200: PermissionDenied,
    0x0400: NotFound,
    0x0800: ActionError,
}


class UsageError(VmschedError):
    """Bad arguments, or a local file that cannot be used: the command exits with status 2."""


class Unreachable(VmschedError):
    """The daemon did not answer (refused, timed out, not an XML-RPC server)."""


# HTTP statuses of the daemon's plain HTTP routes (``/download``) and the exception each one becomes.
_HTTP_ERRORS: dict[int, type[VmschedError]] = {
    400: UsageError,
    401: AuthError,
    403: PermissionDenied,
    404: NotFound,
    501: ActionError,
}


@contextlib.contextmanager
def _transfer_errors(netloc: str, path: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise Unreachable(f"cannot reach vmsched at {netloc}: {exc}") from None
    except http.client.HTTPException as exc:
        raise Unreachable(f"{path}: the transfer from vmsched at {netloc} broke off ({exc!r})") from None


def resolve_endpoint(option: str | None, env: Mapping[str, str]) -> str:
    endpoint = option or env.get("VMSCHED_ENDPOINT") or env.get("ONE_XMLRPC") or DEFAULT_ENDPOINT
    if not endpoint.startswith(("http://", "https://")):
        raise UsageError(f"endpoint {endpoint!r} must be an http:// or https:// URL")
    return endpoint


def auth_file(env: Mapping[str, str]) -> Path:
    named = env.get("VMSCHED_AUTH") or env.get("ONE_AUTH")
    if named:
        return Path(named)
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".one" / "one_auth"


def read_session(path: Path) -> str:
    """The ``user:password`` held on the first non-blank line of ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"no credentials: {path} does not exist (it should hold one line 'user:password'; "
            "point VMSCHED_AUTH or ONE_AUTH at another file)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read credentials from {path}: {exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    user, sep, _ = lines[0].partition(":") if lines else ("", "", "")
    if not user or not sep:
        raise UsageError(f"{path}: expected one line 'user:password'")
    return lines[0]


class _TimeoutTransport(xmlrpc.client.Transport):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host):  # type: ignore[no-untyped-def]
        connection = super().make_connection(host)
        connection.timeout = self.timeout
        return connection


class _SafeTimeoutTransport(xmlrpc.client.SafeTransport):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host):  # type: ignore[no-untyped-def]
        connection = super().make_connection(host)
        connection.timeout = self.timeout
        return connection


class Client:
    """Calls the daemon's XML-RPC methods with the session as first argument."""

    def __init__(self, endpoint: str, session: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoint = endpoint
        self._session = session
        self._timeout = timeout
        transport_class = _SafeTimeoutTransport if endpoint.startswith("https://") else _TimeoutTransport
        self._proxy = xmlrpc.client.ServerProxy(endpoint, transport=transport_class(timeout))

    def call(self, method: str, *args: object) -> object:
        """The result of a successful call; raises a :mod:`scheduler.errors` exception otherwise."""
        reply = self._send(method, args)
        if not isinstance(reply, list | tuple) or len(reply) < 2:
            raise VmschedError(f"{method}: unexpected reply from vmsched at {self.endpoint}: {reply!r}")
        if reply[0]:
            return reply[1]
        code = reply[2] if len(reply) > 2 and isinstance(reply[2], int) else 0
        raise _ERROR_CODES.get(code, VmschedError)(str(reply[1]))

    def stream(self, path: str, params: Mapping[str, str], sink: Callable[[bytes], object]) -> dict[str, str]:
        """``GET <path>?<params>`` on the daemon's HTTP server (the endpoint's host and port), the session in
        the Authorization header; the body goes to ``sink`` chunk by chunk (what ``sink`` raises is left
        alone). Returns the reply's headers; an error reply becomes the matching exception, a body cut short
        :class:`Unreachable`."""
        parts = urllib.parse.urlsplit(self.endpoint)
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.netloc, timeout=self._timeout)
        try:
            with _transfer_errors(parts.netloc, path):
                connection.request("GET", f"{path}?{urllib.parse.urlencode(params)}",
                                   headers={"Authorization": f"Bearer {self._session}"})
                reply = connection.getresponse()
                if reply.status != 200:
                    text = reply.read(4096).decode("utf-8", "replace").strip()
                    raise _HTTP_ERRORS.get(reply.status, VmschedError)(
                        f"{path}: {text or reply.reason} (HTTP {reply.status})")
            expected, received = int(reply.headers.get("Content-Length", "-1")), 0
            while True:
                with _transfer_errors(parts.netloc, path):
                    chunk = reply.read(STREAM_CHUNK)
                if not chunk:
                    break
                sink(chunk)
                received += len(chunk)
            if expected >= 0 and received != expected:
                raise Unreachable(f"{path}: the daemon stopped after {received} of {expected} bytes")
            return dict(reply.headers.items())
        finally:
            connection.close()

    def close(self) -> None:
        """Close the kept-alive connection to the daemon."""
        self._proxy("close")()

    def _send(self, method: str, args: tuple[object, ...]) -> object:
        try:
            return getattr(self._proxy, method)(self._session, *args)
        except xmlrpc.client.Fault as fault:
            raise VmschedError(f"{method}: {fault.faultString}") from None
        except xmlrpc.client.ProtocolError as exc:
            raise Unreachable(f"cannot use vmsched at {self.endpoint}: HTTP {exc.errcode} {exc.errmsg}") from None
        except OSError as exc:
            raise Unreachable(f"cannot reach vmsched at {self.endpoint}: {exc}") from None
        except (ExpatError, http.client.HTTPException) as exc:
            raise Unreachable(f"cannot use vmsched at {self.endpoint}: bad reply ({exc})") from None
