"""Host keys of hosts and backup servers: the known_hosts file, first-contact fetching and explicit acceptance.

The file uses OpenSSH's format (``[host]:port keytype base64``, or bare ``host`` for port 22), so the same
file serves asyncssh, OpenSSH and libvirt's ``qemu+ssh``. Nothing here trusts a key on its own: a key
fetched from a server is only shown (with its SHA256 fingerprint) until :func:`accept_host_key` records it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncssh

from drivers.commands import HostKeyMismatch, HostUnreachable
from drivers.sshtarget import DEFAULT_PORT, host_pattern


def fingerprint(key: asyncssh.SSHKey) -> str:
    """``SHA256:<base64>``, as ``ssh-keygen -l`` prints it."""
    return key.get_fingerprint("sha256")


def describe(key: asyncssh.SSHKey) -> str:
    """Key type and fingerprint, e.g. ``ssh-ed25519 SHA256:...``."""
    return f"{key.get_algorithm()} {fingerprint(key)}"


def entry_line(host: str, port: int, key: asyncssh.SSHKey) -> str:
    """The known_hosts line recording ``key`` for ``host`` on ``port``."""
    key_type, key_data = key.export_public_key("openssh").decode("ascii").split()[:2]
    return f"{host_pattern(host, port)} {key_type} {key_data}\n"


def known_keys(path: Path, host: str, port: int) -> list[asyncssh.SSHKey]:
    """Keys ``path`` trusts for ``host`` on ``port`` (hashed and wildcard entries included); none if no file."""
    if not path.exists():
        return []
    trusted = asyncssh.match_known_hosts(str(path), host, "", None if port == DEFAULT_PORT else port)[0]
    return list(dict.fromkeys(trusted))


def trusted_entries(path: Path, host: str, port: int) -> str:
    """known_hosts lines for every key ``path`` trusts for ``host`` on ``port``, written out plainly (also
    those recorded hashed or by wildcard), to hand to another machine's ssh; empty when none."""
    return "".join(entry_line(host, port, key) for key in known_keys(path, host, port))


async def fetch_host_key(host: str, port: int = DEFAULT_PORT, *, timeout: float = 10) -> asyncssh.SSHKey:  # noqa: ASYNC109
    """The key ``host`` presents in a key exchange. The key is NOT verified: show it, do not trust it."""
    try:
        async with asyncio.timeout(timeout):
            key = await asyncssh.get_server_host_key(host, port, config=None)
    except TimeoutError:
        raise HostUnreachable(f"{host}:{port}: no SSH key exchange within {timeout:g} s", host=host) from None
    except (OSError, asyncssh.Error) as exc:
        raise HostUnreachable(f"{host}:{port}: cannot fetch the host key: {exc}", host=host) from exc
    if key is None:
        raise HostUnreachable(f"{host}:{port}: the server presented no host key", host=host)
    return key


def accept_host_key(path: Path, host: str, port: int, key: asyncssh.SSHKey) -> bool:
    """Record ``key`` for ``host`` on ``port`` in ``path`` (created 0600); False when it was already there.

    A host that already has a different key recorded is refused with :class:`HostKeyMismatch`: replacing a
    key is a decision for an operator who removes the old line, never a side effect of accepting.
    """
    recorded = known_keys(path, host, port)
    if any(known.public_data == key.public_data for known in recorded):
        return False
    if recorded:
        raise HostKeyMismatch(
            f"{host_pattern(host, port)} already has another key in {path} "
            f"({', '.join(describe(k) for k in recorded)}); refusing to add {describe(key)}",
            host=host, fingerprint=fingerprint(key),
        )
    _append_line(path, entry_line(host, port, key))
    return True


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` with one ``write`` on an O_APPEND descriptor, so concurrent writers never interleave."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line
        os.write(fd, line.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
