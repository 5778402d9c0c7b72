"""``one.image.restore`` (spec §8.1-8.2): a backup becomes new images in an image datastore and, unless one
disk was asked for, a VM template with a libvirt domain ready to instantiate.

For each backed-up disk (or only ``DISK_ID``): an image record (OS for disk 0, DATABLOCK otherwise, LOCKED
while its data arrives) named ``<base>-disk-<disk_id>`` with ``PATH`` = the disk's backup URL and
``FROM_BACKUP_DS``; the data goes from the backup datastore straight to the image datastore's host,
verified against the checksums recorded at backup time (scheduler.restore.disk), then the image is READY.
Then the template: the backed-up ``vm.xml`` cleaned by spec §8.3 (scheduler.restore.template), and the
backed-up ``domain.xml`` re-pointed at the new files. Any failure removes what this restore created
(files and records), and the error says so.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass

from lxml import etree

from drivers.commands import Runner, shielded
from drivers.datastore import open_datastore
from drivers.datastore.layout import DOMAIN_XML, VM_XML, disk_size_mb
from drivers.processes import kill_marked
from scheduler.backup.chain import virtual_sizes
from scheduler.backup.urls import disk_urls
from scheduler.errors import ActionError, NotFound, ValidationError
from scheduler.faults import crash_point
from scheduler.hosts import imageds, vmtemplates
from scheduler.hosts.links import Daemon, HostLinks
from scheduler.model.objects.common import Ownership
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import ImageState, ImageType
from scheduler.model.objects.vmtemplate import DOMAIN_XML_KEY
from scheduler.model.template import Template
from scheduler.restore.disk import chain_to, fetch_disk, remove_temps, temp_path
from scheduler.restore.template import clean_vm_template, restored_domain_xml
from scheduler.store.state import State

log = logging.getLogger(__name__)
MIB = 1 << 20

YES_NO = ("YES", "NO")
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class RestoreOptions:
    """The ``options`` template of ``one.image.restore`` (spec §8.1)."""

    no_nic: bool = False
    no_ip: bool = False
    name: str = ""
    increment: int = -1
    disk_id: int | None = None


def _flag(template: Template, key: str) -> bool:
    value = (template.get(key) or "NO").strip().upper()
    if value not in YES_NO:
        raise ValidationError(f"restore option {key} must be YES or NO, got {value!r}")
    return value == "YES"


def _number(template: Template, key: str, default: int | None) -> int | None:
    value = (template.get(key) or "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValidationError(f"restore option {key} must be an integer, got {value!r}") from None


def parse_options(text: str) -> RestoreOptions:
    """``NO_NIC``, ``NO_IP``, ``NAME``, ``INCREMENT_ID``, ``DISK_ID`` from template text (pure)."""
    template = Template.parse(text or "", source="restore options")
    name = (template.get("NAME") or "").strip()
    if any(ch in name for ch in "\n\r\0/"):
        raise ValidationError(f"restore option NAME {name!r} may not hold line breaks or '/'")
    increment = _number(template, "INCREMENT_ID", -1)
    return RestoreOptions(_flag(template, "NO_NIC"), _flag(template, "NO_IP"), name,
                          -1 if increment is None else increment, _number(template, "DISK_ID", None))


def check_request(state: State, backup: Image, target: Datastore, options: RestoreOptions) -> list[int]:
    """OpenNebula's checks (spec §8.1) and ours; the disk ids to restore."""
    if backup.type != ImageType.BACKUP:
        raise ActionError(f"Image {backup.id} is not a backup image")
    if state.datastores.find(backup.datastore_id) is None:
        raise ActionError(f"the backup datastore {backup.datastore_id} of image {backup.id} does not exist")
    if imageds.is_monitored(target) and not imageds.is_image_datastore(target):
        raise ActionError(f"Destination datastore {target.id} is a {target.ds_mad} image datastore: this version "
                          f"restores into {', '.join(imageds.IMAGE_DRIVERS)} image datastores only")
    if not imageds.is_image_datastore(target):
        raise ActionError("Destination can be only an image datastore")
    chain_to(backup, options.increment)  # an error naming the image's increments when it has no such one
    if options.disk_id is None:
        return list(backup.backup_disk_ids)
    if options.disk_id not in backup.backup_disk_ids:
        raise ActionError(f"disk {options.disk_id} is not in backup image {backup.id} (disks: "
                          f"{', '.join(map(str, backup.backup_disk_ids)) or 'none'})")
    return [options.disk_id]


