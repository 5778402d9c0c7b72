"""Every XML-RPC method of the API, registered on ``registry``: importing this module registers them.

Kept apart from the package so that importing one API module (``rpc``, ``permissions``) does not
import every handler and, through them, the backup and restore layers.
"""

from __future__ import annotations

from scheduler.api import backup, datastores, hosts, images, imports, restore, schedactions, system, templates, users, verify, vms  # noqa: F401  isort: skip
from scheduler.api.context import Context, make_authenticator
from scheduler.api.registry import registry

__all__ = ["Context", "make_authenticator", "registry"]
