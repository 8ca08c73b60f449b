"""The etcd registry's data layout: keys under one prefix, the JSON values, the URL.

Pure (no I/O), so every agent computes the same keys and ids and tests need no etcd. Layout,
under the prefix (default "/meshnode/"):

    resources/<Kind>/<name>            the document (store.encode), a Service's VIP   no lease
                                       in its status; the key's mod revision is its version
    history/<Kind>/<name>/<token>      HistoryEntry.to_json() of each version kept   no lease
                                       (its mod revision is the version it records)
    vips/<ip>                          the owning service's name                      no lease
    endpoints/<service>/<node>/<ip:port>  EndpointRecord.to_json()                   node's lease
    addrs/<ip:port>/<service>/<node>   "" (an address claim, see below)              node's lease
    hosts/<node>                       the node's agent report (versions applied)    node's lease

Kinds are CamelCase words, resource names DNS labels, and node names are checked here, so no
part holds a "/". A history key is written in the same transaction as the version it records,
so its mod revision is that version; its token (time and random) only has to be unique.
An endpoint is written twice: once by service (so a service's endpoints are one range) and once
by address, so a transaction can check with two range comparisons that no *other* service
holds the address, which keeps "an address belongs to one service" true when agents race.
Imports nothing of meshnode's but the registry records, the model, errors and constants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address
from urllib.parse import urlsplit

from meshnode.discovery.registry import EndpointRecord
from meshnode.errors import ConfigError, RegistryError, UsageError
from meshnode.model import HostPort

DEFAULT_PREFIX = "/meshnode/"
DEFAULT_PORT = 2379  # etcd's client port


@dataclass(frozen=True, slots=True)
class ResourceKey:
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class HistoryKey:
    kind: str
    name: str
    token: str


@dataclass(frozen=True, slots=True)
class HostKey:
    node: str


@dataclass(frozen=True, slots=True)
class VipKey:
    vip: IPv4Address


@dataclass(frozen=True, slots=True)
class EndpointKey:
    service: str
    node: str
    addr: HostPort


@dataclass(frozen=True, slots=True)
class ClaimKey:
    addr: HostPort
    service: str
    node: str


ParsedKey = ResourceKey | HistoryKey | HostKey | VipKey | EndpointKey | ClaimKey


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) cover every key starting with `prefix`."""
    b = bytearray(prefix)
    for i in reversed(range(len(b))):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"  # all 0xff: etcd reads "\0" as "to the end of the keyspace"


def check_node(node: str) -> str:
    """A node name becomes one part of a key: it must be non-empty and hold no "/"."""
    if not node or "/" in node or not node.isprintable() or len(node) > 253:
        raise ConfigError(f"invalid node name {node!r} for the etcd registry",
                          "use --node NAME with printable characters and no '/'")
    return node


class KeyLayout:
    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ConfigError(f"invalid etcd key prefix {prefix!r}",
                              "start and end it with '/', e.g. /meshnode/")
        self.prefix = prefix

    def _k(self, *parts: object) -> bytes:
        return (self.prefix + "/".join(str(p) for p in parts)).encode()

    def all(self) -> bytes:
        return self.prefix.encode()

    def resource(self, kind: str, name: str) -> bytes:
        return self._k("resources", kind, name)

    def service(self, name: str) -> bytes:
        return self.resource("Service", name)

    def history(self, kind: str, name: str, token: str) -> bytes:
        return self._k("history", kind, name, token)

    def history_of(self, kind: str, name: str) -> bytes:
        return self._k("history", kind, name, "")

    def host(self, node: str) -> bytes:
        return self._k("hosts", node)

    def hosts(self) -> bytes:
        return self._k("hosts", "")

    def vip(self, vip: IPv4Address) -> bytes:
        return self._k("vips", vip)

    def vips(self) -> bytes:
        return self._k("vips", "")

    def endpoint(self, service: str, node: str, addr: HostPort) -> bytes:
        return self._k("endpoints", service, node, addr)

    def endpoints_of(self, service: str) -> bytes:
        return self._k("endpoints", service, "")

    def claim(self, addr: HostPort, service: str, node: str) -> bytes:
        return self._k("addrs", addr, service, node)

    def claims_of(self, addr: HostPort) -> bytes:
        return self._k("addrs", addr, "")

    def foreign_claims(self, addr: HostPort, service: str) -> list[tuple[bytes, bytes]]:
        """The two key ranges that hold the claims on `addr` of every service but `service`."""
        everyone, mine = self.claims_of(addr), self._k("addrs", addr, service, "")
        return [(everyone, mine), (prefix_end(mine), prefix_end(everyone))]

    def parse(self, key: bytes) -> ParsedKey | None:
        """What a key names, or None for keys this version does not know (written by an older
        or a newer meshnode): they are ignored, never an error."""
        try:
            text = key.decode()
        except UnicodeDecodeError:
            return None
        if not text.startswith(self.prefix):
            return None
        kind, _, rest = text[len(self.prefix):].partition("/")
        parts = rest.split("/")
        try:
            if kind == "resources" and len(parts) == 2 and all(parts):
                return ResourceKey(parts[0], parts[1])
            if kind == "history" and len(parts) == 3 and all(parts):
                return HistoryKey(parts[0], parts[1], parts[2])
            if kind == "hosts" and len(parts) == 1 and parts[0]:
                return HostKey(parts[0])
            if kind == "vips" and len(parts) == 1:
                return VipKey(IPv4Address(parts[0]))
            if kind == "endpoints" and len(parts) == 3:
                return EndpointKey(parts[0], parts[1], HostPort.parse(parts[2]))
            if kind == "addrs" and len(parts) == 3:
                return ClaimKey(HostPort.parse(parts[0]), parts[1], parts[2])
        except (ValueError, UsageError):  # a bad address: not a key of ours
            return None
        return None


# -- values -------------------------------------------------------------------------------
def encode_endpoint(rec: EndpointRecord) -> bytes:
    return json.dumps(rec.to_json(), sort_keys=True).encode()


def decode_endpoint(data: bytes) -> EndpointRecord:
    try:
        return EndpointRecord.from_json(json.loads(data))
    except Exception as exc:
        raise RegistryError(f"unreadable endpoint record in etcd: {exc}",
                            "delete or rewrite the key with etcdctl") from exc


# -- the --registry URL -------------------------------------------------------------------
def parse_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """`etcd://HOST[:PORT][,HOST[:PORT]...][/PREFIX/]` → ([(host, port), ...], prefix)."""
    hint = "use --registry etcd://HOST:PORT[,HOST:PORT...], e.g. etcd://10.0.0.5:2379"
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.netloc:
        raise ConfigError(f"invalid etcd registry URL {url!r}", hint)
    endpoints: list[tuple[str, int]] = []
    for item in parts.netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, str(DEFAULT_PORT)
        if not host or ":" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"invalid etcd endpoint {item!r} in {url!r}", hint)
        endpoints.append((host, int(port)))
    prefix = parts.path if parts.path not in ("", "/") else DEFAULT_PREFIX
    if not prefix.endswith("/"):
        prefix += "/"
    return endpoints, prefix
