"""A user (user.xsd). The password hash and login tokens are written only with show_secrets=True."""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from scheduler.model.objects.common import (
    MASK,
    Element,
    Ownership,
    SubElement,
    add_int,
    add_template,
    add_text,
    read_ids,
    read_int,
    read_template,
    read_text,
)
from scheduler.model.template import Template

_QUOTA_TAGS = ("DATASTORE_QUOTA", "NETWORK_QUOTA", "VM_QUOTA", "IMAGE_QUOTA")

ADMIN_GROUP = 0
USERS_GROUP = 1
GROUP_NAMES = {ADMIN_GROUP: "oneadmin", USERS_GROUP: "users"}


def ownership(uid: int, gid: int, uname: str) -> Ownership:
    """What an object created by user ``uid`` (of group ``gid``) records as its owner."""
    return Ownership(uid, gid, uname, GROUP_NAMES.get(gid, "users"))


@dataclass(frozen=True)
class LoginToken:
    token: str
    expiration_time: int  # epoch
    egid: int = -1  # effective group; -1 = all the user's groups


@dataclass
class User:
    id: int
    name: str
    gid: int = 0
    gname: str = "oneadmin"
    groups: list[int] = field(default_factory=list)  # every group; the primary is added if missing
    password: str = ""  # hash, never the clear text
    auth_driver: str = "core"
    enabled: bool = True
    login_tokens: list[LoginToken] = field(default_factory=list)
    template: Template = field(default_factory=Template)

    def __post_init__(self) -> None:
        self.groups = sorted({self.gid, *self.groups})

    def to_element(self, show_secrets: bool = False, quotas: bool = True) -> Element:
        """The user.xsd body; ``quotas=False`` gives the body inside USER_POOL."""
        user = etree.Element("USER")
        add_int(user, "ID", self.id)
        add_int(user, "GID", self.gid)
        groups = SubElement(user, "GROUPS")
        for gid in sorted({self.gid, *self.groups}):
            add_int(groups, "ID", gid)
        add_text(user, "GNAME", self.gname)
        add_text(user, "NAME", self.name)
        add_text(user, "PASSWORD", self.password if show_secrets else "")
        add_text(user, "AUTH_DRIVER", self.auth_driver)
        add_int(user, "ENABLED", 1 if self.enabled else 0)
        for token in self.login_tokens:
            element = SubElement(user, "LOGIN_TOKEN")
            add_text(element, "TOKEN", token.token if show_secrets else MASK)
            add_int(element, "EXPIRATION_TIME", token.expiration_time)
            add_int(element, "EGID", token.egid)
        add_template(user, "TEMPLATE", self.template)
        if quotas:
            write_empty_quotas(user)
            write_empty_quotas(SubElement(user, "DEFAULT_USER_QUOTAS"))
        return user

    def to_xml(self, show_secrets: bool = False) -> str:
        return etree.tostring(self.to_element(show_secrets=show_secrets), encoding="unicode")

    @classmethod
    def from_element(cls, element: Element) -> User:
        return cls(
            id=read_int(element, "ID"),
            name=read_text(element, "NAME"),
            gid=read_int(element, "GID", 0),
            gname=read_text(element, "GNAME", ""),
            groups=read_ids(element, "GROUPS"),
            password=read_text(element, "PASSWORD", ""),
            auth_driver=read_text(element, "AUTH_DRIVER", "core"),
            enabled=read_int(element, "ENABLED", 1) != 0,
            login_tokens=[
                LoginToken(read_text(t, "TOKEN"), read_int(t, "EXPIRATION_TIME"), read_int(t, "EGID", -1))
                for t in element.iterfind("LOGIN_TOKEN")
            ],
            template=read_template(element, "TEMPLATE"),
        )


def write_empty_quotas(parent: Element) -> None:
    """No quotas are enforced by vmsched: the schema's quota sections, all empty."""
    for tag in _QUOTA_TAGS:
        SubElement(parent, tag)
