"""Errors of the real test environment: one it cannot create here at all, and any other failure."""

from __future__ import annotations


class RealEnvError(Exception):
    """Setting up, checking or stopping the real test environment failed."""


class EnvUnavailable(RealEnvError):
    """The environment cannot be created on this machine at all (not root, no apt-get, missing tools)."""
