"""EtcdRegistry: the registry shared by every agent of a mesh, kept in etcd (v3 API, 3.4+).

Owns what the keys mean (layout in etcd_keys.py): the local mirror (etcd_mirror.py) that
`services()` serves without blocking, this node's endpoints as the agent asked for them, and
the endpoint writes; the resource writes (apply, history) are etcd_resources.py's and the
request messages etcd_requests.py's. The connection itself (client, lease, keepalive, watch,
reconnect, wrapping what etcd raises) is the session's, in etcd_session.py; it calls back
through the SessionOwner hooks below.

- Endpoints this agent writes live under its own lease (TTL `ttl`, refreshed every ttl/3):
  a crashed agent's endpoints vanish within the TTL; close() revokes the lease so they vanish
  at once.
- VIPs: an apply reserves a new Service's VIP in its transaction only if nobody holds it
  (create_revision == 0), so racing agents never share a VIP; the loser plans again. The
  service id is the VIP's offset in the range: every agent derives the same id.
- Outage: reads keep serving the mirror (and, across an agent restart, the cache file);
  writes raise TemporaryError; the session reconnects by itself. Every (re)connection is a
  full resync: the whole prefix replaces the mirror (a Reset: nothing deleted meanwhile
  lingers), then this agent's endpoints are put back where the outage cost them.

Must not import uvloop, bcc or pyroute2: it runs inside the agent, nor the etcd client:
calls go through the session.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from meshnode import constants as C
from meshnode.discovery.etcd_keys import (
    DEFAULT_PREFIX,
    ClaimKey,
    EndpointKey,
    KeyLayout,
    ResourceKey,
    check_node,
    encode_endpoint,
    parse_url,
    prefix_end,
)
from meshnode.discovery.etcd_mirror import CacheSnapshot, Mirror, write_cache
from meshnode.discovery.etcd_requests import chunks as _chunks
from meshnode.discovery.etcd_requests import cmp as _cmp
from meshnode.discovery.etcd_requests import delete as _delete
from meshnode.discovery.etcd_requests import get as _get
from meshnode.discovery.etcd_requests import put as _put
from meshnode.discovery.etcd_resources import TXN_DELETES, ResourceWriter
from meshnode.discovery.etcd_session import EtcdSession
from meshnode.discovery.registry import EndpointRecord, Listener, ServiceRecord, VipRange
from meshnode.errors import (
    ConflictError,
    MeshnodeError,
    NotFoundError,
    TemporaryError,
)
from meshnode.host.statefile import write_atomic
from meshnode.model import HostPort
from meshnode.policy.resources import Resource
from meshnode.policy.store import Delete, HistoryEntry, Outcome

log = logging.getLogger(__name__)

# etcd refuses transactions of more than 128 operations (or comparisons) by default
# (--max-txn-ops); an endpoint costs two puts and two comparisons.
TXN_ENDPOINTS = 40
CACHE_DELAY = 2.0  # seconds: the cache file trails the mirror by at most this (and a write)


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
        self._mirror = Mirror(self._keys, self._vips)
        self._resources = ResourceWriter(self._session, self._keys, self._mirror, self._vips,
                                         self._applied)
        self._report: dict[str, Any] = {}  # this agent's last report, put back after an outage
        self._listeners: list[Listener] = []
        self._flush_pending = False
        self._cache_warned = False
        self._cache_timer: asyncio.TimerHandle | None = None
        self._cache_task: asyncio.Future[None] | None = None
        # The lease a restarted agent takes over from its predecessor (which stopped without
        # revoking it): this node's keys stay in etcd throughout the restart.
        self._lease_path = cache_path.with_suffix(".lease") if cache_path else None
        self._adopting = self._load_lease()
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
    def services(self) -> Mapping[str, ServiceRecord]:
        return self._mirror.services()

    def changes(self, cursor: int) -> tuple[int, set[str] | None]:
        return self._mirror.feed.seq, self._mirror.feed.since(cursor)

    def resources(self) -> Mapping[tuple[str, str], Resource]:
        return self._mirror.resources()

    def revision(self) -> int:
        return int(self._mirror.data_revision)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def publish_host(self, report: Mapping[str, Any]) -> None:
        """Under this node's lease: a dead agent's report leaves with its endpoints."""
        self._report = dict(report)
        client = self._session.live()
        key, value = self._keys.host(self.node), json.dumps(self._report).encode()
        resp = await self._session.txn(client, "publish host report", [],
                                       [_put(key, value, self._session.lease_id)], [])
        self._wrote([(key, value)], resp, self._session.lease_id)

    def hosts(self) -> dict[str, dict[str, Any]]:
        return self._mirror.hosts()

    def describe(self) -> dict[str, Any]:
        return {"backend": "etcd", "endpoints": [f"{h}:{p}" for h, p in self.endpoints],
                "connected": self._session.connected,
                "last_error": self._session.last_error,
                "lease_ttl": self.ttl, "revision": self._mirror.data_revision,
                "watch_revision": self._mirror.revision,
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
        if self._lease_path is not None:
            self._lease_path.unlink(missing_ok=True)
        self._flush()
        if self._cache_timer is not None:
            self._cache_timer.cancel()
            self._cache_timer = None
        if self._cache_task is not None:
            await self._cache_task
        if self.cache_path is not None:  # the last state, for a restart while etcd is down
            self._write_cache(self.cache_path, self._mirror.cache_snapshot())

    async def detach(self) -> None:
        await self.abandon()

    async def abandon(self) -> None:
        """Stop without revoking the lease, as a crashed agent would: this node's endpoints
        stay until the TTL runs out, or until the next agent takes the lease over (a
        restart: the lease id stays in the state directory)."""
        self._save_lease()
        await self._session.abandon()
        if self._cache_timer is not None:
            self._cache_timer.cancel()
            self._cache_timer = None

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
        if self._adopting and lease_alive:
            # our predecessor's lease lives on: its keys are ours now, as they are
            held, ours = self._mirror.endpoints_of_node(self.node), self._session.lease_id
            for (svc, _, addr), (rec, lease) in held.items():
                if lease == ours:
                    self._own.setdefault((svc, addr), rec)
        self._adopting = False
        await self._reconcile(client, lease_alive=lease_alive)
        self._save_lease()

    def _load_lease(self) -> bool:
        if self._lease_path is None:
            return False
        try:
            self._session.lease_id = int(self._lease_path.read_text().strip() or "0")
        except (OSError, ValueError):
            return False
        return bool(self._session.lease_id)

    def _save_lease(self) -> None:
        lease = self._session.lease_id
        if self._lease_path is None or not lease:
            return
        try:
            write_atomic(self._lease_path, str(lease).encode())
        except MeshnodeError as exc:
            log.warning("lease id not saved (a restart re-registers instead): %s", exc)

    def _deleted(self, key: bytes) -> None:
        parsed = self._keys.parse(key)
        if isinstance(parsed, EndpointKey) and parsed.node == self.node and \
                (parsed.service, parsed.addr) in self._own:
            # Our lease expired, or someone removed our endpoint: the keepalive loop asks
            # etcd which, and re-registers or forgets accordingly.
            self._session.poke()
        elif isinstance(parsed, ResourceKey) and parsed.kind == "Service":
            self._forget_removed_services()

    async def _reconcile(self, client: Any, *, lease_alive: bool) -> None:
        """Make etcd hold exactly `_own` for this node (call with the session's lock held).

        Keys under our lease that `_own` lacks were removed while etcd was unreachable:
        delete them. Entries of `_own` missing from etcd: with the lease alive throughout,
        only someone's remove can have deleted them, so forget them; with a new lease the
        outage deleted them, so put them back (unless their service is gone or their address
        now belongs to another service)."""
        held, ours = self._mirror.endpoints_of_node(self.node), self._session.lease_id
        if self._report and (not lease_alive or self.node not in self._mirror.hosts()):
            key, value = self._keys.host(self.node), json.dumps(self._report).encode()
            resp = await self._session.txn(client, "publish host report", [],
                                           [_put(key, value, ours)], [])
            self._wrote([(key, value)], resp, ours)
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
    async def apply(self, puts: Sequence[Resource], deletes: Sequence[Delete] = ()
                    ) -> list[Outcome]:
        return await self._resources.apply(puts, deletes)

    async def history(self, kind: str, name: str) -> list[HistoryEntry]:
        return await self._resources.history(kind, name)

    def _applied(self, removed_service: bool) -> None:
        """A resource transaction of ours is in the mirror: tell the listeners."""
        if removed_service:  # (it walks this node's endpoints: only when a service went)
            self._forget_removed_services()
        self._changed()

    async def add_endpoints(self, name: str, endpoints: Iterable[EndpointRecord]) -> None:
        # one record per address (a transaction may not name a key twice); this node owns
        # them whatever node they name
        recs = list({e.addr: replace(e, node=self.node) for e in endpoints}.values())
        client = self._session.live()
        async with self._session.lock:
            lease = self._session.lease_id
            new = [r for r in recs
                   if self._mirror.endpoint(name, self.node, r.addr) != (r, lease)]
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

    # -- change notification ---------------------------------------------------------------
    def _changed(self) -> None:
        """Call the listeners once per burst of changes (one loop turn), not once per key of a
        transaction; write the cache at most every CACHE_DELAY (it costs the whole mesh, and
        only an agent restarting during an etcd outage reads it)."""
        loop = asyncio.get_running_loop()
        if not self._flush_pending:
            self._flush_pending = True
            loop.call_soon(self._flush)
        if self.cache_path is not None and self._cache_timer is None:
            self._cache_timer = loop.call_later(CACHE_DELAY, self._save_cache)

    def _flush(self) -> None:
        self._flush_pending = False
        for listener in list(self._listeners):
            listener()

    def _save_cache(self) -> None:
        """Write the cache from a copy, in a thread: at 10 000 services it is megabytes of
        JSON, which would stall the agent's loop (and every change behind it)."""
        if self._cache_timer is not None:
            self._cache_timer.cancel()
            self._cache_timer = None
        if self.cache_path is None:
            return
        if self._cache_task is not None and not self._cache_task.done():
            # one is being written: write again after it
            self._cache_timer = asyncio.get_running_loop().call_later(CACHE_DELAY,
                                                                      self._save_cache)
            return
        self._cache_task = asyncio.ensure_future(asyncio.to_thread(
            self._write_cache, self.cache_path, self._mirror.cache_snapshot()))

    def _write_cache(self, path: Path, snap: CacheSnapshot) -> None:
        try:
            write_cache(path, snap)
            self._cache_warned = False
        except MeshnodeError as exc:
            if not self._cache_warned:  # once per failure streak, not per change
                log.warning("cannot write the etcd cache: %s", exc)
                self._cache_warned = True
