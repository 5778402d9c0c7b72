"""vmm drivers: operations on the hypervisors themselves (OpenNebula's VMM_MAD), one module per kind.

``kvm`` drives libvirt/QEMU hosts through libvirt-python; ``domainxml`` and ``states`` are its pure parts,
``errors`` its exception types, ``events`` the process-wide libvirt event loop, ``uri`` connection URIs.
"""

from __future__ import annotations

from drivers.vmm.domainxml import Disk, NetworkHost
from drivers.vmm.errors import CommitTimeout, DomainNotFound, GuestAgentError, OperationRefused, VmmError
from drivers.vmm.kvm import CommandRunner, KvmHost
from drivers.vmm.states import DomainInfo, DomainState, StateChange
from drivers.vmm.uri import LOCAL_URI, host_uri, ssh_uri

__all__ = [
    "LOCAL_URI", "CommandRunner", "CommitTimeout", "Disk", "DomainInfo", "DomainNotFound",
    "DomainState", "GuestAgentError", "KvmHost", "NetworkHost", "OperationRefused", "StateChange", "VmmError",
    "host_uri", "ssh_uri",
]
