"""A virtual machine: the vm.xsd body (one.vm.info), the short vm_pool.xsd body (one.vmpool.info),
and how a user-supplied template splits into TEMPLATE and USER_TEMPLATE (spec §1.5).

vm.xsd closes the VM TEMPLATE: only the names of ``TEMPLATE_SLOTS`` may appear there, in that order,
each with its shape. Anything else belongs in USER_TEMPLATE; rendering moves any stray attribute
there too, so the XML always validates. ``VMID`` is written from the VM's id and ``SCHED_ACTION``
bodies are injected at render time (they are objects of their own), so neither is stored in
``Vm.template``. Building the elements does no schema work: the short body for 10,000 VMs is cheap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from lxml import etree

from scheduler.errors import ValidationError
from scheduler.model.objects.common import (
    DEFAULT_PERMISSIONS,
    Element,
    Ownership,
    Permissions,
    SubElement,
    add_int,
    add_text,
    read_ids,
    read_int,
    read_template,
    read_text,
    read_vector,
)
from scheduler.model.objects.states import LcmState, VmState, parse_code
from scheduler.model.template import Template, Value, Vector, append_attributes

SINGLE, VECTOR, ANY = "single", "vector", "any"
STRING, DECIMAL, INTEGER = "string", "decimal", "integer"
_DECIMAL_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


@dataclass(frozen=True)
class Slot:
    """What vm.xsd admits for one TEMPLATE name."""

    shape: str = SINGLE
    text: str = STRING  # the type of a single value
    many: bool = False
    keys: tuple[str, ...] | None = None  # a closed vector: exactly these keys, in this order
    required: frozenset[str] = frozenset()
    first: tuple[str, ...] = ()  # open vectors: keys written before the others
    last: tuple[str, ...] = ()  # ... and after them
    int_keys: frozenset[str] = frozenset()
    one_key: bool = False  # a vector of exactly one pair (vm_pool.xsd's USER_TEMPLATE/SCHED_ACTION)

    def fits(self, value: Value) -> bool:
        if self.shape == ANY:
            return True
        if self.shape == SINGLE:
            return isinstance(value, str) and (self.text == STRING or _has_type(value, self.text))
        if not isinstance(value, Vector) or (self.one_key and len(value) != 1):
            return False
        if self.keys is None and not self.required and not self.int_keys:
            return True
        names = set(value.keys())
        if self.keys is not None and not names <= set(self.keys):
            return False
        return self.required <= names and all(_is_int(value[key]) for key in self.int_keys & names)

    def admit(self, values: Sequence[Value]) -> tuple[list[Value], list[Value]]:
        """(values TEMPLATE takes, values left over for USER_TEMPLATE)."""
        fit: list[Value] = []
        unfit: list[Value] = []
        for value in values:
            (fit if self.fits(value) else unfit).append(value)
        if not self.many:
            return fit[:1], fit[1:] + unfit
        return fit, unfit

    def pairs(self, vector: Vector) -> list[tuple[str, str]]:
        if self.keys is None and not self.first and not self.last:
            return vector.items()
        return [(key, vector[key]) for key in self.key_order(vector)]

    def key_order(self, vector: Vector) -> list[str]:
        if self.keys is None and not self.first and not self.last:
            return vector.keys()
        if self.keys is not None:
            return [key for key in self.keys if key in vector]
        ends = set(self.first) | set(self.last)
        middle = [key for key in vector.keys() if key not in ends]
        return [k for k in self.first if k in vector] + middle + [k for k in self.last if k in vector]


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _has_type(text: str, kind: str) -> bool:
    if kind == INTEGER:
        return _is_int(text)
    return kind != DECIMAL or _DECIMAL_RE.fullmatch(text.strip()) is not None


SCHED_ACTION_KEYS = (
    "ID", "PARENT_ID", "TYPE", "ACTION", "ARGS", "TIME", "REPEAT", "DAYS",
    "END_TYPE", "END_VALUE", "DONE", "MESSAGE", "WARNING",
)  # fmt: skip
_SCHED_ACTION_INTS = frozenset({"ID", "PARENT_ID", "REPEAT", "END_TYPE", "END_VALUE", "DONE", "WARNING"})

_ONE = Slot()
_ANY = Slot(ANY)
_OPEN_VECTORS = Slot(VECTOR, many=True)
TEMPLATE_SLOTS: dict[str, Slot] = {
    "AUTOMATIC_DS_REQUIREMENTS": _ONE,
    "AUTOMATIC_NIC_REQUIREMENTS": _ONE,
    "AUTOMATIC_REQUIREMENTS": _ONE,
    "CLONING_TEMPLATE_ID": _ONE,
    "CONTEXT": _ANY,
    "CPU": _ONE,
    "CPU_COST": _ONE,
    "DISK": _OPEN_VECTORS,
    "DISK_COST": _ONE,
    "EMULATOR": _ONE,
    "FEATURES": _ANY,
    "HYPERV_OPTIONS": _ANY,
    "GRAPHICS": _ANY,
    "VIDEO": Slot(VECTOR, keys=("TYPE", "IOMMU", "ATS", "VRAM", "RESOLUTION"), int_keys=frozenset({"VRAM"})),
    "IMPORTED": _ONE,
    "INPUT": _ANY,
    "MEMORY": _ONE,
    "MEMORY_COST": _ONE,
    "MEMORY_MAX": _ONE,
    "MEMORY_SLOTS": _ONE,
    "MEMORY_RESIZE_MODE": _ONE,
    "NIC": _OPEN_VECTORS,
    "NIC_ALIAS": Slot(
        VECTOR,
        many=True,
        required=frozenset({"ALIAS_ID", "PARENT", "PARENT_ID"}),
        first=("ALIAS_ID",),
        last=("PARENT", "PARENT_ID"),
    ),
    "NIC_DEFAULT": _ANY,
    "NUMA_NODE": _ANY,
    "OS": _ANY,
    "PCI": Slot(ANY, many=True),
    "RAW": _ANY,
    "SECURITY_GROUP_RULE": Slot(ANY, many=True),
    "SNAPSHOT": Slot(
        VECTOR,
        many=True,
        keys=("ACTION", "ACTIVE", "HYPERVISOR_ID", "NAME", "SNAPSHOT_ID", "SYSTEM_DISK_SIZE", "TIME"),
        required=frozenset({"HYPERVISOR_ID", "NAME", "SNAPSHOT_ID", "SYSTEM_DISK_SIZE", "TIME"}),
    ),
    "SPICE_OPTIONS": _ANY,
    "SUBMIT_ON_HOLD": _ONE,
    "TEMPLATE_ID": _ONE,
    "TM_MAD_SYSTEM": _ONE,
    "TOPOLOGY": _ANY,
    "TPM": Slot(VECTOR, keys=("MODEL",), required=frozenset({"MODEL"})),
    "VCPU": _ONE,
    "VCPU_MAX": _ONE,
    "VMGROUP": _ANY,
    "VMID": _ONE,
    "VROUTER_ID": _ONE,
    "VROUTER_KEEPALIVED_ID": _ONE,
    "VROUTER_KEEPALIVED_PASSWORD": _ONE,
    "SCHED_ACTION": Slot(
        VECTOR, many=True, keys=SCHED_ACTION_KEYS, required=frozenset(SCHED_ACTION_KEYS), int_keys=_SCHED_ACTION_INTS
    ),
}
# Names the core sets itself: never taken from a user template, never stored in Vm.template.
CORE_NAMES = frozenset({"VMID", "SCHED_ACTION"})
# Consumed when a VM is allocated: NAME becomes the VM's NAME, SCHED_ACTIONs become objects.
ALLOCATE_CONSUMED = frozenset({"NAME", "SCHED_ACTION"})
SHORT_TEMPLATE_SLOTS = {name: TEMPLATE_SLOTS[name] for name in ("CPU", "MEMORY", "VCPU", "DISK", "NIC", "GRAPHICS")}

_DEC = Slot(text=DECIMAL)
_INT = Slot(text=INTEGER)


def _rates(stem: str) -> dict[str, Slot]:
    return {stem: _DEC, f"{stem}_BW": _DEC, f"{stem}_BW_FORECAST": _DEC, f"{stem}_BW_FORECAST_FAR": _DEC}


# vm.xsd's MONITORING: these names first, in this order, then anything.
MONITORING_SLOTS: dict[str, Slot] = {
    "CPU": _DEC,
    "CPU_FORECAST": _DEC,
    "CPU_FORECAST_FAR": _DEC,
    **_rates("DISKRDBYTES"),
    **_rates("DISKRDIOPS"),
    **_rates("DISKWRBYTES"),
    **_rates("DISKWRIOPS"),
    "DISK_SIZE": Slot(
        VECTOR, many=True, keys=("ID", "SIZE"), required=frozenset({"ID", "SIZE"}), int_keys=frozenset({"ID", "SIZE"})
    ),
    "ID": _INT,
    "MEMORY": _DEC,
    **_rates("NETRX"),
    **_rates("NETTX"),
    "TIMESTAMP": _INT,
}
# vm_pool.xsd's USER_TEMPLATE: these names first, in this order, then anything.
SHORT_USER_TEMPLATE_SLOTS: dict[str, Slot] = {
    **{
        name: _ONE
        for name in (
            "LABELS",
            "ERROR",
            "SCHED_MESSAGE",
            "SCHED_RANK",
            "SCHED_DS_RANK",
            "SCHED_REQUIREMENTS",
            "SCHED_DS_REQUIREMENTS",
            "USER_PRIORITY",
        )
    },  # fmt: skip
    "SCHED_ACTION": Slot(VECTOR, many=True, one_key=True),
}

BACKUP_CONFIG_KEYS = (
    "BACKUP_JOB_ID", "BACKUP_VOLATILE", "FS_FREEZE", "INCREMENTAL_BACKUP_ID", "INCREMENT_MODE",
    "KEEP_LAST", "LAST_BACKUP_ID", "LAST_BACKUP_SIZE", "LAST_BRIDGE", "LAST_DATASTORE_ID",
    "LAST_INCREMENT_ID", "MODE",
)  # fmt: skip


def split_vm_template(template: Template) -> tuple[Template, Template]:
    """(TEMPLATE, USER_TEMPLATE) of a new VM from the template the user gave.

    A name vm.xsd lists goes to TEMPLATE when its value has the listed shape (single value or
    vector, admitted keys); extra occurrences of a name listed once, misshapen values and unlisted
    names go to USER_TEMPLATE. NAME, SCHED_ACTION and VMID go to neither: read NAME and the
    SCHED_ACTION vectors from the input before splitting.
    """
    kept, user = Template(), Template()
    for name in template.names():
        if name in ALLOCATE_CONSUMED or name in CORE_NAMES:
            continue
        slot = TEMPLATE_SLOTS.get(name)
        admitted, others = slot.admit(template.values(name)) if slot else ([], template.values(name))
        kept.attributes.extend((name, _copy(value)) for value in admitted)
        user.attributes.extend((name, _copy(value)) for value in others)
    return kept, user


def _copy(value: Value) -> Value:
    return value.copy() if isinstance(value, Vector) else value


@dataclass
class History:
    """One placement of the VM on a host (``HISTORY_RECORDS/HISTORY``); the last one is current."""

    seq: int
    hostname: str
    hid: int
    ds_id: int = 0
    cid: int = 0
    stime: int = 0
    etime: int = 0
    vm_mad: str = "kvm"
    tm_mad: str = "ssh"
    action: int = 0  # HistoryAction code
    plan_id: int = -1
    action_id: int = -1
    pstime: int = 0
    petime: int = 0
    rstime: int = 0
    retime: int = 0
    estime: int = 0
    eetime: int = 0
    uid: int = -1
    gid: int = -1
    request_id: str = "-1"

    def write(self, parent: Element, oid: int) -> None:
        history = SubElement(parent, "HISTORY")
        for tag, value in (
            ("OID", oid), ("SEQ", self.seq), ("HOSTNAME", self.hostname), ("HID", self.hid),
            ("CID", self.cid), ("STIME", self.stime), ("ETIME", self.etime), ("VM_MAD", self.vm_mad),
            ("TM_MAD", self.tm_mad), ("DS_ID", self.ds_id), ("PLAN_ID", self.plan_id),
            ("ACTION_ID", self.action_id), ("PSTIME", self.pstime), ("PETIME", self.petime),
            ("RSTIME", self.rstime), ("RETIME", self.retime), ("ESTIME", self.estime),
            ("EETIME", self.eetime), ("ACTION", self.action), ("UID", self.uid), ("GID", self.gid),
            ("REQUEST_ID", self.request_id),
        ):  # fmt: skip
            SubElement(history, tag).text = value if isinstance(value, str) else str(int(value))

    def short_xml(self, oid: int) -> str:
        return (
            f"<HISTORY><OID>{int(oid)}</OID><SEQ>{int(self.seq)}</SEQ><HOSTNAME>{_esc(self.hostname)}</HOSTNAME>"
            f"<HID>{int(self.hid)}</HID><CID>{int(self.cid)}</CID><DS_ID>{int(self.ds_id)}</DS_ID>"
            f"<VM_MAD>{_esc(self.vm_mad)}</VM_MAD><TM_MAD>{_esc(self.tm_mad)}</TM_MAD>"
            f"<ACTION>{int(self.action)}</ACTION></HISTORY>"
        )

    @classmethod
    def read(cls, element: Element) -> History:
        ints = {
            name: read_int(element, name.upper(), default)
            for name, default in (
                ("ds_id", 0), ("cid", 0), ("stime", 0), ("etime", 0), ("action", 0), ("plan_id", -1),
                ("action_id", -1), ("pstime", 0), ("petime", 0), ("rstime", 0), ("retime", 0),
                ("estime", 0), ("eetime", 0), ("uid", -1), ("gid", -1),
            )
        }  # fmt: skip
        return cls(
            seq=read_int(element, "SEQ"),
            hostname=read_text(element, "HOSTNAME"),
            hid=read_int(element, "HID"),
            vm_mad=read_text(element, "VM_MAD", "kvm"),
            tm_mad=read_text(element, "TM_MAD", "ssh"),
            request_id=read_text(element, "REQUEST_ID", "-1"),
            **ints,
        )


@dataclass
class Vm:
    id: int
    name: str
    ownership: Ownership = field(default_factory=Ownership)
    permissions: Permissions = DEFAULT_PERMISSIONS
    state: VmState = VmState.PENDING
    lcm_state: LcmState = LcmState.LCM_INIT
    prev_state: VmState = VmState.PENDING
    prev_lcm_state: LcmState = LcmState.LCM_INIT
    last_poll: int = 0
    resched: int = 0
    stime: int = 0
    etime: int = 0
    deploy_id: str = ""
    monitoring: Template = field(default_factory=Template)
    sched_actions: list[int] = field(default_factory=list)  # ids of the VM's SchedAction objects
    template: Template = field(default_factory=Template)
    user_template: Template = field(default_factory=Template)
    history: list[History] = field(default_factory=list)
    backup_config: Vector = field(default_factory=Vector)
    backup_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Id lists are sets, kept sorted as OpenNebula writes them."""
        self.sched_actions = sorted(set(self.sched_actions))
        self.backup_ids = sorted(set(self.backup_ids))

    @property
    def host(self) -> tuple[int, str] | None:
        """(HID, HOSTNAME) of the current placement, None when the VM was never placed."""
        if not self.history:
            return None
        last = self.history[-1]
        return last.hid, last.hostname

    @property
    def uuid(self) -> str | None:
        """The libvirt domain UUID (TEMPLATE/OS/UUID)."""
        os = self.template.get_vector("OS")
        return None if os is None else os.get("UUID")

    @uuid.setter
    def uuid(self, value: str) -> None:
        os = self.template.get_vector("OS")
        if os is None:
            os = Vector()
            self.template.add("OS", os)
        os["UUID"] = value

    # -- XML ------------------------------------------------------------------------------------
    def to_element(self, extended: bool = True, sched_actions: Iterable[Vector] = (), storage: bool = False) -> Element:
        """The vm.xsd body, or with ``extended=False`` the vm_pool.xsd one (one.vmpool.info).

        ``storage=True`` keeps BACKUP_CONFIG keys vm.xsd does not list (ACTIVE_FLATTEN,
        LAST_BACKUP_FORMAT), after the listed ones: lossless, for the store, not for clients.
        """
        if extended:
            return self._extended(sched_actions, storage)
        return etree.fromstring(self.short_xml())

    def to_xml(self, extended: bool = True, sched_actions: Iterable[Vector] = (), storage: bool = False) -> str:
        if not extended:
            return self.short_xml()
        return etree.tostring(self._extended(sched_actions, storage), encoding="unicode")

    def _head(self, vm: Element) -> None:
        add_int(vm, "ID", self.id)
        self.ownership.write(vm)
        add_text(vm, "NAME", self.name)
        vm.append(self.permissions.to_element())
        for tag, number in (
            ("LAST_POLL", self.last_poll), ("STATE", self.state), ("LCM_STATE", self.lcm_state),
            ("PREV_STATE", self.prev_state), ("PREV_LCM_STATE", self.prev_lcm_state), ("RESCHED", self.resched),
            ("STIME", self.stime), ("ETIME", self.etime),
        ):  # fmt: skip
            add_int(vm, tag, number)
        add_text(vm, "DEPLOY_ID", self.deploy_id)

    def short_xml(self) -> str:
        """The vm_pool.xsd body as text. one.vmpool.info's hot path: plain string building, no lxml."""
        owner = self.ownership
        parts = [
            f"<VM><ID>{int(self.id)}</ID><UID>{int(owner.uid)}</UID><GID>{int(owner.gid)}</GID>"
            f"<UNAME>{_esc(owner.uname)}</UNAME><GNAME>{_esc(owner.gname)}</GNAME><NAME>{_esc(self.name)}</NAME>"
            f"<LAST_POLL>{int(self.last_poll)}</LAST_POLL><STATE>{int(self.state)}</STATE>"
            f"<LCM_STATE>{int(self.lcm_state)}</LCM_STATE><RESCHED>{int(self.resched)}</RESCHED>"
            f"<STIME>{int(self.stime)}</STIME><ETIME>{int(self.etime)}</ETIME>"
            f"<DEPLOY_ID>{_esc(self.deploy_id)}</DEPLOY_ID><TEMPLATE>"
        ]
        add = parts.append
        for name, value, slot in _declared(_grouped(self.template.attributes), SHORT_TEMPLATE_SLOTS):
            add(_value_xml(name, value, slot))
        add("</TEMPLATE><MONITORING>")
        for name, value in self.monitoring.sorted_attributes():
            add(_value_xml(name, value))
        add("</MONITORING><USER_TEMPLATE>")
        user = _grouped(self.user_template.attributes)
        for name, value, slot in _declared(user, SHORT_USER_TEMPLATE_SLOTS):
            add(_value_xml(name, value, slot))
        for name, value in _rest(user, SHORT_USER_TEMPLATE_SLOTS):
            add(_value_xml(name, value))
        add("</USER_TEMPLATE><HISTORY_RECORDS>")
        if self.history:
            add(self.history[-1].short_xml(self.id))
        add("</HISTORY_RECORDS></VM>")
        return "".join(parts)

    def _extended(self, sched_actions: Iterable[Vector], storage: bool) -> Element:
        vm = etree.Element("VM")
        self._head(vm)
        monitoring = SubElement(vm, "MONITORING")
        values = _grouped(self.monitoring.attributes)
        for name, value, slot in _declared(values, MONITORING_SLOTS):
            _write_value(monitoring, name, value, slot)
        append_attributes(monitoring, _rest(values, MONITORING_SLOTS))
        ids = SubElement(vm, "SCHED_ACTIONS")
        for oid in sorted(self.sched_actions):
            SubElement(ids, "ID").text = str(oid)
        strays = self._write_template(SubElement(vm, "TEMPLATE"), sched_actions)
        user = self.user_template.sorted_attributes()
        if strays:
            user = sorted(user + strays, key=lambda item: item[0])
        append_attributes(SubElement(vm, "USER_TEMPLATE"), user)
        records = SubElement(vm, "HISTORY_RECORDS")
        for history in self.history:
            history.write(records, self.id)
        self._write_backups(vm, storage)
        return vm

    def _write_template(self, element: Element, sched_actions: Iterable[Vector]) -> list[tuple[str, Value]]:
        """Write TEMPLATE in schema order; return the attributes it cannot hold."""
        grouped = _grouped(self.template.attributes)
        strays: list[tuple[str, Value]] = []
        for name, slot in TEMPLATE_SLOTS.items():
            values = grouped.pop(name, [])
            if name == "VMID":
                SubElement(element, "VMID").text = str(self.id)
            elif name == "SCHED_ACTION":
                for action in sched_actions:
                    _write_vector(element, name, self._sched_action(action), slot)
            else:
                admitted, others = slot.admit(values)
                if name == "TM_MAD_SYSTEM" and not admitted:
                    admitted = [""]
                for value in admitted:
                    _write_value(element, name, value, slot)
                strays.extend((name, value) for value in others)
        strays.extend((name, value) for name, values in grouped.items() if name not in CORE_NAMES for value in values)
        return strays

    def _sched_action(self, action: Vector) -> Vector:
        """A SCHED_ACTION body with every key the schema requires (defaults for the optional ones)."""
        missing = [key for key in ("ID", "ACTION", "TIME") if key not in action]
        if missing:
            raise ValidationError(f"SCHED_ACTION of VM {self.id} has no {', '.join(missing)}")
        full = action.copy()
        for key, default in (
            ("PARENT_ID", str(self.id)), ("TYPE", "VM"), ("ARGS", ""), ("REPEAT", "-1"), ("DAYS", ""),
            ("END_TYPE", "-1"), ("END_VALUE", "-1"), ("DONE", "-1"), ("MESSAGE", ""), ("WARNING", "0"),
        ):  # fmt: skip
            full.setdefault(key, default)
        return full

    def _write_backups(self, vm: Element, storage: bool) -> None:
        backups = SubElement(vm, "BACKUPS")
        config = SubElement(backups, "BACKUP_CONFIG")
        for key in BACKUP_CONFIG_KEYS:
            value = self.backup_config.get(key)
            if value is not None:
                SubElement(config, key).text = value
        if storage:
            for key, value in self.backup_config.items():
                if key not in BACKUP_CONFIG_KEYS:
                    SubElement(config, key).text = value
        ids = SubElement(backups, "BACKUP_IDS")
        for oid in sorted(self.backup_ids):
            SubElement(ids, "ID").text = str(oid)

    @classmethod
    def from_element(cls, element: Element) -> Vm:
        """A Vm from either body; what the short body lacks takes its default."""
        permissions = element.find("PERMISSIONS")
        backups = element.find("BACKUPS")
        records = element.find("HISTORY_RECORDS")
        return cls(
            id=read_int(element, "ID"),
            name=read_text(element, "NAME"),
            ownership=Ownership.read(element),
            permissions=DEFAULT_PERMISSIONS if permissions is None else Permissions.from_element(permissions),
            state=parse_code(VmState, read_int(element, "STATE", 1)),
            lcm_state=parse_code(LcmState, read_int(element, "LCM_STATE", 0)),
            prev_state=parse_code(VmState, read_int(element, "PREV_STATE", 1)),
            prev_lcm_state=parse_code(LcmState, read_int(element, "PREV_LCM_STATE", 0)),
            last_poll=read_int(element, "LAST_POLL", 0),
            resched=read_int(element, "RESCHED", 0),
            stime=read_int(element, "STIME", 0),
            etime=read_int(element, "ETIME", 0),
            deploy_id=read_text(element, "DEPLOY_ID", ""),
            monitoring=read_template(element, "MONITORING"),
            sched_actions=read_ids(element, "SCHED_ACTIONS"),
            template=_stored_template(read_template(element, "TEMPLATE")),
            user_template=read_template(element, "USER_TEMPLATE"),
            history=[] if records is None else [History.read(h) for h in records.iterfind("HISTORY")],
            backup_config=Vector() if backups is None else read_vector(backups, "BACKUP_CONFIG"),
            backup_ids=[] if backups is None else read_ids(backups, "BACKUP_IDS"),
        )