def base_name(backup: Image, options: RestoreOptions) -> str:
    """``NAME``, else ``<vm_id>-<backup id>`` (spec §8.2)."""
    vm_id = backup.vms[0] if backup.vms else -1
    return options.name or f"{vm_id}-{backup.source}"


def new_image(image_id: int, name: str, disk_id: int, owner: Ownership, target: Datastore, size_mb: int,
              url: str, backup: Image, now: int) -> Image:
    """The record of one restored disk, LOCKED until its data is in place (pure)."""
    image = Image(id=image_id, name=name, ownership=owner, type=ImageType.OS if disk_id == 0 else ImageType.DATABLOCK,
                  regtime=now, modtime=now, source=imageds.image_path(target, image_id, "qcow2"), path=url,
                  format="qcow2", size=size_mb, state=ImageState.LOCKED, prev_state=ImageState.LOCKED,
                  datastore_id=target.id, datastore=target.name)
    image.template.set("FROM_BACKUP_DS", str(backup.datastore_id))
    image.template.set("RESTORED_FROM", f"{backup.id}:{disk_id}")
    return image


def new_uuid() -> str:
    return str(uuid.uuid4())


async def read_backup(state: State, links: HostLinks, backup: Image, increment_id: int = -1, *,
                      domain: bool = True) -> tuple[str, str]:
    """(vm.xml, domain.xml) of the backup (as they were at increment ``increment_id``), from its datastore;
    domain.xml "" unless ``domain`` (only a restore that makes a template needs it)."""
    datastore = state.datastores.get(backup.datastore_id)
    store = open_datastore(datastore, links.pool)
    vm_id = backup.vms[0] if backup.vms else -1
    source = chain_to(backup, increment_id)[-1][1]
    try:
        vm_xml = (await store.read_file(vm_id, source, VM_XML)).decode()
        domain_xml = (await store.read_file(vm_id, source, DOMAIN_XML)).decode() if domain else ""
    except NotFound as exc:
        raise ActionError(f"backup image {backup.id}: {exc}") from exc
    return vm_xml, domain_xml


def disk_sizes(vm_xml: str, disk_ids: list[int]) -> dict[int, int]:
    return {disk_id: disk_size_mb(vm_xml.encode(), disk_id) for disk_id in disk_ids}


def recorded_sizes(backup: Image, disk_ids: list[int], increment_id: int = -1) -> dict[int, int] | None:
    """MB of each disk at increment ``increment_id`` from the VIRTUAL_SIZE its CHECKSUMS recorded (pure); None
    when one of them has none (an image recorded before they were: the sizes come from vm.xml)."""
    recorded = virtual_sizes(backup, chain_to(backup, increment_id)[-1][0])
    if not set(disk_ids) <= set(recorded):
        return None
    return {disk_id: math.ceil(recorded[disk_id] / MIB) for disk_id in disk_ids}


def disk_targets(vm_xml: str) -> dict[int, str]:
    """DISK_ID -> TARGET of the backed-up VM's disks (pure)."""
    root = etree.fromstring(vm_xml.encode(), parser=etree.XMLParser(resolve_entities=False, no_network=True))
    return {int(disk.findtext("DISK_ID") or -1): disk.findtext("TARGET") or ""
            for disk in root.iter("DISK") if (disk.findtext("DISK_ID") or "").strip().isdigit()}


def this_machine() -> Host:
    """The scheduler's own machine as a host (no SSH_HOST): where an image datastore without BRIDGE_LIST is."""
    return Host(id=-1, name="localhost")


