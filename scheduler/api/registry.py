"""The one method registry every API module adds to."""

from scheduler.api.rpc import Registry

registry = Registry()
