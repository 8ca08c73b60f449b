"""meshnode.telemetry."""