async def restore(ctx: Daemon, owner: Ownership, backup_id: int, ds_id: int, options_text: str) -> str:
    """``one.image.restore``: ``"<template_id> <image_id> ..."`` (template -1 with ``DISK_ID``)."""
    state = ctx.state
    backup = state.images.get(backup_id)
    target = state.datastores.get(ds_id)
    options = parse_options(options_text)
    disk_ids = check_request(state, backup, target, options)
    links = ctx.connections("restores cannot run")
    # one disk whose size is on record needs nothing read first: its restore is the copy alone
    vm_xml = domain_xml = ""
    sizes = recorded_sizes(backup, disk_ids, options.increment) if options.disk_id is not None else None
    if sizes is None:
        vm_xml, domain_xml = await read_backup(state, links, backup, options.increment,
                                               domain=options.disk_id is None)
        sizes = disk_sizes(vm_xml, disk_ids)
    if target.total_mb > 0 and target.free_mb < sum(sizes.values()):
        raise ActionError(f"Not enough free space in image datastore {target.id}: {sum(sizes.values())} MB needed, "
                          f"{target.free_mb} MB free")
    host = imageds.bridge_host(state, target) or this_machine()
    urls = disk_urls(backup, state.datastores.get(backup.datastore_id), options.increment)
    base = base_name(backup, options)
    created = await _records(ctx, disk_ids, base, owner, target, sizes, urls, backup)
    try:
        template = None  # (NAME, the rest), checked before any data moves
        if options.disk_id is None:
            template = vmtemplates.checked_request(_template(vm_xml, domain_xml, base, created, target,
                                                             options).render())
            vmtemplates.require_free_name(state, owner.uid, template[0])
        runner = links.runner(host)
        await runner.run(["mkdir", "-p", "--", target.base_path], timeout=COMMAND_TIMEOUT)
        for disk_id, image_id in created.items():
            await fetch_disk(links, state, backup, disk_id, host, imageds.image_path(target, image_id, "qcow2"),
                             "qcow2", run_id=image_id, started=_fetch_started, increment_id=options.increment)
        crash_point("image-restore-fetched")
        template_id = await _finish(ctx, owner, created, template)
    except BaseException as exc:
        removed = await shielded_forget(ctx.state, links.runner(host), target, created)
        raise ActionError(f"restore of backup image {backup.id} failed: {exc}; images created before the failure "
                          f"were removed: {', '.join(map(str, removed)) or 'none'}") from exc
    log.info("backup image %s restored into datastore %s: images %s, template %s", backup.id, target.id,
             ", ".join(map(str, created.values())), template_id)
    return " ".join(map(str, [template_id, *created.values()]))


async def _fetch_started(side: str, pgid: int) -> None:
    crash_point("image-restore-fetch")


async def _records(ctx: Daemon, disk_ids: list[int], base: str, owner: Ownership, target: Datastore,
                   sizes: dict[int, int], urls: dict[int, str], backup: Image) -> dict[int, int]:
    """The LOCKED image records, in one transaction: {disk_id: image_id}."""
    created: dict[int, int] = {}
    async with ctx.state.mutation() as m:
        for disk_id in disk_ids:
            image_id = await m.new_id("image")
            m.put("image", new_image(image_id, f"{base}-disk-{disk_id}", disk_id, owner, target, sizes[disk_id],
                                     urls.get(disk_id, ""), backup, ctx.now()))
            created[disk_id] = image_id
        datastore = ctx.state.datastores.editable(target.id)
        datastore.images = sorted({*datastore.images, *created.values()})
        m.put("datastore", datastore)
    return created


