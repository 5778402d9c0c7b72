"""First contact with an SSH server: ``ACCEPT_HOSTKEY = "YES"`` in a host's or a backup datastore's
template records the key the server presents now in vmsched's known_hosts.

The attribute is a request, never stored; the object keeps the key's description (type and SHA256
fingerprint) in ``SSH_HOSTKEY_FINGERPRINT``. A server with another key recorded is refused: replacing a
key is an operator's decision (remove the old line first), never a side effect of accepting.
"""

from __future__ import annotations

import logging

from drivers import hostkeys
from drivers.commands import HostKeyMismatch
from drivers.sshtarget import SshTarget, host_pattern
from scheduler.api.context import Context
from scheduler.errors import ValidationError
from scheduler.hosts.monitor import REPLACE_HINT
from scheduler.model.template import Template

log = logging.getLogger(__name__)

ACCEPT_KEY = "ACCEPT_HOSTKEY"
FINGERPRINT_KEY = "SSH_HOSTKEY_FINGERPRINT"


def take_acceptance(template: Template) -> bool:
    """Remove ``ACCEPT_HOSTKEY`` from ``template``; True when it asked to accept the host key."""
    values = template.remove(ACCEPT_KEY)
    value = values[-1] if values else "NO"
    if not isinstance(value, str) or value.upper() not in ("YES", "NO", ""):
        raise ValidationError(f"{ACCEPT_KEY} must be YES or NO, got {value!r}; a changed host key is never "
                              "replaced by accepting: remove the old key from vmsched's known_hosts first")
    return value.upper() == "YES"


async def accept_server_key(ctx: Context, label: str, target: SshTarget) -> str:
    """Record the key ``target`` presents in vmsched's known_hosts; its description. ``label`` names the
    object in the log ("host kvm1", "datastore 100")."""
    known_hosts = ctx.links.settings.known_hosts if ctx.links is not None else \
        ctx.config.ssh.known_hosts_path(ctx.state_dir)
    key = await hostkeys.fetch_host_key(target.host, target.port, timeout=ctx.config.ssh.connect_timeout)
    try:
        added = hostkeys.accept_host_key(known_hosts, target.host, target.port, key)
    except HostKeyMismatch as exc:
        pattern = host_pattern(target.host, target.port)
        raise HostKeyMismatch(f"{exc}; {REPLACE_HINT.format(pattern=repr(pattern), known_hosts=known_hosts)}",
                              host=target.host, fingerprint=exc.fingerprint) from None
    described = hostkeys.describe(key)
    log.info("%s: %s host key %s of %s", label, "accepted" if added else "already trusted", described, target)
    return described
