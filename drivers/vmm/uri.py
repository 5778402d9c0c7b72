"""libvirt connection URIs for a host, built from its SSH settings (pure).

A remote host is reached with libvirt's own ``qemu+ssh`` transport, which runs OpenSSH. Host keys are
checked by that ssh: either through ``command=`` (an ssh wrapper pointing at vmsched's known_hosts, with
``StrictHostKeyChecking yes``) or the user's known_hosts. ``no_verify`` is refused wherever it comes from.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import parse_qsl, quote, urlsplit

from scheduler.errors import ValidationError

LOCAL_URI = "qemu:///system"


def ssh_uri(address: str, *, port: int = 22, user: str = "root", command: str | None = None,
            keyfile: str | None = None) -> str:
    """``qemu+ssh://user@address:port/system`` with the ssh wrapper and key as query parameters."""
    query = [("no_tty", "1")]
    if command:
        query.append(("command", command))
    if keyfile:
        query.append(("keyfile", keyfile))
    netloc = f"{quote(user, safe='')}@{address}" + (f":{port}" if port != 22 else "")
    text = "&".join(f"{key}={quote(value, safe='/')}" for key, value in query)
    return f"qemu+ssh://{netloc}/system?{text}"


def check_uri(uri: str) -> str:
    """``uri`` itself, or ValidationError when it would skip host key verification."""
    parts = urlsplit(uri)
    if not parts.scheme:
        raise ValidationError(f"libvirt URI {uri!r} has no scheme (e.g. qemu+ssh://root@host/system)")
    params = {key.lower(): value for key, value in parse_qsl(parts.query, keep_blank_values=True)}
    if params.get("no_verify", "0") not in ("", "0"):
        raise ValidationError(f"libvirt URI {uri!r} disables host key checking (no_verify): not allowed")
    return uri


class Attributes(Protocol):
    """A host's TEMPLATE as the driver reads it (a Template, or a plain dict in tests)."""

    def get(self, key: str, default: str | None = None, /) -> str | None: ...


def host_uri(template: Attributes, host_name: str, *, ssh_command: str | None = None) -> str:
    """The libvirt URI of a host from its TEMPLATE (``LIBVIRT_URI``, else ``SSH_HOST/PORT/USER/KEY``)."""
    if template.get("LIBVIRT_URI"):
        return check_uri(template.get("LIBVIRT_URI") or "")
    port = template.get("SSH_PORT") or "22"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(f"host {host_name}: SSH_PORT {port!r} is not a TCP port")
    return ssh_uri(template.get("SSH_HOST") or host_name, port=int(port), user=template.get("SSH_USER") or "root",
                   command=ssh_command, keyfile=template.get("SSH_KEY") or None)
