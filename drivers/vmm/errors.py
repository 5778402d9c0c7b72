"""Typed errors of the vmm driver and the translation of libvirt's errors into them.

Every message names the host, the domain (when there is one) and the operation, then libvirt's own words:
``host1: domain 'web1': snapshot: <libvirt message>``. Whether trying again may help is decided by the
libvirt error code: a lost connection, an RPC failure or a busy domain lock are retryable, the rest not.
"""

from __future__ import annotations

import libvirt

from scheduler.errors import DriverError, NotFound

_RETRYABLE_CODES = frozenset({
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,  # "cannot acquire state change lock"
})
_TRANSPORT_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})
_AGENT_CODES = frozenset({libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED})


class VmmError(DriverError):
    """A libvirt operation on a host failed."""

    def __init__(self, message: str, *, host: str | None = None, retryable: bool | None = None,
                 code: int | None = None) -> None:
        self.code = code
        super().__init__(message, host=host, retryable=retryable)


class DomainNotFound(VmmError, NotFound):
    """The host has no domain with that name or UUID."""


class GuestAgentError(VmmError):
    """The QEMU guest agent is not configured, not connected or failed the command."""


class OperationRefused(VmmError):
    """vmsched refuses the operation before asking libvirt (wrong disk format, wrong domain state)."""


class CommitTimeout(VmmError):
    """A blockcommit did not become ready before its deadline; the job was aborted, the overlay is still active."""

    retryable = True


def context(host: str, domain: str | None, operation: str) -> str:
    """The ``host: domain 'x': operation`` prefix of every message."""
    return f"{host}: domain {domain!r}: {operation}" if domain is not None else f"{host}: {operation}"


def is_retryable(code: int, domain: int) -> bool:
    if code in _RETRYABLE_CODES:
        return True
    return code == libvirt.VIR_ERR_SYSTEM_ERROR and domain in _TRANSPORT_DOMAINS


def from_libvirt(exc: libvirt.libvirtError, host: str, domain: str | None, operation: str) -> VmmError:
    """The typed error for a libvirt exception raised by ``operation`` on ``domain`` of ``host``."""
    code, err_domain = exc.get_error_code() or 0, exc.get_error_domain() or 0
    text = exc.get_error_message() or str(exc)
    kind: type[VmmError] = VmmError
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        kind = DomainNotFound
    elif code in _AGENT_CODES or (code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED and "guest agent" in text):
        kind = GuestAgentError
    return kind(f"{context(host, domain, operation)}: {text}", host=host,
                retryable=is_retryable(code, err_domain), code=code)
