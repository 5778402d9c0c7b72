"""one.system.*: what this server is."""

from __future__ import annotations

from scheduler.api.context import Context
from scheduler.api.permissions import Caller
from scheduler.api.registry import registry

# The OpenNebula API level vmsched implements; clients such as pyone compare against it.
API_VERSION = "7.0.0"


@registry.method("one.system.version")
async def version(ctx: Context, caller: Caller) -> str:
    return API_VERSION
