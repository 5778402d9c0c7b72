"""An image (image.xsd), in vmsched almost always a backup image (TYPE BACKUP, spec §7.2, §6.4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from scheduler.model.objects.common import (
    DEFAULT_PERMISSIONS,
    Element,
    Ownership,
    Permissions,
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
from scheduler.model.objects.states import DiskType, ImageState, ImageType, parse_code
from scheduler.model.template import Template

FULL = "FULL"
INCREMENT = "INCREMENT"
# on a chain image started because the VM's previous chain could not go on: why (text) and a short cause
# (reset, image_gone, pointers, disks_changed, resized, checkpoint) that the metrics count by
NEW_CHAIN_REASON = "NEW_CHAIN_REASON"
NEW_CHAIN_CAUSE = "NEW_CHAIN_CAUSE"


@dataclass(frozen=True)
class Increment:
    """One backup run inside a backup image's chain (``BACKUP_INCREMENTS/INCREMENT``)."""

    id: int
    type: str  # FULL for the base, INCREMENT afterwards
    parent_id: int  # -1 for the base
    source: str  # backend reference (rsync directory, restic snapshot id)
    size: int  # MB
    date: int  # epoch

    def write(self, parent: Element) -> None:
        element = SubElement(parent, "INCREMENT")
        add_int(element, "DATE", self.date)
        add_int(element, "ID", self.id)
        add_int(element, "PARENT_ID", self.parent_id)
        add_int(element, "SIZE", self.size)
        add_text(element, "SOURCE", self.source)
        add_text(element, "TYPE", self.type)

    @classmethod
    def read(cls, element: Element) -> Increment:
        return cls(
            id=read_int(element, "ID"),
            type=read_text(element, "TYPE"),
            parent_id=read_int(element, "PARENT_ID", -1),
            source=read_text(element, "SOURCE", ""),
            size=read_int(element, "SIZE", 0),
            date=read_int(element, "DATE", 0),
        )


@dataclass
class Image:
    id: int
    name: str
    ownership: Ownership = field(default_factory=Ownership)
    permissions: Permissions = DEFAULT_PERMISSIONS
    type: ImageType = ImageType.OS
    disk_type: DiskType = DiskType.FILE
    persistent: bool = False
    regtime: int = 0
    modtime: int = 0
    source: str = ""
    path: str = ""
    format: str = "raw"
    fs: str = ""
    size: int = 0  # MB
    state: ImageState = ImageState.INIT
    prev_state: ImageState = ImageState.INIT
    datastore_id: int = -1
    datastore: str = ""
    vms: list[int] = field(default_factory=list)
    template: Template = field(default_factory=Template)
    increments: list[Increment] = field(default_factory=list)
    backup_disk_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Id lists are sets, kept sorted as OpenNebula writes them."""
        self.vms = sorted(set(self.vms))
        self.backup_disk_ids = sorted(set(self.backup_disk_ids))

    @property
    def sources(self) -> list[str]:
        """Every backup on the datastore this image records: one per increment of a chain, else SOURCE."""
        return [increment.source for increment in self.increments] or ([self.source] if self.source else [])

    @property
    def running_vms(self) -> int:
        return len(self.vms)

    def to_element(self) -> Element:
        image = etree.Element("IMAGE")
        add_int(image, "ID", self.id)
        self.ownership.write(image)
        add_text(image, "NAME", self.name)
        image.append(self.permissions.to_element())
        add_int(image, "TYPE", self.type)
        add_int(image, "DISK_TYPE", self.disk_type)
        add_int(image, "PERSISTENT", 1 if self.persistent else 0)
        add_int(image, "REGTIME", self.regtime)
        add_int(image, "MODTIME", self.modtime)
        for tag, value in (("SOURCE", self.source), ("PATH", self.path), ("FORMAT", self.format), ("FS", self.fs)):
            add_text(image, tag, value)
        add_int(image, "SIZE", self.size)
        add_int(image, "STATE", self.state)
        add_int(image, "PREV_STATE", self.prev_state)
        add_int(image, "RUNNING_VMS", self.running_vms)
        add_int(image, "CLONING_OPS", 0)
        add_int(image, "CLONING_ID", -1)
        add_int(image, "TARGET_SNAPSHOT", -1)
        add_int(image, "DATASTORE_ID", self.datastore_id)
        add_text(image, "DATASTORE", self.datastore)
        add_ids(image, "VMS", self.vms)
        add_ids(image, "CLONES", ())
        add_ids(image, "APP_CLONES", ())
        add_template(image, "TEMPLATE", self.template)
        _write_no_snapshots(image)
        increments = SubElement(image, "BACKUP_INCREMENTS")
        for increment in self.increments:
            increment.write(increments)
        if self.type == ImageType.BACKUP or self.backup_disk_ids:
            add_ids(image, "BACKUP_DISK_IDS", self.backup_disk_ids)
        return image

    def to_xml(self) -> str:
        return etree.tostring(self.to_element(), encoding="unicode")

    @classmethod
    def from_element(cls, element: Element) -> Image:
        permissions = element.find("PERMISSIONS")
        increments = element.find("BACKUP_INCREMENTS")
        return cls(
            id=read_int(element, "ID"),
            name=read_text(element, "NAME"),
            ownership=Ownership.read(element),
            permissions=DEFAULT_PERMISSIONS if permissions is None else Permissions.from_element(permissions),
            type=parse_code(ImageType, read_int(element, "TYPE", 0)),
            disk_type=parse_code(DiskType, read_int(element, "DISK_TYPE", 0)),
            persistent=read_int(element, "PERSISTENT", 0) != 0,
            regtime=read_int(element, "REGTIME", 0),
            modtime=read_int(element, "MODTIME", 0),
            source=read_text(element, "SOURCE", ""),
            path=read_text(element, "PATH", ""),
            format=read_text(element, "FORMAT", "raw"),
            fs=read_text(element, "FS", ""),
            size=read_int(element, "SIZE", 0),
            state=parse_code(ImageState, read_int(element, "STATE", 0)),
            prev_state=parse_code(ImageState, read_int(element, "PREV_STATE", 0)),
            datastore_id=read_int(element, "DATASTORE_ID", -1),
            datastore=read_text(element, "DATASTORE", ""),
            vms=read_ids(element, "VMS"),
            template=read_template(element, "TEMPLATE"),
            increments=[] if increments is None else [Increment.read(i) for i in increments.iterfind("INCREMENT")],
            backup_disk_ids=read_ids(element, "BACKUP_DISK_IDS"),
        )


def _write_no_snapshots(image: Element) -> None:
    snapshots = SubElement(image, "SNAPSHOTS")
    add_text(snapshots, "ALLOW_ORPHANS", "NO")
    add_int(snapshots, "CURRENT_BASE", -1)
    add_int(snapshots, "NEXT_SNAPSHOT", 0)
