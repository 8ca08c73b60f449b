"""meshnode: a per-host service mesh for plain Linux hosts and VMs."""

__version__ = "0.1.0"
