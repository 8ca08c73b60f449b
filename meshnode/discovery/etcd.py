"""EtcdRegistry: the registry shared by every agent of a mesh, kept in etcd (v3 API, 3.4+).

Owns what the keys mean (layout in etcd_keys.py): the local mirror (etcd_mirror.py) that
`services()` serves without blocking, this node's endpoints as the agent asked for them, and
the transactional writes. The connection itself (client, lease, keepalive, watch, reconnect,
wrapping what etcd raises) is the session's, in etcd_session.py; it calls back through the
SessionOwner hooks below.

- Endpoints this agent writes live under its own lease (TTL `ttl`, refreshed every ttl/3):
  a crashed agent's endpoints vanish within the TTL; close() revokes the lease so they vanish
  at once.
- VIPs: a transaction writes the service and its VIP reservation only if neither exists
  (create_revision == 0), so racing agents never share a VIP; the loser takes the next free
  one. The service id is the VIP's offset in the range: every agent derives the same id.
- Outage: reads keep serving the mirror (and, across an agent restart, the cache file);
  writes raise TemporaryError; the session reconnects by itself. Every (re)connection is a
  full resync: the whole prefix replaces the mirror (a Reset: nothing deleted meanwhile
  lingers), then this agent's endpoints are put back where the outage cost them.

Must not import uvloop, bcc or pyroute2: it runs inside the agent. Must not import aetcd or
grpc either: only request messages (aetcd.rpc) are built here; calls go through the session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

from aetcd import rpc

from meshnode import constants as C
from meshnode.discovery.etcd_keys import (
    DEFAULT_PREFIX,
    ClaimKey,
    EndpointKey,
    KeyLayout,
    ServiceKey,
    VipKey,
    VipRange,
    check_node,
    decode_service,
    encode_endpoint,
    encode_service,
    parse_url,
    prefix_end,
)
from meshnode.discovery.etcd_mirror import Mirror
from meshnode.discovery.etcd_session import EtcdSession
from meshnode.discovery.registry import (
    EndpointRecord,
    Listener,
    ServiceRecord,
    apply_settings,
    check_service_args,
)
from meshnode.errors import (
    ConflictError,
    NotFoundError,
    TemporaryError,
)
from meshnode.model import BalancerConfig, HealthConfig, HostPort, OutlierConfig

log = logging.getLogger(__name__)

# etcd refuses transactions of more than 128 operations (or comparisons) by default
# (--max-txn-ops); an endpoint costs two puts and two comparisons.
TXN_ENDPOINTS = 40
TXN_DELETES = 100
# Optimistic transactions retry when another agent wrote in between; each failure returns
# the current state, so only new concurrent writers can make one fail again.
MAX_ATTEMPTS = 100


class EtcdRegistry:
    def __init__(self, endpoints: Sequence[tuple[str, int]], *, node: str,
                 cache_path: Path | None = None, prefix: str = DEFAULT_PREFIX, ttl: int = 10,
                 request_timeout: float = 3.0, connect_timeout: float = 5.0,
                 keepalive_interval: float | None = None, backoff_min: float = 0.1,
                 backoff_max: float = 5.0, vip_cidr: str = C.VIP_CIDR) -> None:
        self._keys = KeyLayout(prefix)
        self._session = EtcdSession(
            endpoints, self, prefix=self._keys.all(), name=f"meshnode-etcd-{node}", ttl=ttl,
            request_timeout=request_timeout, connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval, backoff_min=backoff_min,
            backoff_max=backoff_max)
        self.endpoints = self._session.endpoints
        self.node = check_node(node)
        self.cache_path = cache_path
        self.ttl = ttl
        self._vips = VipRange(vip_cidr)
        self._mirror = Mirror(self._keys)
        self._listeners: list[Listener] = []
        self._flush_pending = False
        self._cache_warned = False
        # This node's endpoints as the agent last asked for them: put back after an outage
        # that cost the lease, trimmed of what others removed.
        self._own: dict[tuple[str, HostPort], EndpointRecord] = {}
        if cache_path is not None:
            self._mirror.load(cache_path)

    @classmethod
    def from_url(cls, url: str, *, node: str, cache_path: Path | None = None,
                 **options: Any) -> EtcdRegistry:
        """`etcd://HOST:PORT[,HOST:PORT...][/PREFIX/]`; options as for the constructor."""
        endpoints, prefix = parse_url(url)
        options.setdefault("prefix", prefix)
        return cls(endpoints, node=node, cache_path=cache_path, **options)

    # -- the Registry protocol: reads ------------------------------------------------------
    def services(self) -> dict[str, ServiceRecord]:
        return self._mirror.services()

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def describe(self) -> dict[str, Any]:
        return {"backend": "etcd", "endpoints": [f"{h}:{p}" for h, p in self.endpoints],
                "connected": self._session.connected,
                "last_error": self._session.last_error,
                "lease_ttl": self.ttl, "revision": self._mirror.revision,
                "node": self.node, "prefix": self._keys.prefix,
                "lease_id": f"{self._session.lease_id:x}", "own_endpoints": len(self._own)}

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and sync, waiting at most `connect_timeout`: when etcd does not answer
        by then the agent starts anyway, serving the cache, and the session keeps trying."""
        await self._session.start()

    async def close(self) -> None:
        """Stop the session and revoke the lease: this node's endpoints vanish at once. When
        etcd is unreachable they vanish when the lease runs out instead."""
        lease = await self._session.close()
        if lease:
            self._mirror.drop_lease(self.node, lease)  # what etcd just deleted
        self._flush()

    async def abandon(self) -> None:
        """Stop without revoking the lease, as a crashed agent would: this node's endpoints
        stay until the TTL runs out. For tests of that path, and for a handover."""
        await self._session.abandon()

    # -- the session's hooks (SessionOwner) -------------------------------------------------
    def reset(self, kvs: Iterable[tuple[bytes, bytes, int, int]], revision: int) -> None:
        self._mirror.reset(kvs, revision)

    def resynced(self) -> None:
        self._forget_removed_services()
        self._changed()

    def watched(self, key: bytes, value: bytes | None, revision: int, lease: int) -> None:
        if value is None:
            changed = self._mirror.delete(key, revision)
            self._deleted(key)
        else:
            changed = self._mirror.put(key, value, revision, lease)
        self._mirror.advance(revision)
        if changed is not None:
            self._changed()

    async def reconcile(self, client: Any, *, lease_alive: bool) -> None:
        await self._reconcile(client, lease_alive=lease_alive)

    def _deleted(self, key: bytes) -> None:
        parsed = self._keys.parse(key)
        if isinstance(parsed, EndpointKey) and parsed.node == self.node and \
                (parsed.service, parsed.addr) in self._own:
            # Our lease expired, or someone removed our endpoint: the keepalive loop asks
            # etcd which, and re-registers or forgets accordingly.
            self._session.poke()
        elif isinstance(parsed, ServiceKey):
            self._forget_removed_services()

    async def _reconcile(self, client: Any, *, lease_alive: bool) -> None:
        """Make etcd hold exactly `_own` for this node (call with the session's lock held).

        Keys under our lease that `_own` lacks were removed while etcd was unreachable:
        delete them. Entries of `_own` missing from etcd: with the lease alive throughout,
        only someone's remove can have deleted them, so forget them; with a new lease the
        outage deleted them, so put them back (unless their service is gone or their address
        now belongs to another service)."""
        held, ours = self._mirror.endpoints_of_node(self.node), self._session.lease_id
        stale = [self._keys.endpoint(svc, node, addr) for (svc, node, addr), (_, lease)
                 in held.items() if lease == ours and (svc, addr) not in self._own]
        stale_claims = [self._keys.claim(addr, svc, node) for (svc, node, addr), (_, lease)
                        in held.items() if lease == ours and (svc, addr) not in self._own]
        if stale:
            await self._delete(client, stale + stale_claims)
        todo: dict[str, list[EndpointRecord]] = {}
        for (svc, addr), rec in list(self._own.items()):
            have = held.get((svc, self.node, addr))
            if have == (rec, ours):
                continue
            if have is None and lease_alive:
                log.info("endpoint %s of %s was removed by another agent", addr, svc)
                del self._own[(svc, addr)]
                continue
            todo.setdefault(svc, []).append(rec)
        for svc, recs in todo.items():
            for chunk in _chunks(recs, TXN_ENDPOINTS):
                try:
                    await self._register(client, svc, chunk)
                except (NotFoundError, ConflictError):
                    # one bad endpoint must not keep the others out: one at a time
                    for rec in chunk:
                        try:
                            await self._register(client, svc, [rec])
                        except (NotFoundError, ConflictError) as exc:
                            log.warning("dropping endpoint %s of %s: %s", rec.addr, svc, exc)
                            self._own.pop((svc, rec.addr), None)

    def _forget_removed_services(self) -> None:
        """A service removed (by anyone) takes this node's endpoints of it along."""
        known = self._mirror.services()
        for svc, addr in [k for k in self._own if k[0] not in known]:
            del self._own[(svc, addr)]

    # -- the Registry protocol: writes ----------------------------------------------------
    async def ensure_service(self, name: str, *, port: int | None = None,
                             fail_closed: bool | None = None, lb: BalancerConfig | None = None,
                             outlier: OutlierConfig | None = None,
                             health: HealthConfig | None = None) -> ServiceRecord:
        check_service_args(name, port)
        client = self._session.live()
        skey = self._keys.service(name)

        def configure(rec: ServiceRecord) -> ServiceRecord:
            return apply_settings(rec, port=port, fail_closed=fail_closed, lb=lb,
                                  outlier=outlier, health=health)

        cur = await self._session.get(client, skey)
        used: set[IPv4Address] | None = None
        for _ in range(MAX_ATTEMPTS):
            if cur is None:
                # Create: the lowest free VIP, reserved together with the service. Both
                # comparisons fail if another agent created either meanwhile.
                if used is None:
                    used = await self._used_vips(client)
                vip = self._vips.first_free(used)
                rec = configure(ServiceRecord(name, self._vips.id_of(vip), vip))
                vkey = self._keys.vip(vip)
                resp = await self._session.txn(
                    client, "create service " + name,
                    [_cmp(vkey, "create", 0), _cmp(skey, "create", 0)],
                    [_put(skey, encode_service(rec)), _put(vkey, name.encode())],
                    [_get(skey), _get(self._keys.vips(), prefix_end(self._keys.vips()))])
                if resp.succeeded:
                    self._wrote([(skey, encode_service(rec))], resp)
                    return self.services().get(name, rec)
                kvs = resp.responses[0].response_range.kvs
                cur = kvs[0] if kvs else None  # someone created it: update that one instead
                used = {p.vip for kv in resp.responses[1].response_range.kvs
                        if isinstance(p := self._keys.parse(kv.key), VipKey)}
            else:
                old = decode_service(cur.value)
                new = configure(old)
                if new == old:
                    return self.services().get(name, old)
                resp = await self._session.txn(client, "update service " + name,
                                               [_cmp(skey, "mod", int(cur.mod_revision))],
                                               [_put(skey, encode_service(new))],
                                               [_get(skey)])
                if resp.succeeded:
                    self._wrote([(skey, encode_service(new))], resp)
                    return self.services().get(name, new)
                kvs = resp.responses[0].response_range.kvs
                cur = kvs[0] if kvs else None
        raise TemporaryError(f"too many concurrent changes to service {name!r}",
                             "retry the command")

    async def remove_service(self, name: str) -> None:
        client = self._session.live()
        skey = self._keys.service(name)
        for _ in range(MAX_ATTEMPTS):
            cur = await self._session.get(client, skey)
            if cur is None:
                raise NotFoundError(f"no service named {name!r}",
                                    "list services: meshnode status")
            rec = decode_service(cur.value)
            start = self._keys.endpoints_of(name)
            eps = await self._session.range(client, start)
            ep_keys = [(bytes(kv.key), p) for kv in eps.kvs
                       if isinstance(p := self._keys.parse(kv.key), EndpointKey)]
            claims = [self._keys.claim(p.addr, name, p.node) for _, p in ep_keys]
            # Fails if the service changed or gained an endpoint since the reads above: no
            # address claim may outlive its service.
            resp = await self._session.txn(
                client, "remove service " + name,
                [_cmp(skey, "mod", int(cur.mod_revision)),
                 _cmp(start, "mod", int(eps.header.revision) + 1, "<", prefix_end(start))],
                [_delete(skey), _delete(self._keys.vip(rec.vip)),
                 _delete(start, prefix_end(start))] + [_delete(c) for c in
                                                        claims[:TXN_DELETES]], [])
            if not resp.succeeded:
                continue
            if claims[TXN_DELETES:]:
                await self._delete(client, claims[TXN_DELETES:])
            rev = int(resp.header.revision)
            for key in [skey] + [k for k, _ in ep_keys]:
                self._mirror.delete(key, rev, local=True)
            self._forget_removed_services()
            self._changed()
            return
        raise TemporaryError(f"too many concurrent changes to service {name!r}",
                             "retry the command")

    async def add_endpoints(self, name: str, endpoints: Iterable[EndpointRecord]) -> None:
        # one record per address (a transaction may not name a key twice); this node owns
        # them whatever node they name
        recs = list({e.addr: replace(e, node=self.node) for e in endpoints}.values())
        client = self._session.live()
        async with self._session.lock:
            held = self._mirror.endpoints_of_node(self.node)
            new = [r for r in recs
                   if held.get((name, self.node, r.addr)) != (r, self._session.lease_id)]
            if not new and name not in self._mirror.services():
                raise NotFoundError(f"no service named {name!r}",
                                    f"create it: meshnode service add {name}")
            for chunk in _chunks(new, TXN_ENDPOINTS):
                await self._register(client, name, chunk)
            for r in recs:  # including those etcd held already
                self._own[(name, r.addr)] = r

    async def remove_endpoints(self, name: str, addrs: Iterable[HostPort]) -> None:
        """Remove these addresses from the service, whichever node registered them. This
        node forgets its own at once: if etcd is unreachable (TemporaryError) they are
        deleted on reconnection anyway."""
        gone = set(addrs)
        for addr in gone:
            self._own.pop((name, addr), None)
        client = self._session.live()
        async with self._session.lock:
            eps = await self._session.range(client, self._keys.endpoints_of(name))
            keys: list[bytes] = []
            for kv in eps.kvs:
                p = self._keys.parse(kv.key)
                if isinstance(p, EndpointKey) and p.addr in gone:
                    keys += [bytes(kv.key), self._keys.claim(p.addr, name, p.node)]
            if keys:
                rev = await self._delete(client, keys)
                for key in keys:
                    self._mirror.delete(key, rev, local=True)
                self._changed()

    async def _register(self, client: Any, name: str, recs: list[EndpointRecord]) -> None:
        """Put endpoints of this node under its lease, all or none: only if the service
        exists and no other service claims any of the addresses."""
        skey, lease = self._keys.service(name), self._session.lease_id
        compare = [_cmp(skey, "create", 0, ">")]
        success, failure = [], [_get(skey)]
        for r in recs:
            compare += [_cmp(a, "create", 0, "==", b)
                        for a, b in self._keys.foreign_claims(r.addr, name)]
            success += [_put(self._keys.endpoint(name, self.node, r.addr), encode_endpoint(r),
                             lease),
                        _put(self._keys.claim(r.addr, name, self.node), b"", lease)]
            claims = self._keys.claims_of(r.addr)
            failure.append(_get(claims, prefix_end(claims)))
        resp = await self._session.txn(client, f"register endpoints of {name}", compare,
                                       success, failure)
        if resp.succeeded:
            self._wrote([(self._keys.endpoint(name, self.node, r.addr), encode_endpoint(r))
                         for r in recs], resp, lease)
            return
        if not resp.responses[0].response_range.kvs:
            raise NotFoundError(f"no service named {name!r}",
                                f"create it: meshnode service add {name}")
        for r, got in zip(recs, resp.responses[1:], strict=True):
            for kv in got.response_range.kvs:
                p = self._keys.parse(kv.key)
                if isinstance(p, ClaimKey) and p.service != name:
                    raise ConflictError(
                        f"endpoint {r.addr} already belongs to service {p.service!r}",
                        f"remove it there first: meshnode service remove {p.service} "
                        f"--endpoint {r.addr}")
        raise TemporaryError(f"the registry changed while registering endpoints of {name}",
                             "retry the command")

    def _wrote(self, puts: list[tuple[bytes, bytes]], resp: Any, lease: int = 0) -> None:
        """Apply our successful write to the mirror now: the agent reads its writes at once
        (the watch delivers the same revision later, and the mirror ignores it then)."""
        rev = int(resp.header.revision)
        if [key for key, value in puts if self._mirror.put(key, value, rev, lease)]:
            self._changed()

    async def _delete(self, client: Any, keys: list[bytes]) -> int:
        rev = 0
        for chunk in _chunks(keys, TXN_DELETES):
            resp = await self._session.txn(client, "delete keys", [],
                                           [_delete(k) for k in chunk], [])
            rev = int(resp.header.revision)
        return rev

    async def _used_vips(self, client: Any) -> set[IPv4Address]:
        resp = await self._session.range(client, self._keys.vips())
        return {p.vip for kv in resp.kvs if isinstance(p := self._keys.parse(kv.key), VipKey)}

    # -- change notification ---------------------------------------------------------------
    def _changed(self) -> None:
        """Write the cache and call the listeners once per burst of changes (one loop turn),
        not once per key of a transaction."""
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self.cache_path is not None:
            try:
                self._mirror.save(self.cache_path)
                self._cache_warned = False
            except OSError as exc:
                if not self._cache_warned:  # once per failure streak, not per change
                    log.warning("cannot write the etcd cache %s: %s", self.cache_path, exc)
                    self._cache_warned = True
        for listener in list(self._listeners):
            listener()


# -- request building -----------------------------------------------------------------------
_RESULT = {"==": rpc.Compare.EQUAL, "!=": rpc.Compare.NOT_EQUAL, "<": rpc.Compare.LESS,
           ">": rpc.Compare.GREATER}


def _cmp(key: bytes, target: str, value: int, op: str = "==",
         end: bytes | None = None) -> Any:
    """Compare a key's (or every key in [key, end)'s) create or mod revision. On an empty
    range etcd compares against zero, so create == 0 means "none of these keys exists"."""
    c = rpc.Compare(key=key, result=_RESULT[op])
    if target == "create":
        c.target, c.create_revision = rpc.Compare.CREATE, value
    else:
        c.target, c.mod_revision = rpc.Compare.MOD, value
    if end is not None:
        c.range_end = end
    return c


def _put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def _delete(key: bytes, end: bytes | None = None) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key,
                                                                      range_end=end or b""))


def _get(key: bytes, end: bytes | None = None) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=end or b""))


T = TypeVar("T")


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]

