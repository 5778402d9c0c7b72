"""one.user.* and one.userpool.info: accounts with salted password hashes."""

from __future__ import annotations

from scheduler.api.auth import hash_password
from scheduler.api.common import xml_string
from scheduler.api.context import Context
from scheduler.api.permissions import Caller, require_admin
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.errors import PermissionDenied, ValidationError
from scheduler.model.objects import pool_element
from scheduler.model.objects.common import check_name
from scheduler.model.objects.user import GROUP_NAMES, USERS_GROUP, User

KIND = "user"
MIN_PASSWORD = 1
MAX_PASSWORD = 1024


def check_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ValidationError(f"password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    if any(ord(ch) < 32 for ch in password):
        raise ValidationError("password contains control characters")
    return password


def new_user(user_id: int, name: str, password: str, groups: list[int]) -> User:
    gid = groups[0] if groups else USERS_GROUP
    return User(
        id=user_id,
        name=name,
        gid=gid,
        gname=GROUP_NAMES[gid],
        groups=sorted(set(groups) | {gid}),
        password=hash_password(password),
    )


@registry.method("one.user.allocate", Param("name", str), Param("password", str), Param("driver", str, "core"),
                 Param("group_ids", list, []))
async def allocate(ctx: Context, caller: Caller, name: str, password: str, driver: str, group_ids: list[int]) -> int:
    require_admin(caller, "create users")
    name = check_name(name, "user")
    if ":" in name or " " in name:
        raise ValidationError("user name cannot contain ':' or spaces")
    if driver not in ("", "core"):
        raise ValidationError(f"auth driver {driver!r} is not supported; only core")
    for gid in group_ids:
        if not isinstance(gid, int) or gid not in GROUP_NAMES:
            raise ValidationError(f"group {gid!r} does not exist (groups: 0 oneadmin, 1 users)")
    check_password(password)
    async with ctx.state.mutation() as m:
        taken = next((u for u in ctx.state.users.all() if u.name == name), None)
        if taken is not None:
            raise ValidationError(f"NAME is already taken by USER {taken.id}.")
        user = new_user(await m.new_id(KIND), name, password, list(group_ids))
        m.put(KIND, user)
    return user.id


def _self_or_admin(caller: Caller, user_id: int, operation: str) -> int:
    target = caller.user_id if user_id == -1 else user_id
    if target != caller.user_id and not caller.admin:
        raise PermissionDenied(f"User [{caller.user_id}] : Not authorized to {operation} USER [{target}].")
    return target


@registry.method("one.user.info", Param("id", int, -1), Param("decrypt", bool, False))
async def info(ctx: Context, caller: Caller, user_id: int, decrypt: bool) -> str:
    target = _self_or_admin(caller, user_id, "see")
    return ctx.state.users.get(target).to_xml(show_secrets=False)


@registry.method("one.user.passwd", Param("id", int), Param("password", str))
async def passwd(ctx: Context, caller: Caller, user_id: int, password: str) -> int:
    target = _self_or_admin(caller, user_id, "change the password of")
    check_password(password)
    async with ctx.state.mutation() as m:
        user = ctx.state.users.editable(target)
        user.password = hash_password(password)
        m.put(KIND, user)
    return target


@registry.method("one.userpool.info")
async def pool_info(ctx: Context, caller: Caller) -> str:
    users = [u for u in ctx.state.users.all() if caller.admin or u.id == caller.user_id]
    return xml_string(pool_element(KIND, users, show_secrets=False))
