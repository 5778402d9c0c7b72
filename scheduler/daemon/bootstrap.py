"""First start: create ``oneadmin`` with a random password kept in a 0600 file of the state dir."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from scheduler.api.auth import random_password
from scheduler.api.users import new_user
from scheduler.engine.clock import Clock
from scheduler.model.objects.user import ADMIN_GROUP
from scheduler.store.state import State

log = logging.getLogger(__name__)

AUTH_FILE = "one_auth"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (never a moment with wider permissions)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


async def ensure_admin(state: State, state_dir: Path, clock: Clock) -> None:
    if state.pools["user"]:
        return
    password = random_password()
    auth_file = state_dir / AUTH_FILE
    # The file first: if we die between the two steps, the next start simply tries again.
    write_private(auth_file, f"oneadmin:{password}\n")
    async with state.mutation() as m:
        user_id = await m.new_id("user")
        m.put("user", new_user(user_id, "oneadmin", password, [ADMIN_GROUP]))
    log.warning("created user oneadmin (id %s); its credentials are in %s", user_id, auth_file)
