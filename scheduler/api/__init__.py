"""The XML-RPC API: OpenNebula method names, argument order and reply convention.

Each module registers the methods of one kind of object on ``registry``. Handlers take
``(ctx, caller, *args)``; they read objects from ``ctx.state`` and change them only inside
``ctx.state.mutation()``.
"""

from __future__ import annotations

from scheduler.api.context import Context, build_codecs, make_authenticator
from scheduler.api.registry import registry

# Importing the modules registers their methods.
from scheduler.api import backup, datastores, hosts, images, imports, restore, schedactions, system, templates, users, verify, vms  # noqa: F401  isort: skip

__all__ = ["Context", "build_codecs", "make_authenticator", "registry"]
