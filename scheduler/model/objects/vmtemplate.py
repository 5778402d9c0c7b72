"""A VM template (vmtemplate.xsd): a named, owned TEMPLATE from which VMs are instantiated.

vmsched creates them when a backup is restored (spec §8.2 step 5) and keeps with the cleaned template
the libvirt definition of the restored domain, in the TEMPLATE attribute ``VMSCHED_DOMAIN_XML``
(``DOMAIN_XML_KEY``): the whole domain XML as one value, XML-escaped in the object's XML and quoted in
the text form like any other value. ``vmsched template instantiate`` defines that domain on a host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from scheduler.model.objects.common import (
    DEFAULT_PERMISSIONS,
    Element,
    Ownership,
    Permissions,
    add_int,
    add_template,
    add_text,
    read_int,
    read_template,
    read_text,
)
from scheduler.model.template import Template

DOMAIN_XML_KEY = "VMSCHED_DOMAIN_XML"


@dataclass
class VmTemplate:
    id: int
    name: str
    ownership: Ownership = field(default_factory=Ownership)
    permissions: Permissions = DEFAULT_PERMISSIONS
    regtime: int = 0
    template: Template = field(default_factory=Template)

    @property
    def domain_xml(self) -> str | None:
        """The libvirt definition instantiate defines, when the template has one."""
        return self.template.get(DOMAIN_XML_KEY) or None

    def to_element(self) -> Element:
        element = etree.Element("VMTEMPLATE")
        add_int(element, "ID", self.id)
        self.ownership.write(element)
        add_text(element, "NAME", self.name)
        element.append(self.permissions.to_element())
        add_int(element, "REGTIME", self.regtime)
        add_template(element, "TEMPLATE", self.template)
        return element

    def to_xml(self) -> str:
        return etree.tostring(self.to_element(), encoding="unicode")

    @classmethod
    def from_element(cls, element: Element) -> VmTemplate:
        permissions = element.find("PERMISSIONS")
        return cls(
            id=read_int(element, "ID"),
            name=read_text(element, "NAME"),
            ownership=Ownership.read(element),
            permissions=DEFAULT_PERMISSIONS if permissions is None else Permissions.from_element(permissions),
            regtime=read_int(element, "REGTIME", 0),
            template=read_template(element, "TEMPLATE"),
        )
