"""``vmsched image``: backup images (OpenNebula's oneimage)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lxml import etree

from scheduler.backup.urls import IMAGE_HEADER, MERGED_HEADER, parse_url
from scheduler.cli.client import DEFAULT_TIMEOUT, UsageError
from scheduler.cli.context import FILTER_ALL, FILTER_MINE_AND_GROUPS, Context, Kind, add_id_command
from scheduler.cli.datastores import DATASTORES
from scheduler.cli.states import IMAGE_STATE_SHORT, IMAGE_STATES, IMAGE_TYPE_SHORT, IMAGE_TYPES, name_of
from scheduler.cli.tables import (
    Column,
    field,
    format_mb,
    format_time,
    ids,
    join_sections,
    parse_xml,
    render_fields,
    render_table,
    render_template,
)
from scheduler.errors import ValidationError, VmschedError
from scheduler.model.template import Template

IMAGES = Kind("image", "one.imagepool.info", "IMAGE_POOL", "IMAGE", (FILTER_ALL, -1, -1))

COLUMNS = (
    Column("ID", lambda i: field(i, "ID"), right=True),
    Column("USER", lambda i: field(i, "UNAME")),
    Column("GROUP", lambda i: field(i, "GNAME")),
    Column("NAME", lambda i: field(i, "NAME")),
    Column("DATASTORE", lambda i: field(i, "DATASTORE")),
    Column("SIZE", lambda i: format_mb(field(i, "SIZE", "0")), right=True),
    Column("TYPE", lambda i: name_of(IMAGE_TYPE_SHORT, field(i, "TYPE"))),
    Column("STAT", lambda i: name_of(IMAGE_STATE_SHORT, field(i, "STATE"))),
)

INCREMENT_COLUMNS = (
    Column("ID", lambda i: field(i, "ID"), right=True),
    Column("PARENT", lambda i: field(i, "PARENT_ID", "-"), right=True),
    Column("TYPE", lambda i: field(i, "TYPE")),
    Column("SIZE", lambda i: format_mb(field(i, "SIZE", "0")), right=True),
    Column("DATE", lambda i: format_time(field(i, "DATE", "0"))),
    Column("SOURCE", lambda i: field(i, "SOURCE")),
)


def render_image(image: etree._Element) -> str:
    increments = image.findall("BACKUP_INCREMENTS/INCREMENT")
    vms = ids(image, "VMS")
    return join_sections([
        render_fields(f"IMAGE {field(image, 'ID')} INFORMATION", [
            ("ID", field(image, "ID")),
            ("NAME", field(image, "NAME")),
            ("USER", field(image, "UNAME")),
            ("GROUP", field(image, "GNAME")),
            ("DATASTORE", field(image, "DATASTORE")),
            ("TYPE", name_of(IMAGE_TYPES, field(image, "TYPE"))),
            ("REGISTER TIME", format_time(field(image, "REGTIME", "0"))),
            ("SOURCE", field(image, "SOURCE", "-")),
            ("FORMAT", field(image, "FORMAT", "-")),
            ("SIZE", format_mb(field(image, "SIZE", "0"))),
            ("STATE", name_of(IMAGE_STATES, field(image, "STATE"))),
            ("VMS", ",".join(vms) if vms else "-"),
        ]),
        "BACKUP INCREMENTS\n" + render_table(INCREMENT_COLUMNS, increments) if increments else "",
        render_template("IMAGE TEMPLATE", image.find("TEMPLATE")),
    ])  # fmt: skip


def list_images(ctx: Context, args: argparse.Namespace) -> int:
    who = FILTER_ALL if args.all else FILTER_MINE_AND_GROUPS
    ctx.print_pool(IMAGES, ctx.call("one.imagepool.info", who, -1, -1), COLUMNS)
    return 0


def show(ctx: Context, args: argparse.Namespace) -> int:
    ctx.print_object(ctx.call("one.image.info", ctx.resolve(IMAGES, args.image), False), render_image)
    return 0


def delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.call("one.image.delete", ctx.resolve(IMAGES, args.image), args.force)
    return 0


# ---- download by URL --------------------------------------------------------------------------------------

VERIFY_TIMEOUT = 6 * 3600.0  # seconds a verify call may take unless --timeout says otherwise: whole disks are read


def download(ctx: Context, args: argparse.Namespace) -> int:
    """Stream one backed-up disk to FILE (atomically) or standard output, then check its sha256 against the
    image's CHECKSUMS; a mismatch fails (and leaves no FILE). A later increment of a chain comes merged from
    its links, which the daemon checked against their own CHECKSUMS before merging."""
    try:
        url = parse_url(args.url)
    except ValidationError as exc:
        raise UsageError(str(exc)) from None
    client = ctx.client()
    digest = hashlib.sha256()
    with _sink(ctx, args.target) as write:

        def take(chunk: bytes) -> None:
            digest.update(chunk)
            write(chunk)

        headers = client.stream("/download", {"url": args.url}, take)
        image_id = int(headers.get(IMAGE_HEADER, "-1"))
        merged = headers.get(MERGED_HEADER)
        if merged is not None:
            if args.target != "-":
                ctx.print(f"{args.target}: {url.file_name} of image {image_id}, merged from {merged} links, each "
                          "verified against its recorded sha256 on the backup server")
            return 0
        image = parse_xml(str(ctx.call("one.image.info", image_id, False)))
        recorded = {c.findtext("FILE"): (c.findtext("SHA256") or "").lower() for c in image.iterfind("TEMPLATE/CHECKSUMS")}
        expected = recorded.get(url.file_name)
        if expected is not None and expected != digest.hexdigest():
            where = "standard output" if args.target == "-" else "the download was removed"
            raise VmschedError(f"{url.file_name} of image {image_id}: sha256 {digest.hexdigest()} differs from the "
                               f"{expected} recorded at backup time ({where})")
    if expected is None:
        ctx.err.write(f"warning: image {image_id} has no checksum recorded for {url.file_name}: not verified\n")
    elif args.target != "-":
        ctx.print(f"{args.target}: {url.file_name} of image {image_id}, sha256 {expected} verified")
    return 0


@contextlib.contextmanager
def _sink(ctx: Context, target: str) -> Iterator[Callable[[bytes], Any]]:
    """Where the bytes go: standard output for ``-``, else a temporary file beside ``target`` renamed onto it
    when the block succeeds, removed when it fails."""
    if target == "-":
        ctx.out.flush()
        stdout: BinaryIO = getattr(ctx.out, "buffer", None) or sys.stdout.buffer
        yield stdout.write
        stdout.flush()
        return
    path = Path(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            yield file.write
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---- verify -------------------------------------------------------------------------------------------------

FILE_COLUMNS = (
    Column("FILE", lambda f: str(f["FILE"])),
    Column("SHA256", lambda f: "ok" if f["SHA256_OK"] else "BAD"),
    Column("CHECK", lambda f: str(f["CHECK"])),
)


def verify(ctx: Context, args: argparse.Namespace) -> int:
    """``vmsched.image.verify``: exit status 1 when the backup did not verify."""
    if args.timeout == DEFAULT_TIMEOUT:  # the client is made at the first call, with this timeout
        args.timeout = VERIFY_TIMEOUT
    result = ctx.call("vmsched.image.verify", ctx.resolve(IMAGES, args.image), args.increment)
    assert isinstance(result, dict)
    if ctx.output == "json":
        ctx.print(json.dumps(result, indent=2))
    elif ctx.output == "xml":
        ctx.print(_verification_xml(result))
    else:
        ctx.print(render_table(FILE_COLUMNS, result.get("FILES") or []))
        ctx.print(f"VERIFIED: {'YES' if result.get('OK') else 'NO'}: {result.get('MESSAGE', '')}")
    return 0 if result.get("OK") else 1


def _verification_xml(result: dict[str, Any]) -> str:
    root = etree.Element("VERIFICATION")
    etree.SubElement(root, "OK").text = "YES" if result.get("OK") else "NO"
    etree.SubElement(root, "MESSAGE").text = str(result.get("MESSAGE", ""))
    files = etree.SubElement(root, "FILES")
    for item in result.get("FILES") or []:
        entry = etree.SubElement(files, "FILE")
        for key in ("FILE", "SHA256_OK", "CHECK"):
            value = item.get(key)
            etree.SubElement(entry, key).text = ("YES" if value else "NO") if isinstance(value, bool) else str(value)
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def restore(ctx: Context, args: argparse.Namespace) -> int:
    """``image restore IMG -d DS [...]``: new images (and a VM template) from a backup (oneimage restore)."""
    image_id = ctx.resolve(IMAGES, args.image)
    ds_id = ctx.resolve(DATASTORES, args.datastore)
    options = Template()
    for flag, key in ((args.no_nic, "NO_NIC"), (args.no_ip, "NO_IP")):
        if flag:
            options.set(key, "YES")
    if args.name:
        options.set("NAME", args.name)
    if args.increment is not None:
        options.set("INCREMENT_ID", str(args.increment))
    if args.disk_id is not None:
        options.set("DISK_ID", str(args.disk_id))
    template_id, *image_ids = str(ctx.call("one.image.restore", image_id, ds_id, options.render())).split()
    if ctx.output == "json":
        ctx.print(json.dumps({"TEMPLATE_ID": int(template_id), "IMAGE_IDS": [int(i) for i in image_ids]}))
        return 0
    if template_id != "-1":
        ctx.print(f"VM Template: {template_id}")
    ctx.print(f"Images: {' '.join(image_ids)}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("image", help="backup images (oneimage)", parents=[common])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("list", help="list my images and my groups' images", parents=[common])
    p.add_argument("--all", action="store_true", help="every image I may see")
    p.set_defaults(handler=list_images)

    add_id_command(sub, common, "show", "show an image", "image", show)
    p = add_id_command(sub, common, "delete", "delete an image and its backup data", "image", delete)
    p.add_argument("--force", action="store_true", help="delete even if the datastore cannot remove the data")

    p = sub.add_parser("download", parents=[common], help="download one backed-up disk by its backup URL",
                       description="Stream the qcow2 file a backup URL names (see BACKUP_URL in `image show`) and "
                                   "check it against the sha256 recorded at backup time.")
    p.add_argument("url", metavar="URL", help="backup URL, e.g. rsync://100//0:8a3454//path/6/8a3454/disk.0.0")
    p.add_argument("-o", "--output-file", dest="target", metavar="FILE", required=True,
                   help="file to write (replaced only when the whole download verified), - for standard output")
    p.set_defaults(handler=download)

    p = add_id_command(sub, common, "restore", "restore a backup as new images (and a VM template) in an image "
                       "datastore", "image", restore)
    p.add_argument("-d", "--datastore", metavar="DS", required=True, help="image datastore id or name")
    p.add_argument("--no-nic", action="store_true", help="drop the NICs from the template")
    p.add_argument("--no-ip", action="store_true", help="drop the NICs' addresses (IP, MAC) from the template")
    p.add_argument("--name", help="base name of the new objects (default: <vm_id>-<backup id>)")
    p.add_argument("--increment", type=int, metavar="N", help="the increment to restore (default: the last)")
    p.add_argument("--disk-id", type=int, metavar="N", help="only this disk, and no VM template")

    p = add_id_command(sub, common, "verify", "re-read a backup on its server and check it (no restore)", "image",
                       verify)
    p.add_argument("--increment", type=int, default=-1, metavar="N", help="the increment to check (default: last)")