def _stored_template(template: Template) -> Template:
    """Drop what rendering adds: VMID, the SCHED_ACTION bodies, an empty TM_MAD_SYSTEM."""
    for name in CORE_NAMES:
        template.remove(name)
    if template.get("TM_MAD_SYSTEM") == "":
        template.remove("TM_MAD_SYSTEM")
    return template


# ---- element writers ----------------------------------------------------------------------------


def _grouped(attributes: Iterable[tuple[str, Value]]) -> dict[str, list[Value]]:
    grouped: dict[str, list[Value]] = {}
    for name, value in attributes:
        grouped.setdefault(name, []).append(value)
    return grouped


def _declared(grouped: Mapping[str, list[Value]], slots: Mapping[str, Slot]) -> Iterator[tuple[str, Value, Slot]]:
    """The values a schema declares, in its order; misshapen or surplus values are left out."""
    for name, slot in slots.items():
        values = grouped.get(name)
        if values:
            for value in slot.admit(values)[0]:
                yield name, value, slot


def _rest(grouped: Mapping[str, list[Value]], slots: Mapping[str, Slot]) -> Iterator[tuple[str, Value]]:
    """The undeclared names, sorted: after the declared ones, where the schema's wildcard takes them."""
    for name in sorted(grouped):
        if name not in slots:
            for value in grouped[name]:
                yield name, value


