"""Who may do what (spec §10.3), as pure decisions.

Users of the ``oneadmin`` group (id 0) are administrators and may do anything. Everybody else sees and
changes only what they own: USE and MANAGE on their own objects. Operations OpenNebula lists in
VM_ADMIN_OPERATIONS (backup, backup-cancel, restore, recover, deploy) need ADMIN, which only
administrators have. Hosts are administrators' business. Datastores are visible to every user (they
are needed to schedule backups into) but only administrators change them, and their secrets are masked
for everybody else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from scheduler.errors import PermissionDenied
from scheduler.model.objects.common import Ownership
from scheduler.model.objects.user import ADMIN_GROUP, ownership


class Right(Enum):
    USE = "USE"
    MANAGE = "MANAGE"
    ADMIN = "ADMIN"


@dataclass(frozen=True)
class Caller:
    user_id: int
    name: str
    gid: int
    groups: frozenset[int]

    @property
    def ownership(self) -> Ownership:
        """The owner of what this caller creates."""
        return ownership(self.user_id, self.gid, self.name)

    @property
    def admin(self) -> bool:
        return ADMIN_GROUP in self.groups or self.gid == ADMIN_GROUP


def allowed(caller: Caller, owner_uid: int, right: Right) -> bool:
    if caller.admin:
        return True
    return right is not Right.ADMIN and owner_uid == caller.user_id


def require(caller: Caller, owner_uid: int, right: Right, what: str, obj_id: int, operation: str) -> None:
    if not allowed(caller, owner_uid, right):
        raise PermissionDenied(
            f"User [{caller.user_id}] : Not authorized to perform {right.value} {operation} on {what} [{obj_id}]."
        )


def require_admin(caller: Caller, operation: str) -> None:
    if not caller.admin:
        raise PermissionDenied(f"User [{caller.user_id}] : Not authorized to {operation}: administrators only.")


def visible(caller: Caller, owner_uid: int, pool_filter: int) -> bool:
    """OpenNebula pool filters: -2 all, -1 mine and my groups', -3 mine, >= 0 that user's."""
    if not caller.admin and owner_uid != caller.user_id:
        return False
    if pool_filter == -3:
        return owner_uid == caller.user_id
    if pool_filter >= 0:
        return owner_uid == pool_filter
    return True
