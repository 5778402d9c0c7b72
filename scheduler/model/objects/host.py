"""A hypervisor (host.xsd). SSH settings and monitoring values live in its free-form TEMPLATE."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lxml import etree

from scheduler.model.objects.common import (
    Element,
    SubElement,
    add_ids,
    add_int,
    add_template,
    add_text,
    read_ids,
    read_int,
    read_template,
    read_text,
)
from scheduler.model.objects.states import HostState, parse_code
from scheduler.model.template import Template, Vector

# HOST_SHARE counters the schema requires; vmsched does no capacity planning, so they stay zero.
_SHARE_COUNTERS = ("MEM_USAGE", "CPU_USAGE", "TOTAL_MEM", "TOTAL_CPU", "MAX_MEM", "MAX_CPU")
_DISK_COUNTERS = ("FREE_DISK", "MAX_DISK", "USED_DISK")


@dataclass
class Host:
    id: int
    name: str
    state: HostState = HostState.INIT
    prev_state: HostState = HostState.INIT
    im_mad: str = "kvm"
    vm_mad: str = "kvm"
    cluster_id: int = 0
    cluster: str = "default"
    vms: list[int] = field(default_factory=list)
    template: Template = field(default_factory=Template)
    monitored_at: int = 0  # epoch of the last successful monitor; 0 = never

    def __post_init__(self) -> None:
        """Id lists are sets, kept sorted as OpenNebula writes them."""
        self.vms = sorted(set(self.vms))

    def to_element(self) -> Element:
        host = etree.Element("HOST")
        add_int(host, "ID", self.id)
        add_text(host, "NAME", self.name)
        add_int(host, "STATE", self.state)
        add_int(host, "PREV_STATE", self.prev_state)
        add_text(host, "IM_MAD", self.im_mad)
        add_text(host, "VM_MAD", self.vm_mad)
        add_int(host, "CLUSTER_ID", self.cluster_id)
        add_text(host, "CLUSTER", self.cluster)
        self._write_share(host)
        add_ids(host, "VMS", self.vms)
        add_template(host, "TEMPLATE", self.template)
        monitoring = SubElement(host, "MONITORING")
        if self.monitored_at:
            add_int(monitoring, "TIMESTAMP", self.monitored_at)
            add_int(monitoring, "ID", self.id)
        return host

    def _write_share(self, host: Element) -> None:
        share = SubElement(host, "HOST_SHARE")
        for tag in _SHARE_COUNTERS:
            add_int(share, tag, 0)
        add_int(share, "RUNNING_VMS", len(self.vms))
        add_int(share, "VMS_THREAD", 0)
        datastores = SubElement(share, "DATASTORES")
        add_int(datastores, "DISK_USAGE", 0)
        for tag in _DISK_COUNTERS:
            add_int(datastores, tag, 0)
        SubElement(share, "PCI_DEVICES")
        SubElement(share, "NUMA_NODES")

    def to_xml(self) -> str:
        return etree.tostring(self.to_element(), encoding="unicode")

    @classmethod
    def from_element(cls, element: Element) -> Host:
        monitoring = element.find("MONITORING")
        return cls(
            id=read_int(element, "ID"),
            name=read_text(element, "NAME"),
            state=parse_code(HostState, read_int(element, "STATE", 0)),
            prev_state=parse_code(HostState, read_int(element, "PREV_STATE", 0)),
            im_mad=read_text(element, "IM_MAD", "kvm"),
            vm_mad=read_text(element, "VM_MAD", "kvm"),
            cluster_id=read_int(element, "CLUSTER_ID", 0),
            cluster=read_text(element, "CLUSTER", "default"),
            vms=read_ids(element, "VMS"),
            template=read_template(element, "TEMPLATE"),
            monitored_at=0 if monitoring is None else read_int(monitoring, "TIMESTAMP", 0),
        )


def ceph_hold(host: Host, disks: Iterable[Vector]) -> str:
    """Why a backup of a VM with these DISKs waits on ``host`` ("" when it need not): RBD disks and a host whose
    monitoring could not reach the cluster."""
    if (host.template.get("CEPH_REACH") or "").upper() != "NO":
        return ""
    if not any((disk.get("TYPE") or "").upper() == "RBD" for disk in disks):
        return ""
    return f"host {host.name} cannot reach the Ceph cluster of the VM's RBD disks ({host.template.get('CEPH_ERROR')})"
