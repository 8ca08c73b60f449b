"""meshnode.host."""
