"""New VM templates: the checks of a request (NAME, the libvirt domain it may carry) and adding one.

One copy of the rules, used by ``one.template.allocate`` and by the restore of a backup to new images
(which creates the template of the restored VM in the same transaction as its images).
"""

from __future__ import annotations

from scheduler.errors import ValidationError
from scheduler.hosts.vmimport import read_domain
from scheduler.model.objects.common import Ownership, check_name
from scheduler.model.objects.vmtemplate import DOMAIN_XML_KEY, VmTemplate
from scheduler.model.template import Template
from scheduler.store.state import Mutation, State

KIND = "template"


def checked_request(text: str) -> tuple[str, Template]:
    """(NAME, the rest) of a new template's text or XML, checked (pure)."""
    template = Template.parse(text, source="VM template")
    name = check_name(template.get("NAME") or "", "VM template")
    template.remove("NAME")
    xml = template.get(DOMAIN_XML_KEY)
    if xml is not None:
        try:
            read_domain(xml)
        except ValidationError as exc:
            raise ValidationError(f"{DOMAIN_XML_KEY}: {exc}") from None
    return name, template


def require_free_name(state: State, owner_uid: int, name: str) -> None:
    """ValidationError when user ``owner_uid`` owns a template named ``name``."""
    taken = next((t for t in state.templates.all() if t.name == name and t.ownership.uid == owner_uid), None)
    if taken is not None:
        raise ValidationError(f"NAME is already taken by TEMPLATE {taken.id}.")


async def add(state: State, m: Mutation, owner: Ownership, name: str, template: Template, now: int) -> int:
    """Put a new template into mutation ``m`` (the caller's other changes commit with it); its id.
    ValidationError when the owner has a template of that name."""
    require_free_name(state, owner.uid, name)
    vm_template = VmTemplate(id=await m.new_id(KIND), name=name, ownership=owner, regtime=now, template=template)
    m.put(KIND, vm_template)
    return vm_template.id


__all__ = ["add", "checked_request", "require_free_name"]
