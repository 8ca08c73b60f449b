"""meshnode.discovery."""
