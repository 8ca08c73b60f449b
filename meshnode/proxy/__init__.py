"""meshnode.proxy."""
