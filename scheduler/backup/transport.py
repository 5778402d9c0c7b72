"""How a backup's data reaches the other side over SSH: the ssh argv (strict host keys, key, ciphers,
keep-alives) and the backup server's verified host key installed on the hypervisor.
"""

from __future__ import annotations

import logging
from typing import Any

from drivers import hostkeys
from drivers.datastore import (
    server_of,
    shared_upload_connection,
)
from scheduler.errors import ActionError
from scheduler.hosts.links import HostLinks, is_local
from scheduler.model.objects.datastore import Datastore

log = logging.getLogger(__name__)


COMMAND_TIMEOUT = 120.0

# AES-GCM first: the fastest cipher where both ends have AES-NI (data-path facts); chacha20 otherwise.
DATA_CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"


# A backup server gone silent (no reset, e.g. a dead link) ends a copy after about a minute, not at its timeout.
KEEPALIVE = (15, 4)  # ServerAliveInterval seconds, ServerAliveCountMax
# A hypervisor's copies to one backup server share one ssh connection (OpenSSH's ControlMaster), kept this
# many seconds after its last use: an upload or restore that follows another pays no new handshake (about
# 0.2 s, most of a small increment's upload). The sockets are in a 0700 directory of the hypervisor user.
SHARE_SECONDS = 60
SHARE_DIR = "vmsched-mux"


def ssh_command(key: Any, known_hosts: Any, *, only_key: bool = True, share_dir: str = "") -> list[str]:
    """The ssh argv a copy runs with: strict host keys from ``known_hosts``, no prompts, the key ``key``
    (``only_key``: that key alone; otherwise ssh may fall back to the user's own keys); ``share_dir`` (a
    private directory) holds the sockets of connections shared for SHARE_SECONDS."""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"ServerAliveInterval={KEEPALIVE[0]}",
            "-o", f"ServerAliveCountMax={KEEPALIVE[1]}", "-c", DATA_CIPHERS]
    if share_dir:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={share_dir}/%C", "-o", f"ControlPersist={SHARE_SECONDS}"]
    if key:
        argv += (["-o", "IdentitiesOnly=yes"] if only_key else []) + ["-i", str(key)]
    return argv


# The backup server's verified key, installed for the hypervisor's ssh (stdin: the known_hosts lines; $1 the
# file name under ~/.ssh, $2 the directory of shared connections there). Rewritten (atomically) only when it
# differs; prints the file's absolute path, then the directory's.
_INSTALL_KNOWN_HOSTS = """\
umask 077
mkdir -p -- "$HOME/.ssh" "$HOME/.ssh/$2"
f="$HOME/.ssh/$1"
cat > "$f.new.$$"
if cmp -s -- "$f.new.$$" "$f"; then rm -f -- "$f.new.$$"; else mv -f -- "$f.new.$$" "$f"; fi
printf '%s\\n%s\\n' "$f" "$HOME/.ssh/$2"
"""


def known_hosts_file(datastore: Datastore) -> str:
    """Named by the server, not the datastore: daemons (or datastores) sharing a hypervisor and a backup
    server share the file, and never overwrite one another's."""
    target = server_of(datastore)
    assert target is not None, "only datastores on an SSH server have a server key"
    return f"vmsched_known_hosts.{target.host}_{target.port}"


def server_known_hosts(links: HostLinks, datastore: Datastore) -> str:
    """The known_hosts lines vmsched trusts for the datastore's backup server; an error naming the fix when
    it has none (the server's key must be verified once: ``vmsched datastore accept-hostkey``)."""
    target = server_of(datastore)
    assert target is not None, "only datastores on an SSH server have a server key"
    lines = hostkeys.trusted_entries(links.settings.known_hosts, target.host, target.port)
    if not lines:
        raise ActionError(f"the host key of {target.host}:{target.port}, the backup server of datastore "
                          f"{datastore.id}, is not known to vmsched: check its fingerprint and accept it with "
                          f"`vmsched datastore accept-hostkey {datastore.id}` (or ACCEPT_HOSTKEY = \"YES\")")
    return lines


async def upload_ssh(links: HostLinks, host: Any, runner: Any, datastore: Datastore, *, share: bool = True) -> list[str]:
    """How the upload reaches the other side.

    ``rsync`` and ``restic``: the hypervisor's ssh to the backup (SFTP) server. Its host key is the one vmsched verified (installed
    into ``~/.ssh/vmsched_known_hosts.<server>_<port>`` on the hypervisor: a daemon under systemd has no agent to
    forward), unless the host's ``BACKUP_KNOWN_HOSTS`` names a file there. Its key is the host's
    ``BACKUP_SSH_KEY`` (a path on the hypervisor), else sched.conf's SSH/KEY path with the hypervisor user's
    own keys as fallback. rsync uploads (``share``) from one hypervisor to one server share a connection
    (SHARE_SECONDS) unless the host names its own known_hosts or says ``BACKUP_SSH_SHARE = "NO"``; a restore's copy has its own, so that a lost
    connection fails it with ssh's own words (a shared one's are in its master's log only), and so does
    restic's (whose processes a shared connection would not let outlive a daemon that died, for recovery
    to find). ``fs``: the scheduler's own ssh to the hypervisor."""
    settings = links.settings
    if server_of(datastore) is None:
        return ssh_command(settings.key, settings.known_hosts)
    known, shared = host.template.get("BACKUP_KNOWN_HOSTS"), ""
    if not known:
        lines = server_known_hosts(links, datastore)
        if is_local(host.template):
            known = str(settings.known_hosts)
        else:
            result = await runner.run(["sh", "-c", _INSTALL_KNOWN_HOSTS, "sh", known_hosts_file(datastore), SHARE_DIR],
                                      timeout=COMMAND_TIMEOUT, input=lines.encode())
            known, shared = (result.stdout.decode().splitlines() + ["", ""])[:2]
    key = host.template.get("BACKUP_SSH_KEY")
    share = (share and shared_upload_connection(datastore)
             and (host.template.get("BACKUP_SSH_SHARE") or "YES").strip().upper() != "NO")
    return ssh_command(key or settings.key, known, only_key=bool(key), share_dir=shared if share else "")