def _write_value(parent: Element, name: str, value: Value, slot: Slot) -> None:
    if isinstance(value, Vector):
        _write_vector(parent, name, value, slot)
    else:
        SubElement(parent, name).text = value


def _write_vector(parent: Element, name: str, vector: Vector, slot: Slot) -> None:
    child = SubElement(parent, name)
    for key, text in slot.pairs(vector):
        SubElement(child, key).text = text


_OPEN = Slot(ANY)


def _value_xml(name: str, value: Value, slot: Slot = _OPEN) -> str:
    """``<NAME>text</NAME>`` or a vector's pairs (names are template names: [A-Z0-9_], no escaping)."""
    if isinstance(value, str):
        return f"<{name}>{_esc(value)}</{name}>"
    inner = "".join([f"<{key}>{_esc(text)}</{key}>" for key, text in slot.pairs(value)])
    return f"<{name}>{inner}</{name}>"


def _esc(text: str) -> str:
    if "&" in text or "<" in text or ">" in text:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


def set_states(vm: Vm, state: VmState, lcm_state: LcmState) -> bool:
    """Set STATE/LCM_STATE (keeping the previous pair in PREV_*); False when nothing changed."""
    if (vm.state, vm.lcm_state) == (state, lcm_state):
        return False
    vm.prev_state, vm.prev_lcm_state = vm.state, vm.lcm_state
    vm.state, vm.lcm_state = state, lcm_state
    return True
