"""Where backups live in a backup datastore and how they are named (spec §5.3, §5.4); pure.

Layout: ``<BASE_PATH>/<vm_id>/<backup_id>/`` holding ``vm.xml``, ``domain.xml`` and ``disk.<disk_id>.<inc>``;
an upload in flight lives in ``<BASE_PATH>/<vm_id>/.tmp-<backup_id>/`` until every file has arrived.

Every value that comes from a template or a request (BASE_PATH, VM id, backup id, file name) is checked
here before it becomes part of a path, so nothing can point outside the datastore directory, and paths keep
to a plain character set that no remote shell (rsync's remote argument, ssh's command line) reinterprets.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from lxml import etree

from scheduler.errors import ValidationError

TMP_PREFIX = ".tmp-"
BACKUP_ID_CHARS = 6  # OpenNebula's rsync driver: first 6 hex chars of a random hex string
VM_XML = "vm.xml"
DOMAIN_XML = "domain.xml"

_SAFE_PATH = re.compile(r"/[A-Za-z0-9_.+@,=/-]*\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
_BACKUP_ID = re.compile(r"[0-9a-f]{6,64}\Z")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\Z")
_DISK_FILE = re.compile(r"disk\.([0-9]+)\.")


# --- validation ---------------------------------------------------------------------------------------------

def check_path(path: str, what: str = "BASE_PATH") -> str:
    """An absolute directory path without ``.``/``..`` components or unusual characters, trailing ``/`` dropped."""
    if not isinstance(path, str) or not _SAFE_PATH.match(path):
        raise ValidationError(f"{what} must be an absolute path of letters, digits and _.+@,=/-, got {path!r}")
    parts = [part for part in path.split("/") if part]
    if not parts:
        raise ValidationError(f"{what} cannot be the root directory")
    if any(part in (".", "..") for part in parts):
        raise ValidationError(f"{what} must not contain '.' or '..' components, got {path!r}")
    return "/" + "/".join(parts)


def check_id(value: object, what: str = "VM id") -> int:
    """A non-negative object id given as an int or a string of digits."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationError(f"{what} must be a number, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValidationError(f"{what} must not be negative, got {value}")
        return value
    if not _DIGITS.match(value):
        raise ValidationError(f"{what} must be digits only, got {value!r}")
    return int(value)


def check_backup_id(value: object) -> str:
    """A backup id (a backup directory's name): 6 to 64 lowercase hex characters."""
    if not isinstance(value, str) or not _BACKUP_ID.match(value):
        raise ValidationError(f"backup id must be 6-64 lowercase hex characters, got {value!r}")
    return value


def check_file_name(name: object) -> str:
    """The name of one file of a backup (``vm.xml``, ``disk.0.0``): no directory part, no leading dot."""
    if not isinstance(name, str) or not _FILE_NAME.match(name):
        raise ValidationError(f"backup file name must be letters, digits and _.+- (no '/', no leading '.'), "
                              f"got {name!r}")
    return name


def random_backup_id() -> str:
    return secrets.token_hex(BACKUP_ID_CHARS // 2)


def disk_file_name(disk_id: int, increment: int) -> str:
    return f"disk.{check_id(disk_id, 'disk id')}.{check_id(increment, 'increment id')}"


def disk_index(file_name: str) -> int:
    """The disk id of ``disk.<idx>.<inc>`` (also ``disk.<idx>.rbd2``, ``disk.<idx>.<n>.rbdiff``)."""
    match = _DISK_FILE.match(file_name.rsplit("/", 1)[-1])
    if match is None:
        raise ValidationError(f"not a disk file name (disk.<id>.<increment>): {file_name!r}")
    return int(match.group(1))


# --- paths ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """The paths of one datastore's tree; every method checks its arguments."""

    base_path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_path", check_path(self.base_path))

    def vm_dir(self, vm_id: int | str) -> str:
        return f"{self.base_path}/{check_id(vm_id)}"

    def backup_dir(self, vm_id: int | str, backup_id: str) -> str:
        return f"{self.vm_dir(vm_id)}/{check_backup_id(backup_id)}"

    def tmp_dir(self, vm_id: int | str, backup_id: str) -> str:
        return f"{self.vm_dir(vm_id)}/{TMP_PREFIX}{check_backup_id(backup_id)}"

    def file_path(self, vm_id: int | str, backup_id: str, name: str) -> str:
        return f"{self.backup_dir(vm_id, backup_id)}/{check_file_name(name)}"


def tmp_backup_id(dir_name: str) -> str | None:
    """The backup id of a ``.tmp-<id>`` directory name, None for anything else."""
    if not dir_name.startswith(TMP_PREFIX):
        return None
    rest = dir_name[len(TMP_PREFIX):]
    return rest if _BACKUP_ID.match(rest) else None


# --- increment chains of backup URLs (spec §5.3; the URLs: scheduler/backup/urls.py) ----------------------------------------------------------------------------------

Chain = tuple[tuple[int, str], ...]


def chain_text(chain: Chain) -> str:
    return ",".join(f"{inc}:{source}" for inc, source in chain)


def chain_up_to(chain: Chain, increment_id: int | None = None) -> Chain:
    """The chain cut after ``increment_id`` (None: the whole chain)."""
    if increment_id is None:
        return chain
    cut = tuple(link for link in chain if link[0] <= increment_id)
    if not cut or cut[-1][0] != increment_id:
        raise ValidationError(f"increment {increment_id} is not in the chain {chain_text(chain)!r}")
    return cut


def parse_chain(text: str) -> Chain:
    links = []
    for item in text.split(","):
        inc, sep, source = item.partition(":")
        if not sep or not source or not inc.isdigit():
            raise ValidationError(f"bad chain element {item!r} (expected <increment id>:<source>)")
        links.append((check_id(inc, "increment id"), source))
    return tuple(links)


def disk_size_mb(vm_xml: bytes | str, disk_id: int) -> int:
    """``DISK[DISK_ID=disk_id]/SIZE`` (MB) from a backup's ``vm.xml`` (an OpenNebula VM document)."""
    try:
        root = etree.fromstring(vm_xml.encode() if isinstance(vm_xml, str) else vm_xml,
                                parser=etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        raise ValidationError(f"vm.xml does not parse: {exc}") from None
    for disk in root.iter("DISK"):
        if (disk.findtext("DISK_ID") or "").strip() == str(disk_id):
            size = (disk.findtext("SIZE") or "").strip()
            if not _DIGITS.match(size):
                raise ValidationError(f"vm.xml: disk {disk_id} has no numeric SIZE ({size!r})")
            return int(size)
    raise ValidationError(f"vm.xml has no disk {disk_id}")
