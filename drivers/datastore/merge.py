"""Merging the links of an increment chain where they are stored (pure): the qemu-img spec that opens a
chain of qcow2 files without touching them, and the convert that writes it out as one self-contained file.

Each link ``disk.<id>.<n>`` names its predecessor by a bare file name that is not beside it on the datastore
(every link is its own backup). Rebasing the stored files would change them and their recorded sha256, so
the chain is given to qemu-img explicitly: a ``json:`` spec of nested ``backing`` nodes, the newest link on
top and the base's backing set to null.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from scheduler.errors import ValidationError


def chain_spec(paths: Sequence[str]) -> str:
    """The ``json:`` filename of the chain ``paths`` (base first): each file's backing is the one before."""
    if not paths:
        raise ValidationError("a chain needs at least one file")
    node: Any = None
    for path in paths:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": node}
    return "json:" + json.dumps(node, separators=(",", ":"))


def convert_argv(paths: Sequence[str], output: str) -> list[str]:
    """``qemu-img convert`` of the chain ``paths`` (base first) into the new qcow2 ``output``, sparse."""
    return ["qemu-img", "convert", "-q", "-O", "qcow2", chain_spec(paths), output]
