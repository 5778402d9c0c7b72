"""The OpenNebula template language: parse and render, text and XML (spec §1).

A template is a multimap of top-level attributes. Each attribute is either a single value (a
string) or a vector (a map of sub-attribute names to strings). Names are upper-cased; top-level
names that could not be XML element names get the ``ONE_`` prefix; inside a vector the first of
two equal keys wins and keys render in alphabetical order; top-level attributes render grouped and
sorted by name, keeping insertion order within a name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from lxml import etree

from scheduler.errors import TemplateError

CDATA_GUARD = "]]>"
_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
_WORD_STOP = frozenset("=#,[] \t\r\n")
# Characters XML 1.0 cannot carry: a value holding one could never be stored or sent.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class Vector:
    """A vector attribute: sub-attribute names (upper-case) to string values."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, str] | Iterable[tuple[str, str]] | None = None) -> None:
        self._values: dict[str, str] = {}
        items = values.items() if isinstance(values, dict) else (values or ())
        for key, value in items:
            self.setdefault(key, value)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._values.get(key.upper(), default)

    def __getitem__(self, key: str) -> str:
        return self._values[key.upper()]

    def __setitem__(self, key: str, value: str) -> None:
        self._values[key.upper()] = str(value)

    def __delitem__(self, key: str) -> None:
        del self._values[key.upper()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.upper() in self._values

    def __len__(self) -> int:
        return len(self._values)

    def setdefault(self, key: str, value: str) -> str:
        """First wins, as in OpenNebula's sorted map of vector pairs."""
        return self._values.setdefault(key.upper(), str(value))

    def pop(self, key: str, default: str | None = None) -> str | None:
        return self._values.pop(key.upper(), default)

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._values.items())

    def keys(self) -> list[str]:
        return sorted(self._values)

    def copy(self) -> Vector:
        return Vector(dict(self._values))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vector) and self._values == other._values

    def __hash__(self) -> int:  # pragma: no cover - vectors are mutable
        raise TypeError("Vector is unhashable")

    def __repr__(self) -> str:
        return f"Vector({dict(self.items())!r})"


Value = str | Vector


def top_level_name(name: str) -> str:
    """Upper-case a top-level name and apply the ``ONE_`` prefix rule."""
    upper = name.upper()
    if not (upper[:1].isalpha() or upper[:1] == "_") or upper.startswith("XML"):
        return "ONE_" + upper
    return upper


