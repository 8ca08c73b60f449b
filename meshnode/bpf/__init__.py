"""meshnode.bpf."""
