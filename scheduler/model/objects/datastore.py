"""A datastore (datastore.xsd); backup datastores are TYPE BACKUP_DS with no TM driver (spec §7.3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from scheduler.model.objects.common import (
    DEFAULT_PERMISSIONS,
    Element,
    Ownership,
    Permissions,
    add_ids,
    add_int,
    add_template,
    add_text,
    masked,
    read_ids,
    read_int,
    read_template,
    read_text,
)
from scheduler.model.objects.states import DatastoreState, DatastoreType, DiskType, parse_code
from scheduler.model.template import Template

BASE_PATH_ROOT = "/var/lib/vmsched/datastores"
NO_TM_MAD = "-"
# Template attributes whose value never leaves the daemon unless asked for (show_secrets=True).
SECRET_KEYS = frozenset({"RESTIC_PASSWORD"})


def is_secret(name: str) -> bool:
    return name in SECRET_KEYS or name.endswith("_PASSWORD")


@dataclass
class Datastore:
    id: int
    name: str
    type: DatastoreType = DatastoreType.IMAGE_DS
    ds_mad: str = "fs"
    tm_mad: str = "ssh"
    ownership: Ownership = field(default_factory=Ownership)
    permissions: Permissions = DEFAULT_PERMISSIONS
    disk_type: DiskType = DiskType.FILE
    state: DatastoreState = DatastoreState.READY
    total_mb: int = 0
    free_mb: int = 0
    used_mb: int = 0
    images: list[int] = field(default_factory=list)
    clusters: list[int] = field(default_factory=lambda: [0])
    template: Template = field(default_factory=Template)

    def __post_init__(self) -> None:
        self.images = sorted(set(self.images))
        self.clusters = sorted(set(self.clusters))
        if self.type == DatastoreType.BACKUP_DS:
            self.tm_mad = NO_TM_MAD

    @property
    def base_path(self) -> str:
        """Where the data lives (on the backup server for BACKUP_DS); the template may set it."""
        return self.template.get("BASE_PATH") or f"{BASE_PATH_ROOT}/{self.id}"

    def to_element(self, show_secrets: bool = False) -> Element:
        ds = etree.Element("DATASTORE")
        add_int(ds, "ID", self.id)
        self.ownership.write(ds)
        add_text(ds, "NAME", self.name)
        ds.append(self.permissions.to_element())
        add_text(ds, "DS_MAD", self.ds_mad)
        add_text(ds, "TM_MAD", self.tm_mad)
        add_text(ds, "BASE_PATH", self.base_path)
        add_int(ds, "TYPE", self.type)
        add_int(ds, "DISK_TYPE", self.disk_type)
        add_int(ds, "STATE", self.state)
        add_ids(ds, "CLUSTERS", self.clusters)
        add_int(ds, "TOTAL_MB", self.total_mb)
        add_int(ds, "FREE_MB", self.free_mb)
        add_int(ds, "USED_MB", self.used_mb)
        add_ids(ds, "IMAGES", self.images)
        add_template(ds, "TEMPLATE", self.template if show_secrets else masked(self.template, is_secret))
        return ds

    def to_xml(self, show_secrets: bool = False) -> str:
        return etree.tostring(self.to_element(show_secrets=show_secrets), encoding="unicode")

    @classmethod
    def from_element(cls, element: Element) -> Datastore:
        permissions = element.find("PERMISSIONS")
        return cls(
            id=read_int(element, "ID"),
            name=read_text(element, "NAME"),
            type=parse_code(DatastoreType, read_int(element, "TYPE", 0)),
            ds_mad=read_text(element, "DS_MAD", "fs"),
            tm_mad=read_text(element, "TM_MAD", "ssh"),
            ownership=Ownership.read(element),
            permissions=DEFAULT_PERMISSIONS if permissions is None else Permissions.from_element(permissions),
            disk_type=parse_code(DiskType, read_int(element, "DISK_TYPE", 0)),
            state=parse_code(DatastoreState, read_int(element, "STATE", 0)),
            total_mb=read_int(element, "TOTAL_MB", 0),
            free_mb=read_int(element, "FREE_MB", 0),
            used_mb=read_int(element, "USED_MB", 0),
            images=read_ids(element, "IMAGES"),
            clusters=read_ids(element, "CLUSTERS"),
            template=read_template(element, "TEMPLATE"),
        )