@dataclass
class Template:
    """An ordered multimap of attributes, equal when equal as OpenNebula would store them."""

    attributes: list[tuple[str, Value]] = field(default_factory=list)

    # -- reading ---------------------------------------------------------------------------------
    def get(self, name: str, default: str | None = None) -> str | None:
        """The first single value called ``name``."""
        for key, value in self._named(name):
            if isinstance(value, str):
                return value
        return default

    def get_vector(self, name: str) -> Vector | None:
        for _, value in self._named(name):
            if isinstance(value, Vector):
                return value
        return None

    def vectors(self, name: str) -> list[Vector]:
        return [v for _, v in self._named(name) if isinstance(v, Vector)]

    def values(self, name: str) -> list[Value]:
        return [v for _, v in self._named(name)]

    def names(self) -> list[str]:
        return sorted({k for k, _ in self.attributes})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(True for _ in self._named(name))

    def __iter__(self) -> Iterator[tuple[str, Value]]:
        return iter(self.sorted_attributes())

    def __len__(self) -> int:
        return len(self.attributes)

    def _named(self, name: str) -> Iterator[tuple[str, Value]]:
        wanted = top_level_name(name)
        return ((k, v) for k, v in self.attributes if k == wanted)

    # -- writing ---------------------------------------------------------------------------------
    def add(self, name: str, value: Value | int) -> None:
        self.attributes.append((top_level_name(name), value if isinstance(value, Vector) else str(value)))

    def set(self, name: str, value: Value | int) -> None:
        """Replace every attribute called ``name`` by one value."""
        self.remove(name)
        self.add(name, value)

    def remove(self, name: str) -> list[Value]:
        wanted = top_level_name(name)
        removed = [v for k, v in self.attributes if k == wanted]
        self.attributes = [(k, v) for k, v in self.attributes if k != wanted]
        return removed

    def merge(self, other: Template) -> None:
        """OpenNebula's merge: attributes of ``other`` replace those of the same name."""
        for name in other.names():
            self.remove(name)
        for name, value in other.sorted_attributes():
            self.attributes.append((name, value))

    def copy(self) -> Template:
        return Template([(k, v.copy() if isinstance(v, Vector) else v) for k, v in self.attributes])

    def sorted_attributes(self) -> list[tuple[str, Value]]:
        """Grouped by name, names sorted, insertion order kept within a name."""
        return sorted(self.attributes, key=lambda item: item[0])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and self.sorted_attributes() == other.sorted_attributes()

    # -- forms -----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, source: str = "<template>") -> Template:
        """Text or XML (a string whose first non-blank character is ``<``)."""
        if text.lstrip().startswith("<"):
            return from_xml(text, source)
        return _Parser(text, source).parse()

    @classmethod
    def parse_text_with_lines(cls, text: str, source: str = "<template>") -> tuple[Template, list[int]]:
        """Text form only; also returns the line number of each attribute (for config errors)."""
        parser = _Parser(text, source)
        template = parser.parse()
        return template, parser.lines

    def render(self) -> str:
        return render_text(self)

    def to_xml(self, root: str = "TEMPLATE") -> etree._Element:
        return to_xml(self, root)

    def to_xml_string(self, root: str = "TEMPLATE") -> str:
        return etree.tostring(self.to_xml(root), encoding="unicode")


# ---- text form ----------------------------------------------------------------------------------


def quote(value: str) -> str:
    return '"' + value.replace('"', '\\"') + '"'


def render_text(template: Template) -> str:
    lines = []
    for name, value in template.sorted_attributes():
        if isinstance(value, Vector):
            if not len(value):
                lines.append(f"{name}=[ ]")
                continue
            pairs = ",\n".join(f"  {k}={quote(v)}" for k, v in value.items())
            lines.append(f"{name}=[\n{pairs} ]")
        else:
            lines.append(f"{name}={quote(value)}")
    return "\n".join(lines) + ("\n" if lines else "")