async def _finish(ctx: Daemon, owner: Ownership, created: dict[int, int], template: tuple[str, Template] | None) -> int:
    """One transaction: every image READY and the template (if any) created; the template id, or -1. A
    daemon that dies before it finds only LOCKED images at start-up (:func:`recover_interrupted`)."""
    template_id = -1
    async with ctx.state.mutation() as m:
        if template is not None:
            template_id = await vmtemplates.add(ctx.state, m, owner, *template, ctx.now())
        for image_id in created.values():
            image = ctx.state.images.editable(image_id)
            image.state = image.prev_state = ImageState.READY
            m.put("image", image)
    return template_id


def _template(vm_xml: str, domain_xml: str, base: str, created: dict[int, int], target: Datastore,
              options: RestoreOptions) -> Template:
    """The VM template of the restore: the backed-up vm.xml cleaned, plus the re-pointed domain (pure)."""
    cleaned = clean_vm_template(vm_xml, name=base, image_ids=created, no_nic=options.no_nic, no_ip=options.no_ip)
    targets = disk_targets(vm_xml)
    paths = {targets[d]: imageds.image_path(target, image_id, "qcow2") for d, image_id in created.items()}
    domain = restored_domain_xml(domain_xml, name=base, uuid=new_uuid(), disk_paths=paths,
                                 disk_formats=dict.fromkeys(paths, "qcow2"), no_nic=options.no_nic,
                                 no_ip=options.no_ip)
    cleaned.set(DOMAIN_XML_KEY, domain)
    return cleaned


async def shielded_forget(state: State, runner: Runner, target: Datastore, created: dict[int, int]) -> list[int]:
    """Remove what a failed restore created: the files on the datastore's host (``runner``), then the records."""
    removed: list[int] = []
    for image_id in created.values():
        try:
            await runner.run(["rm", "-f", "--", imageds.image_path(target, image_id, "qcow2")], timeout=COMMAND_TIMEOUT)
            await _forget_record(state, image_id, target.id)
            removed.append(image_id)
        except Exception as exc:  # noqa: BLE001 - every image is tried; what is left is logged
            log.error("restore cleanup: cannot remove image %s: %s", image_id, exc)
    return removed


# ---- recovery after a crash of the daemon -----------------------------------------------------------


def interrupted(state: State) -> list[Image]:
    """Images a restore created and never finished: LOCKED, with RESTORED_FROM (pure)."""
    return [image for image in state.images.all()
            if image.state == ImageState.LOCKED and image.template.get("RESTORED_FROM")]


async def recover_interrupted(state: State, links: HostLinks) -> list[int]:
    """At start-up, before the API listens: for each image of a restore the daemon died in, the copy it left
    running is killed, its temporary and final files go, then its record; the ids removed. An image whose
    host cannot be reached stays LOCKED, logged, and is tried again at the next start."""
    removed: list[int] = []
    for image in interrupted(state):
        try:
            target = state.datastores.get(image.datastore_id)
            host = imageds.bridge_host(state, target) or this_machine()
            runner = links.runner(host)
            killed = await kill_marked(runner, temp_path(image.source, "fetch", image.id))
            await remove_temps(runner, image.source, image.id)
            await runner.run(["rm", "-f", "--", image.source], timeout=COMMAND_TIMEOUT)
            await shielded(_forget_record(state, image.id, image.datastore_id))
        except Exception as exc:  # noqa: BLE001 - one image's trouble must not stop the daemon
            log.error("image %s of an interrupted restore (from backup %s) is left LOCKED: %s", image.id,
                      image.template.get("RESTORED_FROM"), exc)
            continue
        removed.append(image.id)
        log.warning("image %s of a restore interrupted by the daemon's death was removed (from backup %s; "
                    "processes killed: %s)", image.id, image.template.get("RESTORED_FROM"),
                    ", ".join(map(str, killed)) or "none")
    return removed


async def _forget_record(state: State, image_id: int, datastore_id: int) -> None:
    """The image's record goes, and its id from its datastore's IMAGES."""
    async with state.mutation() as m:
        m.delete("image", image_id)
        if state.datastores.find(datastore_id) is not None:
            datastore = state.datastores.editable(datastore_id)
            datastore.images = [i for i in datastore.images if i != image_id]
            m.put("datastore", datastore)
