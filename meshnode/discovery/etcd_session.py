"""EtcdSession: this agent's connection to etcd (v3 API, 3.4+), for EtcdRegistry (etcd.py).

Owns the client (aetcd, on the agent's asyncio loop), the lease and its keepalive, the watch
over the key prefix, reconnection with backoff, and the one place where what aetcd and gRPC
raise becomes a MeshnodeError (`call`). What the keys mean is the owner's business: the
session hands it the whole prefix on every (re)connection (`SessionOwner.reset`), then each
watched change (`SessionOwner.watched`), and asks it to put this node's keys right whenever
the lease may have cost them (`SessionOwner.reconcile`).

- Outage: a background loop reconnects with backoff, rotating through the configured members.
  Every (re)connection is a full resync: refresh (or re-grant) the lease, read the whole
  prefix, watch from that revision, then let the owner put back what the outage cost.
- `lock` is held while this node's keys or its lease change (reconcile, re-grant, and the
  owner's own writes of this node's keys), so a write never races a lease swap.

Must not import uvloop, bcc or pyroute2: it runs inside the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, Protocol

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc

from meshnode.discovery.etcd_keys import prefix_end
from meshnode.errors import MeshnodeError, RegistryError, TemporaryError, UsageError

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

_RECANCEL_AFTER = 0.5  # s: a session task still running this long after a cancel ignored it

_CHANNEL_OPTIONS = {
    # notice a member that vanished without closing its connections (host down)
    "grpc.keepalive_time_ms": 10_000,  # etcd allows pings every 5 s (--grpc-keepalive-min-time)
    "grpc.keepalive_timeout_ms": 5_000,
    # Each session gets fresh connections: gRPC otherwise shares them process-wide and a
    # member that was down stays in gRPC's own reconnect backoff (1 s, growing) after it is
    # back, on top of ours.
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    # gRPC core takes this as the least time a connection attempt gets (TCP and the HTTP/2
    # SETTINGS frame), not as a backoff: at 100 ms a member a busy host or a slow link
    # reaches in more than that was never reached ("timed out before receiving SETTINGS
    # frame", every start on the Vagrant CI's vm3). 2 s: within the default request timeout.
    "grpc.min_reconnect_backoff_ms": 2_000,
    # a full resync reads the whole prefix in one response; gRPC's default cap is 4 MiB
    "grpc.max_receive_message_length": 64 << 20,
}


class SessionOwner(Protocol):
    """What the session asks of the registry it serves."""

    def reset(self, kvs: Iterable[tuple[bytes, bytes, int, int]], revision: int) -> None:
        """Replace the local state with every (key, value, mod_revision, lease) under the
        prefix as of `revision`."""

    def resynced(self) -> None:
        """The session is connected again and the watch runs: tell whoever listens."""

    def watched(self, key: bytes, value: bytes | None, revision: int, lease: int) -> None:
        """One change from the watch; `value` is None for a delete."""

    async def reconcile(self, client: Any, *, lease_alive: bool) -> None:
        """Make etcd hold exactly this node's keys (called with `EtcdSession.lock` held)."""


