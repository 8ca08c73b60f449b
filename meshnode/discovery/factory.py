"""Open the registry an agent was configured with: the embedded store or etcd."""

from __future__ import annotations

from pathlib import Path

from meshnode.discovery.registry import Registry
from meshnode.errors import ConfigError


def open_registry(url: str, state_dir: Path, node: str, ttl: int = 10) -> Registry:
    if url in ("", "embedded"):
        from meshnode.discovery.embedded import EmbeddedRegistry

        return EmbeddedRegistry(state_dir / "registry.json")
    if url.startswith("etcd://"):
        from meshnode.discovery.etcd import EtcdRegistry

        registry: Registry = EtcdRegistry.from_url(
            url, node=node, cache_path=state_dir / "etcd-cache.json", ttl=ttl)
        return registry
    raise ConfigError(f"unknown registry {url!r}",
                      "use --registry embedded or --registry etcd://HOST:PORT[,HOST:PORT...]")
