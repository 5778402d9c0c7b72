"""The OpenNebula template language: parse and render, text and XML (spec §1).

A template is a multimap of top-level attributes. Each attribute is either a single value (a
string) or a vector (a map of sub-attribute names to strings). Names are upper-cased; top-level
names that could not be XML element names get the ``ONE_`` prefix; inside a vector the first of
two equal keys wins and keys render in alphabetical order; top-level attributes render grouped and
sorted by name, keeping insertion order within a name.

Text form, as OpenNebula's lexer reads it: blanks and newlines between tokens are ignored (so
``CPU=1 MEMORY=512`` on one line is two attributes), ``#`` outside a value starts a comment (also
between the pairs of a vector), a quoted value may span lines, and ``\\"`` is the only escape (in
quoted values and bare words alike, as in OpenNebula's grammar).

Where vmsched is stricter than OpenNebula, on purpose:

* a ``"`` that opens a value must be closed (OpenNebula silently reads ``A="abc`` as the word
  ``"abc``);
* a vector key must be an XML name (start with a letter or ``_``): OpenNebula accepts ``[1A=x]`` and
  then writes XML nobody can read;
* no value may hold ``]]>`` or a character XML 1.0 cannot carry, whichever form it comes in;
* the XML form accepts no DOCTYPE (so no entity is ever expanded), only element names made of
  letters, digits and ``_``, and two levels of nesting (attribute, then vector pair): anything
  deeper is rejected rather than flattened, since OpenNebula would drop it silently.

A value ending in a backslash has no quoted text form (``"C:\\"`` reads as an escaped quote).
``render`` writes such a value as a bare word when it is one (``PATH=C:\\``, which reads back
unchanged) and raises ``TemplateError`` otherwise; the XML form carries every value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import cast

from lxml import etree

from scheduler.errors import TemplateError

CDATA_GUARD = "]]>"
_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
_NAME_FULL = re.compile(r"[A-Za-z0-9_]+\Z")
_KEY_FULL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BARE_WORD = re.compile(r'[^=#,\[\] \t\r\n"]+\Z')
# Characters XML 1.0 cannot carry: a value holding one could never be stored or sent.
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class Vector:
    """A vector attribute: sub-attribute names (upper-case) to string values."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, str] | Iterable[tuple[str, str]] | None = None) -> None:
        self._values: dict[str, str] = {}
        items = values.items() if isinstance(values, dict) else (values or ())
        for key, value in items:
            self.setdefault(key, value)

    @classmethod
    def _trusted(cls, values: dict[str, str]) -> Vector:
        """A vector from keys and values the parsers have already checked."""
        vector = cls.__new__(cls)
        vector._values = values
        return vector

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._values.get(key.upper(), default)

    def __getitem__(self, key: str) -> str:
        return self._values[key.upper()]

    def __setitem__(self, key: str, value: str) -> None:
        self._values[_checked_key(key)] = _checked_value(str(value), key)

    def __delitem__(self, key: str) -> None:
        del self._values[key.upper()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.upper() in self._values

    def __len__(self) -> int:
        return len(self._values)

    def setdefault(self, key: str, value: str) -> str:
        """First wins, as in OpenNebula's sorted map of vector pairs."""
        upper = _checked_key(key)
        if upper not in self._values:
            self._values[upper] = _checked_value(str(value), key)
        return self._values[upper]

    def pop(self, key: str, default: str | None = None) -> str | None:
        return self._values.pop(key.upper(), default)

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._values.items())

    def keys(self) -> list[str]:
        return sorted(self._values)

    def copy(self) -> Vector:
        return Vector._trusted(dict(self._values))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vector) and self._values == other._values

    def __hash__(self) -> int:  # pragma: no cover - vectors are mutable
        raise TypeError("Vector is unhashable")

    def __repr__(self) -> str:
        return f"Vector({dict(self.items())!r})"


Value = str | Vector


@lru_cache(maxsize=4096)
def top_level_name(name: str) -> str:
    """Upper-case a top-level name and apply the ``ONE_`` prefix rule."""
    upper = name.upper()
    if not (upper[:1].isalpha() or upper[:1] == "_") or upper.startswith("XML"):
        return "ONE_" + upper
    return upper


def _checked_key(key: str) -> str:
    if not _KEY_FULL.match(key):
        raise TemplateError(f"invalid sub-attribute name {key!r}: use letters, digits and '_', not first a digit")
    return key.upper()


