"""Pieces every object's XML shares: permissions, ownership, id lists, typed child elements.

Writers always emit integer elements with a number (pyone refuses ``<UID/>``); readers accept a
missing element when a default is given and raise ``ValidationError`` for text that is not a number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lxml import etree

from scheduler.errors import ValidationError
from scheduler.model.template import Template, Vector, append_attributes
from scheduler.model.template import from_element as template_from_element

Element = etree._Element
SubElement = etree.SubElement
MASK = "****"

_PERMISSION_TAGS = (
    "OWNER_U", "OWNER_M", "OWNER_A",
    "GROUP_U", "GROUP_M", "GROUP_A",
    "OTHER_U", "OTHER_M", "OTHER_A",
)  # fmt: skip


@dataclass(frozen=True)
class Permissions:
    """Use / manage / admin bits for owner, group and others (OpenNebula's chmod model)."""

    owner_u: bool = True
    owner_m: bool = True
    owner_a: bool = False
    group_u: bool = True
    group_m: bool = False
    group_a: bool = False
    other_u: bool = False
    other_m: bool = False
    other_a: bool = False

    @classmethod
    def from_octal(cls, text: str) -> Permissions:
        """``"640"`` -> owner ``um-``, group ``u--``, other ``---`` (u=4, m=2, a=1)."""
        if len(text) != 3 or any(ch not in "01234567" for ch in text):
            raise ValidationError(f"permissions {text!r} must be three octal digits, e.g. 640")
        bits = [int(ch) & mask != 0 for ch in text for mask in (4, 2, 1)]
        return cls(*bits)

    @classmethod
    def from_umask(cls, umask: str) -> Permissions:
        """What a new object gets under ``umask`` (``"177"`` -> ``"600"``)."""
        mask = cls.from_octal(umask.lstrip("0").rjust(3, "0")[-3:])
        return cls(*(not bit for bit in mask.bits()))

    def bits(self) -> tuple[bool, ...]:
        return (
            self.owner_u, self.owner_m, self.owner_a,
            self.group_u, self.group_m, self.group_a,
            self.other_u, self.other_m, self.other_a,
        )  # fmt: skip

    def octal(self) -> str:
        bits = self.bits()
        return "".join(str(bits[i] * 4 + bits[i + 1] * 2 + bits[i + 2]) for i in (0, 3, 6))

    def symbolic(self) -> str:
        """``um-u-----`` as the OpenNebula CLI prints it."""
        return "".join(letter if bit else "-" for bit, letter in zip(self.bits(), "umaumauma", strict=True))

    def to_element(self) -> Element:
        element = etree.Element("PERMISSIONS")
        for tag, bit in zip(_PERMISSION_TAGS, self.bits(), strict=True):
            SubElement(element, tag).text = "1" if bit else "0"
        return element

    @classmethod
    def from_element(cls, element: Element) -> Permissions:
        return cls(*(read_int(element, tag) != 0 for tag in _PERMISSION_TAGS))


DEFAULT_PERMISSIONS = Permissions.from_octal("640")
BACKUP_IMAGE_PERMISSIONS = Permissions.from_umask("177")


@dataclass(frozen=True)
class Ownership:
    """Owner and group of an object, with their names as the XML shows them."""

    uid: int = 0
    gid: int = 0
    uname: str = "oneadmin"
    gname: str = "oneadmin"

    def write(self, parent: Element) -> None:
        """Append UID, GID, UNAME, GNAME (the order every schema uses)."""
        add_int(parent, "UID", self.uid)
        add_int(parent, "GID", self.gid)
        add_text(parent, "UNAME", self.uname)
        add_text(parent, "GNAME", self.gname)

    @classmethod
    def read(cls, element: Element) -> Ownership:
        return cls(
            uid=read_int(element, "UID", 0),
            gid=read_int(element, "GID", 0),
            uname=read_text(element, "UNAME", "oneadmin"),
            gname=read_text(element, "GNAME", "oneadmin"),
        )


# ---- writing ------------------------------------------------------------------------------------


def add_int(parent: Element, tag: str, value: int) -> Element:
    child = SubElement(parent, tag)
    child.text = str(int(value))
    return child


def add_text(parent: Element, tag: str, value: str | None) -> Element:
    child = SubElement(parent, tag)
    child.text = value or ""
    return child


def add_ids(parent: Element, tag: str, ids: Iterable[int]) -> Element:
    """``<TAG><ID>1</ID><ID>2</ID></TAG>``, ids sorted as OpenNebula's id sets are."""
    child = SubElement(parent, tag)
    for oid in sorted(ids):
        SubElement(child, "ID").text = str(int(oid))
    return child


def add_template(parent: Element, tag: str, template: Template) -> Element:
    child = SubElement(parent, tag)
    append_attributes(child, template.sorted_attributes())
    return child


def add_vector(parent: Element, tag: str, vector: Vector, order: Iterable[str] | None = None) -> Element:
    """A vector's pairs as child elements, alphabetical or in the given key order."""
    child = SubElement(parent, tag)
    keys = vector.keys() if order is None else [key for key in order if key in vector]
    for key in keys:
        SubElement(child, key).text = vector[key]
    return child


def masked(template: Template, is_secret: Callable[[str], bool]) -> Template:
    """A copy with the value of every secret attribute (or vector pair) replaced by ``****``."""
    out = Template()
    for name, value in template.attributes:
        if isinstance(value, Vector):
            value = Vector((key, MASK if is_secret(key) else sub) for key, sub in value.items())
        elif is_secret(name):
            value = MASK
        out.attributes.append((name, value))
    return out


# ---- reading ------------------------------------------------------------------------------------

_REQUIRED = object()


def read_text(element: Element, tag: str, default: str | object = _REQUIRED) -> str:
    child = element.find(tag)
    if child is None:
        if default is _REQUIRED:
            raise ValidationError(f"{element.tag} has no {tag} element")
        return default  # type: ignore[return-value]
    return child.text or ""


def read_int(element: Element, tag: str, default: int | object = _REQUIRED) -> int:
    child = element.find(tag)
    if child is None:
        if default is _REQUIRED:
            raise ValidationError(f"{element.tag} has no {tag} element")
        return default  # type: ignore[return-value]
    return parse_int(child.text, f"{element.tag}/{tag}")


def parse_int(text: str | None, where: str) -> int:
    try:
        return int((text or "").strip())
    except ValueError:
        raise ValidationError(f"{where} must be an integer, not {text!r}") from None


def read_ids(element: Element, tag: str) -> list[int]:
    child = element.find(tag)
    if child is None:
        return []
    return [parse_int(item.text, f"{element.tag}/{tag}/ID") for item in child.iterfind("ID")]


def read_template(element: Element, tag: str) -> Template:
    child = element.find(tag)
    return Template() if child is None else template_from_element(child)


def read_vector(element: Element, tag: str) -> Vector:
    child = element.find(tag)
    if child is None:
        return Vector()
    return Vector((sub.tag, sub.text or "") for sub in child if isinstance(sub.tag, str))


MAX_NAME = 128


def check_name(name: str, what: str) -> str:
    """An object's NAME, stripped; ValidationError when it is empty, too long or holds control characters."""
    name = name.strip()
    if not name:
        raise ValidationError(f"{what} name cannot be empty")
    if len(name) > MAX_NAME:
        raise ValidationError(f"{what} name is longer than {MAX_NAME} characters")
    if any(ch in name for ch in "\n\r\t") or any(ord(ch) < 32 for ch in name):
        raise ValidationError(f"{what} name contains control characters")
    return name
