"""How the daemon reaches each host: a command runner and a libvirt connection, from its TEMPLATE.

A host whose TEMPLATE has no ``SSH_HOST`` (and no remote ``LIBVIRT_URI``) is the scheduler's own
machine: commands run through the local runner and libvirt at ``qemu:///system``. Every other host is
reached over SSH (one pooled asyncssh connection per host) and through libvirt's ``qemu+ssh``
transport, whose OpenSSH is pointed at vmsched's own known_hosts by a small wrapper script in the state
directory (``ssh/ssh``): host keys are always verified, never skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from drivers.commands import Result, Runner
from drivers.local import LocalRunner
from drivers.ssh import SshPool, SshSettings
from drivers.sshtarget import SshTarget
from drivers.vmm import LOCAL_URI, KvmHost
from drivers.vmm.uri import host_uri
from scheduler.config import Config
from scheduler.errors import ValidationError
from scheduler.model.objects.host import Host
from scheduler.store.state import State

log = logging.getLogger(__name__)

WRAPPER = "ssh/ssh"


def is_local(template: Any) -> bool:
    uri = template.get("LIBVIRT_URI") or ""
    return not template.get("SSH_HOST") and (not uri or uri.startswith(("qemu:///", "qemu+unix:///")))


def ssh_target(name: str, template: Any) -> SshTarget:
    port = template.get("SSH_PORT") or "22"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(f"host {name}: SSH_PORT {port!r} is not a TCP port")
    return SshTarget(
        host=template.get("SSH_HOST") or name,
        port=int(port),
        user=template.get("SSH_USER") or "root",
        key=Path(template.get("SSH_KEY")) if template.get("SSH_KEY") else None,
    )


def write_ssh_wrapper(state_dir: Path, settings: SshSettings) -> Path:
    """An ``ssh`` for libvirt's qemu+ssh that trusts only vmsched's known_hosts."""
    path = state_dir / WRAPPER
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    options = [
        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={settings.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"ConnectTimeout={int(settings.connect_timeout)}",
        "-o", f"ServerAliveInterval={int(settings.keepalive or 30)}",
    ]  # fmt: skip
    if settings.key:
        options += ["-o", "IdentitiesOnly=yes", "-i", str(settings.key)]
    text = f'#!/bin/sh\n# written by vmsched: libvirt over ssh with verified host keys\nexec ssh {shlex.join(options)} "$@"\n'
    tmp = path.with_name(".ssh.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)
    return path


class _LibvirtCommands:
    """The vmm driver's command runner (for qemu-img on the host) over our runners."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def __call__(self, argv: Sequence[str], *, time_limit: float) -> str:
        result: Result = await self.runner.run(list(argv), timeout=time_limit)
        return result.stdout.decode(errors="replace")


class HostLinks:
    def __init__(self, state_dir: Path, ssh_settings: SshSettings) -> None:
        self.settings = ssh_settings
        self.pool = SshPool(ssh_settings)
        self.local = LocalRunner()
        self.wrapper = write_ssh_wrapper(state_dir, ssh_settings)
        self._vmm: dict[int, tuple[str, KvmHost]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def runner(self, host: Host) -> Runner:
        """The command runner for a Host object (``drivers.commands.Runner`` contract)."""
        if is_local(host.template):
            return self.local
        return self.pool.runner(ssh_target(host.name, host.template))

    def uri(self, host: Host) -> str:
        if is_local(host.template):
            return host.template.get("LIBVIRT_URI") or LOCAL_URI
        return host_uri(host.template, host.name, ssh_command=str(self.wrapper))

    def vmm(self, host: Host) -> KvmHost:
        """The libvirt connection of a host, rebuilt when its URI changes."""
        uri = self.uri(host)
        cached = self._vmm.get(host.id)
        if cached is not None and cached[0] == uri:
            return cached[1]
        if cached is not None:
            self._retire(cached[1])
        kvm = KvmHost(host.name, uri, runner=_LibvirtCommands(self.runner(host)))
        self._vmm[host.id] = (uri, kvm)
        return kvm

    def forget(self, host_id: int) -> None:
        cached = self._vmm.pop(host_id, None)
        if cached is not None:
            self._retire(cached[1])

    def _retire(self, kvm: KvmHost) -> None:
        task = asyncio.get_running_loop().create_task(kvm.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for _, kvm in self._vmm.values():
            await kvm.close()
        self._vmm.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self.pool.close()


class Daemon(Protocol):
    """What the host and datastore monitors need of the daemon (the API's context is one)."""

    state: State
    config: Config
    links: HostLinks | None

    def now(self) -> int: ...

    def connections(self, refused: str) -> HostLinks:
        """``links``, or an ActionError ending in ``refused`` when the daemon has none."""
        ...