class EtcdSession:
    def __init__(self, endpoints: Sequence[tuple[str, int]], owner: SessionOwner, *,
                 prefix: bytes, name: str, ttl: int = 10, request_timeout: float = 3.0,
                 connect_timeout: float = 5.0, keepalive_interval: float | None = None,
                 backoff_min: float = 0.1, backoff_max: float = 5.0) -> None:
        if not endpoints:
            raise UsageError("no etcd endpoint given", "use etcd://HOST:PORT[,HOST:PORT...]")
        if ttl < 1:
            raise UsageError(f"invalid lease TTL {ttl}", "use a TTL of 1 s or more")
        self.endpoints = list(endpoints)
        self.owner = owner
        self.prefix = prefix  # the whole key range this session reads and watches
        self.name = name  # of the background task
        self.ttl = ttl
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval or ttl / 3
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.connected = False
        self.last_error: str | None = None
        self.lease_id = 0
        self.lock = asyncio.Lock()  # see the module docstring
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None  # aetcd.Client of the current session
        self._member = ""  # host:port of the current session
        self._synced = asyncio.Event()  # the first full sync is done
        self._poke = asyncio.Event()  # "check the lease now": one of our keys was deleted

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and sync, waiting at most `connect_timeout`: when etcd does not answer
        by then the agent starts anyway, serving the cache, and the session keeps trying."""
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name=self.name)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._synced.wait()
        except TimeoutError:
            log.warning("etcd at %s does not answer (%s): serving the last known state and "
                        "retrying in the background", self.where(), self.last_error)

    async def close(self) -> int:
        """Stop the session and revoke the lease: this node's keys vanish at once. When
        etcd is unreachable they vanish when the lease runs out instead. Returns the lease
        revoked (0 if none was)."""
        await self._stop_task()
        client, lease = self._client, self.lease_id
        revoked = 0
        if client is not None and lease and self.connected:
            try:
                async with asyncio.timeout(self.request_timeout):
                    await client.revoke_lease(lease)
                revoked = lease
            except _FOREIGN as exc:
                log.warning("could not revoke lease %x (%s): this node's endpoints expire "
                            "within %d s", lease, exc, self.ttl)
        elif lease:
            log.warning("etcd is unreachable at close: this node's endpoints expire within "
                        "%d s", self.ttl)
        await self._drop_client()
        self.lease_id = 0
        return revoked

    async def abandon(self) -> None:
        """Stop without revoking the lease, as a crashed agent would: this node's keys stay
        until the TTL runs out."""
        await self._stop_task()
        await self._drop_client()

    def poke(self) -> None:
        """Check the lease now (one of this node's keys was deleted) and reconcile."""
        self._poke.set()

    async def _stop_task(self) -> None:
        """Cancel the session's task until it ends, for at most `request_timeout`: aetcd
        waits with asyncio.wait_for (connecting, creating the watch), which on Python 3.11
        drops a cancellation that lands as its wait completes, and the session would run on
        while close() or abandon() awaited it forever. Past the bound it is left to the
        loop's end (the agent stops regardless) and said so."""
        task, self._task = self._task, None
        if task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        while not task.done() and (left := deadline - loop.time()) > 0:
            task.cancel()
            await asyncio.wait({task}, timeout=min(left, _RECANCEL_AFTER))
        if not task.done():
            log.warning("the etcd session did not end within %g s of its cancellation",
                        self.request_timeout)
        elif not task.cancelled() and (exc := task.exception()) is not None:
            log.error("the etcd session failed", exc_info=exc)

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self.connected = False
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
                self.last_error = f"{host}:{port}: {_detail(exc)}"
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
        alive = bool(self.lease_id) and await self._refresh(client) > 0
        if not alive:
            self.lease_id = await self._grant(client)
        # 2. Everything, as of one revision, replaces the owner's state (a Reset).
        resp = await self.range(client, self.prefix)
        revision = int(resp.header.revision)
        self.owner.reset(((kv.key, kv.value, kv.mod_revision, kv.lease) for kv in resp.kvs),
                         revision)
        # 3. Watch from the next revision: nothing between the read and the watch is lost.
        watch = await client.watch_prefix(self.prefix, start_revision=revision + 1)
        self.connected = True
        self.last_error = None
        self.owner.resynced()
        # 4. Put back what the outage cost us, drop what was removed meanwhile.
        async with self.lock:
            await self.owner.reconcile(client, lease_alive=alive)
        self._synced.set()
        log.info("etcd session %s: synced at revision %d, lease %x (%s)", self._member,
                 revision, self.lease_id, "kept" if alive else "new")
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
            self.owner.watched(bytes(ev.kv.key),
                               None if ev.kind == "DELETE" else bytes(ev.kv.value),
                               int(ev.kv.mod_revision), int(ev.kv.lease))

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
                            self.lease_id)
                async with self.lock:
                    self.lease_id = await self._grant(client)
                    await self.owner.reconcile(client, lease_alive=False)
            elif poked:
                async with self.lock:
                    await self.owner.reconcile(client, lease_alive=True)

    # -- etcd calls: the one place foreign exceptions become ours -----------------------
    def live(self) -> Any:
        """The client of the current session; TemporaryError while there is none."""
        if not self.connected or self._client is None:
            raise TemporaryError(f"etcd is unreachable ({self.last_error or 'connecting'})",
                                 self.hint())
        return self._client

    def hint(self) -> str:
        return (f"check etcd at {self.where()}; the agent keeps serving its last state, "
                "reconnects by itself, and the command can be retried")

    def where(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def _wrap(self, exc: BaseException, doing: str) -> MeshnodeError:
        detail = _detail(exc)
        self.last_error = f"{doing}: {detail}"
        code = _code(exc)
        if code in _PERMANENT or isinstance(exc, (aetcd.exceptions.InvalidArgumentError,
                                                  aetcd.exceptions.UnauthenticatedError,
                                                  aetcd.exceptions.PreconditionFailedError)):
            return RegistryError(f"etcd refused to {doing}: {detail}",
                                 "check etcd's version (3.4 or later), its authentication "
                                 "and its limits (--max-txn-ops)")
        if "lease not found" in detail:
            self._poke.set()  # our lease expired behind our back: re-grant it now
        return TemporaryError(f"etcd could not {doing}: {detail}", self.hint())

    async def call(self, doing: str, call: Awaitable[Any]) -> Any:
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

    async def txn(self, client: Any, doing: str, compare: list[Any], success: list[Any],
                  failure: list[Any]) -> Any:
        # aetcd's transaction() drops the response header; we need its revision
        req = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        return await self.call(doing, client.kvstub.Txn(req, timeout=self.request_timeout,
                                                        metadata=client.metadata))

    async def range(self, client: Any, key: bytes, end: bytes | None = None) -> Any:
        req = rpc.RangeRequest(key=key, range_end=prefix_end(key) if end is None else end)
        return await self.call("read " + key.decode(errors="replace"),
                               client.kvstub.Range(req, timeout=self.request_timeout,
                                                   metadata=client.metadata))

    async def get(self, client: Any, key: bytes) -> Any:
        """The key-value of one key, or None."""
        resp = await self.range(client, key, b"")
        return resp.kvs[0] if resp.kvs else None

    async def _grant(self, client: Any) -> int:
        lease = await self.call("grant a lease", client.lease(self.ttl))
        return int(lease.id)

    async def _refresh(self, client: Any) -> int:
        """The lease's TTL after a keepalive; 0 once it has expired or been revoked."""
        async def refresh() -> Any:
            async with asyncio.timeout(self.request_timeout):
                return await client.refresh_lease(self.lease_id)

        reply = await self.call("keep the lease alive", refresh())
        return int(reply.TTL) if reply is not None else 0


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
