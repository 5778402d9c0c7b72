"""Where a command runs over SSH: a host's address, port and user (and optionally its own key).

Plain data, apart from the connections of ``drivers.ssh``: what only names a server (the datastore
drivers' registry, backup URLs, the CLI) imports this without loading asyncssh.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 22


def host_pattern(host: str, port: int) -> str:
    """How known_hosts names ``host`` on ``port``."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


@dataclass(frozen=True)
class SshTarget:
    """Where to run: a host's address, port and user, and optionally its own private key."""

    host: str
    port: int = 22
    user: str = "root"
    key: Path | None = None

    @property
    def connection_key(self) -> tuple[str, int, str]:
        return (self.host, self.port, self.user)

    def __str__(self) -> str:
        return f"{self.user}@{host_pattern(self.host, self.port)}"


__all__ = ["DEFAULT_PORT", "SshTarget", "host_pattern"]
