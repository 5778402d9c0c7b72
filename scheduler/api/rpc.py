"""XML-RPC over HTTP with OpenNebula's conventions.

Every method takes the session string first and answers ``[ok, result_or_message, error_code]``.
Methods are registered with their parameter types; the dispatcher checks arity and types, turns
vmsched's typed errors into OpenNebula error codes, and never lets a traceback reach the client.
"""

from __future__ import annotations

import logging
import xml.parsers.expat
import xmlrpc.client
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from scheduler import errors

log = logging.getLogger(__name__)


class ErrorCode(IntEnum):
    SUCCESS = 0x0000
    AUTHENTICATION = 0x0100
    AUTHORIZATION = 0x0200
    NO_EXISTS = 0x0400
    ACTION = 0x0800
    XML_RPC_API = 0x1000
    INTERNAL = 0x2000
    ALLOCATE = 0x4000
    LOCKED = 0x8000


_CODES: list[tuple[type[Exception], ErrorCode]] = [
    (errors.AuthError, ErrorCode.AUTHENTICATION),
    (errors.PermissionDenied, ErrorCode.AUTHORIZATION),
    (errors.NotFound, ErrorCode.NO_EXISTS),
    (errors.ActionError, ErrorCode.ACTION),
    (errors.TemplateError, ErrorCode.INTERNAL),
    (errors.ValidationError, ErrorCode.INTERNAL),
    (errors.DriverError, ErrorCode.ACTION),
]


def error_code(exc: Exception) -> ErrorCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return ErrorCode.INTERNAL


class ApiError(errors.VmschedError):
    """A request the API refuses for its shape (XML_RPC_API)."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    default: Any = ...

    @property
    def optional(self) -> bool:
        return self.default is not ...


Handler = Callable[..., Awaitable[Any]]


@dataclass
class Method:
    name: str
    params: tuple[Param, ...]
    handler: Handler
    needs_session: bool = True


@dataclass
class Registry:
    methods: dict[str, Method] = field(default_factory=dict)

    def method(self, name: str, *params: Param, needs_session: bool = True) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            if name in self.methods:
                raise ValueError(f"method {name} registered twice")
            self.methods[name] = Method(name, params, handler, needs_session)
            return handler

        return register


def _type_name(kind: type) -> str:
    return {int: "int", bool: "boolean", str: "string", list: "array", float: "double"}.get(kind, kind.__name__)


def coerce_args(method: Method, args: tuple[Any, ...]) -> list[Any]:
    """Check arity and types of the arguments after the session; fill in defaults."""
    params = method.params
    required = sum(1 for p in params if not p.optional)
    if not required <= len(args) <= len(params):
        expected = f"{required}" if required == len(params) else f"{required} to {len(params)}"
        raise ApiError(f"expected {expected} argument(s) after the session, got {len(args)}")
    values = []
    for index, param in enumerate(params):
        if index >= len(args):
            values.append(param.default)
            continue
        values.append(_coerce(param, args[index], index + 2))
    return values


def _coerce(param: Param, value: Any, position: int) -> Any:
    kind = param.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**31) <= value < 2**31:
                raise ApiError(f"argument {position} ({param.name}) is out of the 32-bit integer range")
            return value
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ApiError(
        f"argument {position} ({param.name}) must be {_type_name(kind)}, got {_type_name(type(value))}"
    )


def parse_request(body: bytes) -> tuple[str, tuple[Any, ...]]:
    try:
        params, name = xmlrpc.client.loads(body, use_builtin_types=False)
    except (xml.parsers.expat.ExpatError, xmlrpc.client.ResponseError, ValueError, TypeError) as exc:
        raise ApiError(f"malformed XML-RPC request: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the stdlib unmarshaller raises assorted errors on hostile input
        raise ApiError(f"malformed XML-RPC request: {type(exc).__name__}") from None
    if not isinstance(name, str) or not name:
        raise ApiError("malformed XML-RPC request: no method name")
    return name, params


def success(result: Any) -> bytes:
    return xmlrpc.client.dumps(([True, result, 0],), methodresponse=True, allow_none=False).encode()


def failure(message: str, code: ErrorCode) -> bytes:
    return xmlrpc.client.dumps(([False, message, int(code)],), methodresponse=True).encode()


def fault(code: int, message: str) -> bytes:
    return xmlrpc.client.dumps(xmlrpc.client.Fault(code, message), methodresponse=True).encode()
