"""Telemetry in the agent: worker counters summed and kept (aggregate, history), Prometheus
metrics, and the admin HTTP server (metrics, dashboard, JSON API)."""
