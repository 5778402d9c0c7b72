"""Validate vmsched's XML against OpenNebula's 7.0 schemas (read from the shared reference folder).

OpenNebula's replies carry no namespace while the schemas declare one, so ``validate`` puts every
element of a copy into the schemas' namespace first. The schemas need XSD 1.1 (``xmlschema``'s
``XMLSchema11``): several break XSD 1.0's unique particle attribution rule.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import xmlschema
from lxml import etree

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "shared/reference/opennebula-7.0-xsd"
NAMESPACE = "http://opennebula.org/XMLSchema"


def require_schemas() -> None:
    """Skip the calling test when the schema folder is not there."""
    if not (SCHEMA_DIR / "vm.xsd").is_file():
        pytest.skip(f"OpenNebula 7.0 XSDs not found in {SCHEMA_DIR} (the shared reference folder is absent)")


@functools.cache
def compiled(schema: str) -> xmlschema.XMLSchema11:
    return xmlschema.XMLSchema11(str(SCHEMA_DIR / f"{schema}.xsd"))


def namespaced(xml: str | bytes | etree._Element) -> etree._Element:
    """A copy of the document with every element in OpenNebula's schema namespace."""
    if isinstance(xml, etree._Element):
        root = etree.fromstring(etree.tostring(xml))
    else:
        root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    for element in root.iter():
        if isinstance(element.tag, str):
            element.tag = f"{{{NAMESPACE}}}{etree.QName(element).localname}"
    etree.cleanup_namespaces(root)
    return root


def validate(xml: str | bytes | etree._Element, schema: str) -> None:
    """Raise AssertionError naming the schema, the failing path and the reason."""
    require_schemas()
    errors = list(compiled(schema).iter_errors(namespaced(xml)))
    if errors:
        lines = [f"{_plain(error.path)}: {error.reason}" for error in errors[:5]]
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise AssertionError(f"not valid against {schema}.xsd:\n  " + "\n  ".join(lines) + more)


def _plain(path: str | None) -> str:
    return (path or "/").replace(f"{{{NAMESPACE}}}", "")