class _Parser:
    """A hand-written scanner for the grammar of spec §1.2, tracking line and column."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.lines: list[int] = []  # the line of each top-level attribute, in order

    # position helpers
    def _where(self, pos: int) -> tuple[int, int]:
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return line, col

    def _fail(self, message: str, pos: int | None = None) -> TemplateError:
        line, col = self._where(self.pos if pos is None else pos)
        return TemplateError(message, source=self.source, line=line, column=col)

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _skip_blanks(self) -> None:
        while self._peek() in (" ", "\t", "\r") and self._peek():
            self.pos += 1

    def _skip_space_and_comments(self) -> None:
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch in " \t\r\n":
                self.pos += 1
            elif ch == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def _name(self) -> str:
        match = _NAME_RE.match(self.text, self.pos)
        if not match:
            ch = self._peek()
            raise self._fail(f"expected an attribute name, found {ch!r}" if ch else "expected an attribute name")
        self.pos = match.end()
        return match.group().upper()

    def _expect_equals(self, name: str) -> None:
        self._skip_blanks()
        if self._peek() != "=":
            found = self._peek()
            raise self._fail(f"expected '=' after {name}, found {found!r}" if found else f"expected '=' after {name}")
        self.pos += 1
        self._skip_blanks()

    def parse(self) -> Template:
        template = Template()
        while True:
            self._skip_space_and_comments()
            if self.pos >= len(self.text):
                return template
            self.lines.append(self._where(self.pos)[0])
            name = top_level_name(self._name())
            self._expect_equals(name)
            ch = self._peek()
            if ch == "[":
                self.pos += 1
                template.attributes.append((name, self._vector(name)))
            elif ch in ("\n", "", "#"):
                template.attributes.append((name, ""))
            else:
                template.attributes.append((name, self._value(name)))
            self._end_of_attribute()

    def _end_of_attribute(self) -> None:
        self._skip_blanks()
        ch = self._peek()
        if ch not in ("\n", "", "#"):
            raise self._fail(f"unexpected {ch!r} after value")

    def _value(self, name: str) -> str:
        start = self.pos
        if self._peek() == '"':
            value = self._quoted()
        else:
            while self._peek() and self._peek() not in _WORD_STOP:
                self.pos += 1
            value = self.text[start : self.pos]
            if not value:
                raise self._fail(f"expected a value for {name}, found {self._peek()!r}")
        if CDATA_GUARD in value:
            raise self._fail(f"value of {name} contains the forbidden sequence ']]>'", start)
        bad = _NOT_XML.search(value)
        if bad:
            raise self._fail(f"value of {name} contains the control character {bad.group()!r}", start)
        return value

    def _quoted(self) -> str:
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            end = self.text.find('"', self.pos)
            if end < 0:
                raise self._fail("unterminated quoted value", start)
            chunk = self.text[self.pos : end]
            if chunk.endswith("\\"):
                out.append(chunk[:-1] + '"')
                self.pos = end + 1
                continue
            out.append(chunk)
            self.pos = end + 1
            return "".join(out)

    def _vector(self, name: str) -> Vector:
        vector = Vector()
        self._skip_inside()
        if self._peek() == "]":
            self.pos += 1
            return vector
        while True:
            key = self._name()
            self._expect_equals(f"{name}/{key}")
            if self._peek() in ("\n", ",", "]", ""):
                raise self._fail(f"expected a value for {name}/{key} (write \"\" for an empty one)")
            vector.setdefault(key, self._value(f"{name}/{key}"))
            self._skip_inside()
            ch = self._peek()
            if ch == ",":
                self.pos += 1
                self._skip_inside()
            elif ch == "]":
                self.pos += 1
                return vector
            elif not ch:
                raise self._fail(f"vector {name} is not closed with ']'")
            else:
                raise self._fail(f"expected ',' or ']' in vector {name}, found {ch!r}")

    def _skip_inside(self) -> None:
        while self._peek() in (" ", "\t", "\r", "\n") and self._peek():
            self.pos += 1


# ---- XML form -----------------------------------------------------------------------------------

_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, strip_cdata=True)


def from_xml(text: str | bytes, source: str = "<template>") -> Template:
    try:
        root = etree.fromstring(text.encode() if isinstance(text, str) else text, _XML_PARSER)
    except etree.XMLSyntaxError as exc:
        line, column = exc.position if exc.position else (0, 0)
        raise TemplateError(f"malformed XML: {exc.msg}", source=source, line=line, column=column) from None
    return from_element(root)


def from_element(root: etree._Element) -> Template:
    template = Template()
    for child in root:
        if not isinstance(child.tag, str):
            continue
        name = top_level_name(child.tag)
        elements = [c for c in child if isinstance(c.tag, str)]
        if elements:
            template.attributes.append((name, Vector((c.tag.upper(), c.text or "") for c in elements)))
        else:
            template.attributes.append((name, child.text or ""))
    return template


def to_xml(template: Template, root: str = "TEMPLATE") -> etree._Element:
    element = etree.Element(root)
    append_attributes(element, template.sorted_attributes())
    return element


def append_attributes(parent: etree._Element, attributes: Iterable[tuple[str, Value]]) -> None:
    for name, value in attributes:
        child = etree.SubElement(parent, name)
        if isinstance(value, Vector):
            for key, sub in value.items():
                etree.SubElement(child, key).text = sub
        else:
            child.text = value
