"""Hypervisor hosts and datastores: connections, monitors, placement, VM sync and import, image datastores."""
