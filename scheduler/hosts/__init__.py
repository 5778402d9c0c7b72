"""Hypervisor hosts and datastores: connections, the monitors (one round loop), placement, VM sync and
import, the rules of VM templates (which define domains on hosts), image datastores."""
