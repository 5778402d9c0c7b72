"""The daemon: service wiring, systemd notification, the demo and first-start bootstrap."""
