"""The one method registry every API module adds to."""

from scheduler.rpc import Registry

registry = Registry()
