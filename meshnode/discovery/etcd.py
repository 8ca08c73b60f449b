"""EtcdRegistry: the registry shared by every agent of a mesh, kept in etcd (v3 API, 3.4+).

Owns this agent's etcd session: its client (aetcd, on the agent's asyncio loop), its lease and
the keepalive, the watch over the key prefix (layout in etcd_keys.py) and the local mirror it
feeds (etcd_mirror.py), which `services()` serves without blocking.

- Endpoints this agent writes live under its own lease (TTL `ttl`, refreshed every ttl/3):
  a crashed agent's endpoints vanish within the TTL; close() revokes the lease so they vanish
  at once.
- VIPs: a transaction writes the service and its VIP reservation only if neither exists
  (create_revision == 0), so racing agents never share a VIP; the loser takes the next free
  one. The service id is the VIP's offset in the range: every agent derives the same id.
- Outage: reads keep serving the mirror (and, across an agent restart, the cache file);
  writes raise TemporaryError; a background loop reconnects with backoff, rotating through the
  configured members. Every (re)connection is a full resync: refresh (or re-grant) the lease,
  read the whole prefix and replace the mirror (a Reset: nothing deleted meanwhile lingers),
  watch from that revision, then put this agent's endpoints back where the outage cost them.

Must not import uvloop, bcc or pyroute2: it runs inside the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import grpc
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
from meshnode.discovery.registry import (
    EndpointRecord,
    Listener,
    ServiceRecord,
    apply_settings,
    check_service_args,
)
from meshnode.errors import (
    ConflictError,
    MeshnodeError,
    NotFoundError,
    RegistryError,
    TemporaryError,
    UsageError,
)
from meshnode.model import BalancerConfig, HealthConfig, HostPort, OutlierConfig

log = logging.getLogger(__name__)

# What the etcd client and gRPC raise; caught here and nowhere else.
_FOREIGN: tuple[type[BaseException], ...] = (
    aetcd.exceptions.ClientError, grpc.RpcError, grpc.aio.BaseError, OSError, TimeoutError,
)
_SESSION_ENDERS: tuple[type[BaseException], ...] = (*_FOREIGN, MeshnodeError)
# Status codes that a retry cannot fix: a RegistryError, not a TemporaryError.
_PERMANENT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
              grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OUT_OF_RANGE}

# etcd refuses transactions of more than 128 operations (or comparisons) by default
# (--max-txn-ops); an endpoint costs two puts and two comparisons.
TXN_ENDPOINTS = 40
TXN_DELETES = 100
# Optimistic transactions retry when another agent wrote in between; each failure returns
# the current state, so only new concurrent writers can make one fail again.
MAX_ATTEMPTS = 100

_CHANNEL_OPTIONS = {
    # notice a member that vanished without closing its connections (host down)
    "grpc.keepalive_time_ms": 10_000,  # etcd allows pings every 5 s (--grpc-keepalive-min-time)
    "grpc.keepalive_timeout_ms": 5_000,
    # Each session gets fresh connections: gRPC otherwise shares them process-wide and a
    # member that was down stays in gRPC's own reconnect backoff (1 s, growing) after it is
    # back, on top of ours.
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    # a full resync reads the whole prefix in one response; gRPC's default cap is 4 MiB
    "grpc.max_receive_message_length": 64 << 20,
}


class EtcdRegistry:
    def __init__(self, endpoints: Sequence[tuple[str, int]], *, node: str,
                 cache_path: Path | None = None, prefix: str = DEFAULT_PREFIX, ttl: int = 10,
                 request_timeout: float = 3.0, connect_timeout: float = 5.0,
                 keepalive_interval: float | None = None, backoff_min: float = 0.1,
                 backoff_max: float = 5.0, vip_cidr: str = C.VIP_CIDR) -> None:
        if not endpoints:
            raise UsageError("no etcd endpoint given", "use etcd://HOST:PORT[,HOST:PORT...]")
        if ttl < 1:
            raise UsageError(f"invalid lease TTL {ttl}", "use a TTL of 1 s or more")
        self.endpoints = list(endpoints)
        self.node = check_node(node)
        self.cache_path = cache_path
        self.ttl = ttl
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval or ttl / 3
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self._keys = KeyLayout(prefix)
        self._vips = VipRange(vip_cidr)
        self._mirror = Mirror(self._keys)
        self._listeners: list[Listener] = []
        self._flush_pending = False
        self._cache_warned = False
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None  # aetcd.Client of the current session
        self._connected = False
        self._member = ""  # host:port of the current session
        self._synced = asyncio.Event()  # the first full sync is done
        self._last_error: str | None = None
        self._lease_id = 0
        self._poke = asyncio.Event()  # "check the lease now": one of our keys was deleted
        # This node's endpoints as the agent last asked for them: put back after an outage
        # that cost the lease, trimmed of what others removed.
        self._own: dict[tuple[str, HostPort], EndpointRecord] = {}
        self._own_lock = asyncio.Lock()
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
                "connected": self._connected, "last_error": self._last_error,
                "lease_ttl": self.ttl, "revision": self._mirror.revision,
                "node": self.node, "prefix": self._keys.prefix,
                "lease_id": f"{self._lease_id:x}", "own_endpoints": len(self._own)}

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and sync, waiting at most `connect_timeout`: when etcd does not answer
        by then the agent starts anyway, serving the cache, and the session keeps trying."""
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name=f"meshnode-etcd-{self.node}")
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._synced.wait()
        except TimeoutError:
            log.warning("etcd at %s does not answer (%s): serving the last known state and "
                        "retrying in the background", self._where(), self._last_error)

    async def close(self) -> None:
        """Stop the session and revoke the lease: this node's endpoints vanish at once. When
        etcd is unreachable they vanish when the lease runs out instead."""
        await self._stop_task()
        client, lease = self._client, self._lease_id
        if client is not None and lease and self._connected:
            try:
                async with asyncio.timeout(self.request_timeout):
                    await client.revoke_lease(lease)
                self._mirror.drop_lease(self.node, lease)  # what etcd just deleted
            except _FOREIGN as exc:
                log.warning("could not revoke lease %x (%s): this node's endpoints expire "
                            "within %d s", lease, exc, self.ttl)
        elif lease:
            log.warning("etcd is unreachable at close: this node's endpoints expire within "
                        "%d s", self.ttl)
        await self._drop_client()
        self._lease_id = 0
        self._flush()

    async def abandon(self) -> None:
        """Stop without revoking the lease, as a crashed agent would: this node's endpoints
        stay until the TTL runs out. For tests of that path, and for a handover."""
        await self._stop_task()
        await self._drop_client()

    async def _stop_task(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._connected = False
        if client is not None:
            with contextlib.suppress(*_FOREIGN):
                async with asyncio.timeout(self.request_timeout):
                    await client.close()

    # -- the session: connect, resync, watch, keep the lease alive -----------------------
    async def _run(self) -> None:
        failures = 0
        index = 0
        while True:
            host, port = self.endpoints[index % len(self.endpoints)]
            self._client = aetcd.Client(host, port, timeout=self.request_timeout,
                                        options=_CHANNEL_OPTIONS)
            self._member = f"{host}:{port}"
            try:
                watch = await self._sync(self._client)
                failures = 0
                await self._serve(self._client, watch)
            except _SESSION_ENDERS as exc:
                self._last_error = f"{host}:{port}: {_detail(exc)}"
                # one warning per outage, not one per retry
                (log.debug if failures else log.warning)("etcd session %s:%d ended: %s",
                                                         host, port, _detail(exc))
            await self._drop_client()
            # the member we used may be down: the next attempt goes to the next one
            index += 1
            delay = min(self.backoff_max, self.backoff_min * 2 ** failures)
            failures += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: agents spread out

    async def _sync(self, client: Any) -> Any:
        """A full resync; returns the watch that continues it."""
        await client.connect()
        # 1. Our lease. etcd extends every lease when a new leader takes over, so an outage
        # of etcd itself rarely costs it; an agent cut off for longer than the TTL loses it.
        alive = bool(self._lease_id) and await self._refresh(client) > 0
        if not alive:
            self._lease_id = await self._grant(client)
        # 2. Everything, as of one revision, replaces the mirror (a Reset).
        resp = await self._range(client, self._keys.all())
        revision = int(resp.header.revision)
        self._mirror.reset(((kv.key, kv.value, kv.mod_revision, kv.lease) for kv in resp.kvs),
                           revision)
        # 3. Watch from the next revision: nothing between the read and the watch is lost.
        watch = await client.watch_prefix(self._keys.all(), start_revision=revision + 1)
        self._forget_removed_services()
        self._connected = True
        self._last_error = None
        self._changed()
        # 4. Put back what the outage cost us, drop what was removed meanwhile.
        async with self._own_lock:
            await self._reconcile(client, lease_alive=alive)
        self._synced.set()
        log.info("etcd session %s: synced at revision %d, lease %x (%s)", self._member,
                 revision, self._lease_id, "kept" if alive else "new")
        return watch

    async def _serve(self, client: Any, watch: Any) -> None:
        """Run the watch and the keepalive until either fails; then the session is over."""
        tasks = [asyncio.create_task(self._consume(watch)),
                 asyncio.create_task(self._keepalive(client))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            t.result()  # raises what ended the session
        raise TemporaryError("the etcd watch ended")

    async def _consume(self, watch: Any) -> None:
        async for ev in watch:
            key, rev = bytes(ev.kv.key), int(ev.kv.mod_revision)
            if ev.kind == "DELETE":
                changed = self._mirror.delete(key, rev)
                self._deleted(key)
            else:
                changed = self._mirror.put(key, bytes(ev.kv.value), rev, int(ev.kv.lease))
            self._mirror.advance(rev)
            if changed is not None:
                self._changed()

    def _deleted(self, key: bytes) -> None:
        parsed = self._keys.parse(key)
        if isinstance(parsed, EndpointKey) and parsed.node == self.node and \
                (parsed.service, parsed.addr) in self._own:
            # Our lease expired, or someone removed our endpoint: the keepalive loop asks
            # etcd which, and re-registers or forgets accordingly.
            self._poke.set()
        elif isinstance(parsed, ServiceKey):
            self._forget_removed_services()

    async def _keepalive(self, client: Any) -> None:
        failing_since: float | None = None
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the poke, and the session would never finish closing
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.keepalive_interval
                                           if failing_since is None else 0.2):
                    await self._poke.wait()
            poked = self._poke.is_set()
            self._poke.clear()
            try:
                ttl = await self._refresh(client)
            except MeshnodeError as exc:
                # a member without a leader answers nothing; after a TTL of that, try another
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.ttl:
                    raise TemporaryError(f"lease keepalive failing for {self.ttl} s: "
                                         f"{exc.message}") from exc
                continue
            failing_since = None
            if ttl <= 0:
                log.warning("etcd lease %x expired: re-registering this node's endpoints",
                            self._lease_id)
                async with self._own_lock:
                    self._lease_id = await self._grant(client)
                    await self._reconcile(client, lease_alive=False)
            elif poked:
                async with self._own_lock:
                    await self._reconcile(client, lease_alive=True)

    async def _reconcile(self, client: Any, *, lease_alive: bool) -> None:
        """Make etcd hold exactly `_own` for this node (call with `_own_lock` held).

        Keys under our lease that `_own` lacks were removed while etcd was unreachable:
        delete them. Entries of `_own` missing from etcd: with the lease alive throughout,
        only someone's remove can have deleted them, so forget them; with a new lease the
        outage deleted them, so put them back (unless their service is gone or their address
        now belongs to another service)."""
        held = self._mirror.endpoints_of_node(self.node)
        stale = [self._keys.endpoint(svc, node, addr) for (svc, node, addr), (_, lease)
                 in held.items() if lease == self._lease_id and (svc, addr) not in self._own]
        stale_claims = [self._keys.claim(addr, svc, node) for (svc, node, addr), (_, lease)
                        in held.items() if lease == self._lease_id
                        and (svc, addr) not in self._own]
        if stale:
            await self._delete(client, stale + stale_claims)
        todo: dict[str, list[EndpointRecord]] = {}
        for (svc, addr), rec in list(self._own.items()):
            have = held.get((svc, self.node, addr))
            if have == (rec, self._lease_id):
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
        client = self._live()
        skey = self._keys.service(name)

        def configure(rec: ServiceRecord) -> ServiceRecord:
            return apply_settings(rec, port=port, fail_closed=fail_closed, lb=lb,
                                  outlier=outlier, health=health)

        cur = await self._get(client, skey)
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
                resp = await self._txn(
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
                resp = await self._txn(client, "update service " + name,
                                       [_cmp(skey, "mod", int(cur.mod_revision))],
                                       [_put(skey, encode_service(new))], [_get(skey)])
                if resp.succeeded:
                    self._wrote([(skey, encode_service(new))], resp)
                    return self.services().get(name, new)
                kvs = resp.responses[0].response_range.kvs
                cur = kvs[0] if kvs else None
        raise TemporaryError(f"too many concurrent changes to service {name!r}",
                             "retry the command")

    async def remove_service(self, name: str) -> None:
        client = self._live()
        skey = self._keys.service(name)
        for _ in range(MAX_ATTEMPTS):
            cur = await self._get(client, skey)
            if cur is None:
                raise NotFoundError(f"no service named {name!r}",
                                    "list services: meshnode status")
            rec = decode_service(cur.value)
            start = self._keys.endpoints_of(name)
            eps = await self._range(client, start)
            ep_keys = [(bytes(kv.key), p) for kv in eps.kvs
                       if isinstance(p := self._keys.parse(kv.key), EndpointKey)]
            claims = [self._keys.claim(p.addr, name, p.node) for _, p in ep_keys]
            # Fails if the service changed or gained an endpoint since the reads above: no
            # address claim may outlive its service.
            resp = await self._txn(
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
        client = self._live()
        async with self._own_lock:
            held = self._mirror.endpoints_of_node(self.node)
            new = [r for r in recs
                   if held.get((name, self.node, r.addr)) != (r, self._lease_id)]
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
        client = self._live()
        async with self._own_lock:
            eps = await self._range(client, self._keys.endpoints_of(name))
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
        skey, lease = self._keys.service(name), self._lease_id
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
        resp = await self._txn(client, f"register endpoints of {name}", compare, success,
                               failure)
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
            resp = await self._txn(client, "delete keys", [], [_delete(k) for k in chunk], [])
            rev = int(resp.header.revision)
        return rev

    # -- etcd calls: the one place foreign exceptions become ours -----------------------
    def _live(self) -> Any:
        if not self._connected or self._client is None:
            raise TemporaryError(f"etcd is unreachable ({self._last_error or 'connecting'})",
                                 self._hint())
        return self._client

    def _hint(self) -> str:
        return (f"check etcd at {self._where()}; the agent keeps serving its last state, "
                "reconnects by itself, and the command can be retried")

    def _where(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def _wrap(self, exc: BaseException, doing: str) -> MeshnodeError:
        detail = _detail(exc)
        self._last_error = f"{doing}: {detail}"
        code = _code(exc)
        if code in _PERMANENT or isinstance(exc, (aetcd.exceptions.InvalidArgumentError,
                                                  aetcd.exceptions.UnauthenticatedError,
                                                  aetcd.exceptions.PreconditionFailedError)):
            return RegistryError(f"etcd refused to {doing}: {detail}",
                                 "check etcd's version (3.4 or later), its authentication "
                                 "and its limits (--max-txn-ops)")
        if "lease not found" in detail:
            self._poke.set()  # our lease expired behind our back: re-grant it now
        return TemporaryError(f"etcd could not {doing}: {detail}", self._hint())

    async def _call(self, doing: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled
            # gRPC cancels the calls in flight on a channel that closes: the session was
            # reset under this call, which is a temporary failure, not our cancellation
            raise self._wrap(exc, doing) from exc
        except _FOREIGN as exc:
            raise self._wrap(exc, doing) from exc

    async def _txn(self, client: Any, doing: str, compare: list[Any], success: list[Any],
                   failure: list[Any]) -> Any:
        # aetcd's transaction() drops the response header; we need its revision
        req = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        return await self._call(doing, client.kvstub.Txn(req, timeout=self.request_timeout,
                                                         metadata=client.metadata))

    async def _range(self, client: Any, key: bytes, end: bytes | None = None) -> Any:
        req = rpc.RangeRequest(key=key, range_end=prefix_end(key) if end is None else end)
        return await self._call("read " + key.decode(errors="replace"),
                                client.kvstub.Range(req, timeout=self.request_timeout,
                                                    metadata=client.metadata))

    async def _get(self, client: Any, key: bytes) -> Any:
        """The key-value of one key, or None."""
        resp = await self._range(client, key, b"")
        return resp.kvs[0] if resp.kvs else None

    async def _used_vips(self, client: Any) -> set[IPv4Address]:
        resp = await self._range(client, self._keys.vips())
        return {p.vip for kv in resp.kvs if isinstance(p := self._keys.parse(kv.key), VipKey)}

    async def _grant(self, client: Any) -> int:
        lease = await self._call("grant a lease", client.lease(self.ttl))
        return int(lease.id)

    async def _refresh(self, client: Any) -> int:
        """The lease's TTL after a keepalive; 0 once it has expired or been revoked."""
        async def refresh() -> Any:
            async with asyncio.timeout(self.request_timeout):
                return await client.refresh_lease(self._lease_id)

        reply = await self._call("keep the lease alive", refresh())
        return int(reply.TTL) if reply is not None else 0

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


def _code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status behind an exception (aetcd keeps the original as __cause__)."""
    for e in (exc, exc.__cause__):
        if isinstance(e, grpc.aio.AioRpcError):
            code: grpc.StatusCode = e.code()
            return code
    return None


def _detail(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, MeshnodeError):
        return exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "the call was cancelled: the session was reset"
    return str(exc) or type(exc).__name__
