"""What every API handler gets: the objects, the configuration, the clock; and authentication."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.api.auth import SessionCache, split_session, verify_password
from scheduler.api.permissions import Caller
from scheduler.api.render import XmlCache
from scheduler.config import Config
from scheduler.engine.clock import Clock
from scheduler.errors import ActionError, AuthError
from scheduler.hosts.links import HostLinks
from scheduler.model.objects.user import User
from scheduler.store.state import State

log = logging.getLogger(__name__)


@dataclass
class Context:
    state: State
    config: Config
    clock: Clock
    state_dir: Path
    engine: Any = None  # scheduler.engine.loop.Engine once the daemon runs one
    links: HostLinks | None = None  # runners and libvirt connections per host
    progress: Any = None  # scheduler.engine.progress.ProgressBoard: how far the running backups are
    xml: XmlCache = field(default_factory=XmlCache)

    def __post_init__(self) -> None:
        self.state.listeners.append(self.xml.forget)

    def now(self) -> int:
        return int(self.clock.now())

    def connections(self, refused: str) -> HostLinks:
        """The host connections; a daemon built without them (tests of the API alone) refuses with ``refused``."""
        if self.links is None:
            raise ActionError(f"this daemon has no host connections; {refused}")
        return self.links


def make_authenticator(ctx: Context, sessions: SessionCache) -> Callable[[Any], Awaitable[Caller]]:
    async def authenticate(session: Any) -> Caller:
        name, password = split_session(session)
        user = _user_named(ctx.state, name)
        cached = sessions.lookup(session) if user is not None else None
        if user is None or not user.enabled:
            raise AuthError("[one.auth] User couldn't be authenticated, aborting call.")
        if cached != user.id:
            if not verify_password(password, user.password):
                log.warning("failed login for user %s", name)
                raise AuthError("[one.auth] User couldn't be authenticated, aborting call.")
            sessions.remember(session, user.id)
        return Caller(user.id, user.name, user.gid, frozenset([user.gid, *user.groups]))

    ctx.state.listeners.append(lambda kind, obj_id, obj: sessions.forget_user(obj_id) if kind == "user" else None)
    return authenticate


def _user_named(state: State, name: str) -> User | None:
    for user in state.users.all():
        if user.name == name:
            return user
    return None
