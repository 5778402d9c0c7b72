"""Persistence: the SQLite store and the in-memory State written through it."""