def _checked_value(value: str, name: str) -> str:
    problem = _value_problem(value)
    if problem:
        raise TemplateError(f"value of {name.upper()} {problem}")
    return value


def _value_problem(value: str) -> str | None:
    """Why no template may hold ``value`` (spec §1.1 guard, XML 1.0 characters), or None."""
    if CDATA_GUARD in value:
        return "contains the forbidden sequence ']]>'"
    bad = NOT_XML.search(value)
    if bad:
        return f"contains the control character U+{ord(bad.group()):04X}"
    return None


@dataclass
class Template:
    """An ordered multimap of attributes, equal when equal as OpenNebula would store them."""

    attributes: list[tuple[str, Value]] = field(default_factory=list)

    # -- reading ---------------------------------------------------------------------------------
    def get(self, name: str, default: str | None = None) -> str | None:
        """The first single value called ``name``."""
        for _, value in self._named(name):
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
        """Append an attribute; a bad name or a value no template can hold raises TemplateError."""
        if not _NAME_FULL.match(name):
            raise TemplateError(f"invalid attribute name {name!r}: use letters, digits and '_'")
        key = top_level_name(name)
        self.attributes.append((key, value if isinstance(value, Vector) else _checked_value(str(value), key)))

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
        return sorted(self.attributes, key=_attribute_name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and self.sorted_attributes() == other.sorted_attributes()

    # -- forms -----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | bytes, source: str = "<template>") -> Template:
        """Text or XML (a string whose first non-blank character is ``<``); bytes are UTF-8."""
        if isinstance(text, bytes):
            if _XML_START_BYTES.match(text):
                return from_xml(text, source)
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TemplateError(f"not UTF-8 text (byte {exc.start})", source=source) from None
        if _XML_START.match(text):
            return from_xml(text, source)
        return _Parser(text, source).parse()

    @classmethod
    def parse_text_with_lines(cls, text: str, source: str = "<template>") -> tuple[Template, list[int]]:
        """Text form only; also returns the line number of each attribute (for config errors)."""
        parser = _Parser(text, source)
        template = parser.parse()
        return template, parser.lines()

    def render(self) -> str:
        return render_text(self)

    def to_xml(self, root: str = "TEMPLATE") -> etree._Element:
        return to_xml(self, root)

    def to_xml_string(self, root: str = "TEMPLATE") -> str:
        return etree.tostring(self.to_xml(root), encoding="unicode")


def _attribute_name(item: tuple[str, Value]) -> str:
    return item[0]


_XML_START = re.compile(r"[ \t\r\n]*<")
_XML_START_BYTES = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*<")


# ---- text form: rendering ------------------------------------------------------------------------


def quote(value: str) -> str:
    """``value`` in double quotes with ``"`` escaped (cannot carry a value ending in a backslash)."""
    return '"' + value.replace('"', '\\"') + '"'


def render_text(template: Template) -> str:
    """The CLI's text form (spec §1.4), which ``Template.parse`` reads back to an equal template."""
    lines = []
    for name, value in template.sorted_attributes():
        if isinstance(value, Vector):
            if not value._values:
                lines.append(name + "=[ ]")
                continue
            pairs = ",\n".join(
                [f'  {k}="{v.replace(_Q, _EQ)}"' if v[-1:] != "\\" else f"  {k}={_text_value(v, name, k)}"
                 for k, v in sorted(value._values.items())]
            )
            lines.append(f"{name}=[\n{pairs} ]")
        else:
            lines.append(f"{name}={_text_value(value, name)}")
    if not lines:
        return ""
    text = "\n".join(lines) + "\n"
    if CDATA_GUARD in text or NOT_XML.search(text):
        _raise_unwritable(template)
    return text


_Q, _EQ = '"', '\\"'


def _text_value(value: str, name: str, key: str = "") -> str:
    if not value.endswith("\\"):
        return '"' + value.replace('"', '\\"') + '"'
    if _BARE_WORD.match(value):
        return value
    where = f"{name}/{key}" if key else name
    raise TemplateError(
        f"value of {where} ends with a backslash and is not a bare word: the text form cannot carry it (use XML)"
    )


def _raise_unwritable(template: Template) -> None:
    for name, value in template.attributes:
        pairs = value.items() if isinstance(value, Vector) else [("", value)]
        for key, sub in pairs:
            problem = _value_problem(sub)
            if problem:
                raise TemplateError(f"value of {name}/{key} {problem}" if key else f"value of {name} {problem}")


# ---- text form: parsing -------------------------------------------------------------------------

# Blanks, newlines and comments between tokens (possessive: a long run never backtracks).
_S = r"(?:[ \t\r\n]++|#[^\n]*+)*+"
_SKIP = re.compile(_S)
_BLANKS = re.compile(r"[ \t\r]*+")
# A quoted value: anything but '"', where '\"' does not close it. A bare word: no blank, newline,
# '=', '#', ',', '[' or ']', and not opening with '"' (that is an unterminated quoted value).
_QUOTED_BODY = r'(?:[^"\\]++|\\"?)*+'
_WORD_BODY = r'[^=#,\[\] \t\r\n"][^=#,\[\] \t\r\n]*+'
_QUOTED = '"(' + _QUOTED_BODY + ')"'
_WORD = "(" + _WORD_BODY + ")"
_EQUALS = r"[ \t\r]*+=[ \t\r]*+"
_PAIR_BARE = r"[A-Za-z_][A-Za-z0-9_]*+" + _EQUALS + '(?:"' + _QUOTED_BODY + '"|' + _WORD_BODY + ")"
# The common path: one match reads a whole attribute, vectors included (their pairs are then
# picked out of the matched span). Whatever it does not match goes through the step-by-step reader
# below, which reads the same language and says exactly what is wrong.
_TOP = re.compile(
    _S + r"([A-Za-z0-9_]++)" + _EQUALS + "(?:" + _QUOTED + "|" + _WORD
    + r"|(\[)" + _S + r"(?:\]|(" + _PAIR_BARE + "(?:" + _S + "," + _S + _PAIR_BARE + r")*+)" + _S + r"\])"
    + r"|(?=[\n#]|\Z))"
)
_PAIR_FIND = re.compile(
    "(?:" + _S + "," + _S + r")?([A-Za-z_][A-Za-z0-9_]*+)" + _EQUALS + "(?:" + _QUOTED + "|" + _WORD + ")"
)
_OPEN_VECTOR = re.compile(r"\[" + _S + r"(\]?)")


def _past(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """Where ``pattern``, which also matches the empty string, ends when matched at ``pos``."""
    match = pattern.match(text, pos)
    assert match is not None
    return match.end()


def _describe(ch: str) -> str:
    if not ch:
        return "end of text"
    return "end of line" if ch == "\n" else repr(ch)


def _unescape(raw: str) -> str:
    return raw.replace('\\"', '"') if "\\" in raw else raw


def _matched_pairs(text: str, start: int, end: int) -> dict[str, str]:
    """The pairs of a vector span ``_TOP`` has matched; the first of two equal keys wins."""
    pairs = reversed(_PAIR_FIND.findall(text, start, end))  # reversed: the first of equal keys lands last
    if text.find("\\", start, end) < 0:
        return {key.upper(): word or raw for key, raw, word in pairs}
    return {key.upper(): _unescape(word or raw) for key, raw, word in pairs}


class _Parser:
    """Reads the grammar of spec §1.2; positions become line:column only when something is wrong."""

    def __init__(self, text: str, source: str, careful: bool = False) -> None:
        self.text = text
        self.source = source
        self.starts: list[int] = []  # offset of each top-level attribute, in order
        # Values need checking only when the text holds a suspect character at all; the careful
        # reader checks each one and points at the culprit.
        self.careful = careful or CDATA_GUARD in text or NOT_XML.search(text) is not None

    def lines(self) -> list[int]:
        line, previous, out = 1, 0, []
        for start in self.starts:
            line += self.text.count("\n", previous, start)
            previous = start
            out.append(line)
        return out

    def _where(self, pos: int) -> tuple[int, int]:
        line = self.text.count("\n", 0, pos) + 1
        return line, pos - (self.text.rfind("\n", 0, pos) + 1) + 1

    def _fail(self, message: str, pos: int) -> TemplateError:
        line, col = self._where(pos)
        return TemplateError(message, source=self.source, line=line, column=col)

    def _peek(self, pos: int) -> str:
        return self.text[pos : pos + 1]

    def parse(self) -> Template:
        text, end, careful = self.text, len(self.text), self.careful
        attributes: list[tuple[str, Value]] = []
        pos = 0
        while True:
            match = None if careful else _TOP.match(text, pos)
            if match is None:
                pos = _past(_SKIP, text, pos)
                if pos >= end:
                    return Template(attributes)
                self.starts.append(pos)
                name, value, pos = self._attribute(pos)
            else:
                self.starts.append(match.start(1))
                name = top_level_name(match.group(1))
                raw, word, bracket = match.group(2, 3, 4)
                if raw is not None:
                    value = _unescape(raw)
                elif word is not None:
                    value = _unescape(word)
                elif bracket:
                    body = match.span(5)
                    value = Vector._trusted(_matched_pairs(text, *body) if body[0] >= 0 else {})
                else:
                    value = ""
                pos = match.end()
            attributes.append((name, value))

    def _check(self, raw: str, name: str, start: int) -> None:
        """Reject a value holding ``]]>`` or a non-XML character, pointing at the culprit."""
        guard = raw.find(CDATA_GUARD)
        if guard >= 0:
            raise self._fail(f"value of {name} contains the forbidden sequence ']]>'", start + guard)
        bad = NOT_XML.search(raw)
        if bad:
            raise self._fail(f"value of {name} contains the control character U+{ord(bad.group()):04X}", start + bad.start())

    # -- the step-by-step reader: exact messages for every malformed input -----------------------
    def _attribute(self, pos: int) -> tuple[str, Value, int]:
        match = _NAME_RE.match(self.text, pos)
        if not match:
            raise self._fail(f"expected an attribute name, found {_describe(self._peek(pos))}", pos)
        name = top_level_name(match.group())
        pos = self._equals(name, match.end())
        ch = self._peek(pos)
        if ch == "[":
            return (name, *self._vector(name, pos))
        if ch in ("\n", "#", ""):
            return name, "", pos
        value, pos = self._value(name, pos)
        return name, value, pos

    def _equals(self, name: str, pos: int) -> int:
        pos = _past(_BLANKS, self.text, pos)
        if self._peek(pos) != "=":
            raise self._fail(f"expected '=' after {name}, found {_describe(self._peek(pos))}", pos)
        return _past(_BLANKS, self.text, pos + 1)

    def _value(self, name: str, pos: int) -> tuple[str, int]:
        pattern = _QUOTED_RE if self._peek(pos) == '"' else _WORD_RE
        match = pattern.match(self.text, pos)
        if match is None:
            ch = self._peek(pos)
            if ch == '"':
                raise self._fail(f"unterminated quoted value for {name}", pos)
            raise self._fail(f"expected a value for {name}, found {_describe(ch)}", pos)
        self._check(match.group(1), name, match.start(1))
        return _unescape(match.group(1)), match.end()

    def _vector(self, name: str, pos: int) -> tuple[Vector, int]:
        """Read from the ``[`` to past the ``]``; first of two equal keys wins."""
        values: dict[str, str] = {}
        opened = _OPEN_VECTOR.match(self.text, pos)
        assert opened is not None  # the caller saw the "["
        pos, closed = opened.end(), bool(opened.group(1))
        while not closed:
            key, value, pos, closed = self._pair(name, pos)
            values.setdefault(key, value)
        return Vector._trusted(values), pos

    def _pair(self, name: str, pos: int) -> tuple[str, str, int, bool]:
        text = self.text
        match = _NAME_RE.match(text, pos)
        if not match:
            ch = self._peek(pos)
            if not ch:
                raise self._fail(f"vector {name} is not closed with ']'", pos)
            if ch == "]":
                raise self._fail(f"trailing ',' before ']' in vector {name}", pos)
            raise self._fail(f"expected a sub-attribute name in vector {name}, found {_describe(ch)}", pos)
        key = match.group().upper()
        if key[0].isdigit():
            raise self._fail(f"sub-attribute name {key} in vector {name} must start with a letter or '_'", pos)
        where = f"{name}/{key}"
        pos = self._equals(where, match.end())
        ch = self._peek(pos)
        if ch == "[":
            raise self._fail(f"a vector cannot hold a vector ({where})", pos)
        if ch in ("\n", ",", "]", "#", ""):
            raise self._fail(f'expected a value for {where} (write "" for an empty one)', pos)
        value, pos = self._value(where, pos)
        pos = _past(_SKIP, text, pos)
        ch = self._peek(pos)
        if ch not in (",", "]"):
            if not ch:
                raise self._fail(f"vector {name} is not closed with ']'", pos)
            raise self._fail(f"expected ',' or ']' in vector {name}, found {_describe(ch)}", pos)
        return key, value, _past(_SKIP, text, pos + 1), ch == "]"


_WORD_RE = re.compile(_WORD)
_QUOTED_RE = re.compile(_QUOTED)


# ---- XML form -----------------------------------------------------------------------------------

def _xml_parser(encoding: str | None = None) -> etree.XMLParser:
    return etree.XMLParser(
        encoding=encoding, resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, strip_cdata=True
    )


_XML_PARSER = _xml_parser()
# A str was decoded already: whatever encoding its declaration names, its UTF-8 bytes are parsed.
_XML_PARSER_UTF8 = _xml_parser("utf-8")
_XML_POSITION = re.compile(r", line \d+, column \d+\Z")


def from_xml(text: str | bytes, source: str = "<template>") -> Template:
    """The XML form (CDATA sections read as text); a DOCTYPE is refused, entities never expand."""
    if isinstance(text, str):
        try:
            data, parser = text.encode("utf-8"), _XML_PARSER_UTF8
        except UnicodeEncodeError:
            raise TemplateError("malformed XML: text holds a lone surrogate", source=source) from None
    else:
        data, parser = text, _XML_PARSER
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        line, column = exc.position if exc.position else (0, 0)
        message = _XML_POSITION.sub("", exc.msg or str(exc))  # the position is ours to report
        raise TemplateError(f"malformed XML: {message}", source=source, line=line, column=column) from None
    except (etree.LxmlError, ValueError) as exc:
        raise TemplateError(f"malformed XML: {exc}", source=source) from None
    if root.getroottree().docinfo.doctype:  # type: ignore[union-attr]  # lxml-stubs 0.5 lacks DocInfo.doctype
        raise TemplateError("XML with a DOCTYPE is not accepted", source=source)
    return from_element(root, source)


def from_element(root: etree._Element, source: str = "<template>") -> Template:
    """Read a parsed ``<TEMPLATE>``-like element: children are attributes, grandchildren vector pairs."""
    _no_loose_text(root, root.tag, source)
    attributes: list[tuple[str, Value]] = []
    for child in root:
        if not isinstance(child.tag, str):
            continue  # comments and processing instructions
        name = top_level_name(_element_name(child, _NAME_FULL, source))
        elements = [c for c in child if isinstance(c.tag, str)]
        if elements:
            _no_loose_text(child, name, source)
            attributes.append((name, Vector._trusted(_xml_pairs(name, elements, source))))
        else:
            attributes.append((name, _xml_text(child, name, source)))
    return Template(attributes)


def _xml_pairs(name: str, elements: list[etree._Element], source: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for element in elements:
        key = _element_name(element, _KEY_FULL, source).upper()
        where = f"{name}/{key}"
        if any(isinstance(c.tag, str) for c in element):
            raise TemplateError(f"{where} holds elements: a template nests two levels only", source=source)
        values.setdefault(key, _xml_text(element, where, source))
    return values


def _element_name(element: etree._Element, pattern: re.Pattern[str], source: str) -> str:
    tag = element.tag
    local = tag.rpartition("}")[2] if tag[:1] == "{" else tag
    if not pattern.match(local):
        raise TemplateError(f"element <{local}> is not an attribute name (letters, digits and '_')", source=source)
    return local


def _xml_text(element: etree._Element, where: str, source: str) -> str:
    value = "".join(cast("Iterator[str]", element.itertext()))  # text, never bytes, from a parsed tree
    problem = _value_problem(value)
    if problem:
        raise TemplateError(f"value of {where} {problem}", source=source)
    return value


def _no_loose_text(element: etree._Element, where: str, source: str) -> None:
    loose = [element.text or ""] + [c.tail or "" for c in element]
    if any(part.strip() for part in loose):
        raise TemplateError(f"{where} mixes text and elements", source=source)


def to_xml(template: Template, root: str = "TEMPLATE") -> etree._Element:
    element = etree.Element(root)
    append_attributes(element, template.sorted_attributes())
    return element


def append_attributes(parent: etree._Element, attributes: Iterable[tuple[str, Value]]) -> None:
    """Append ``<NAME>value</NAME>`` children (vectors as nested elements, empty ones as ``<NAME/>``)."""
    try:
        for name, value in attributes:
            child = etree.SubElement(parent, name)
            if isinstance(value, Vector):
                for key, sub in value.items():
                    etree.SubElement(child, key).text = sub
            else:
                child.text = value
    except ValueError as exc:
        raise TemplateError(f"cannot write {name} as XML: {exc}") from None
