"""EtcdRegistry against a real etcd (Debian's etcd 3.4 on loopback, no root): two or more
registries play agents on different nodes. Every test has a timeout; clusters and registries
are torn down even when a test fails. Times are printed (run with -s to see them)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from meshnode.discovery.etcd import EtcdRegistry
from meshnode.discovery.registry import EndpointRecord, VipRange, patch_service
from meshnode.errors import ConflictError, NotFoundError, TemporaryError, UsageError
from meshnode.model import HostPort
from meshnode.policy import store
from meshnode.policy.document import parse
from meshnode.policy.store import Delete
from tests.etcd_cluster import EtcdCluster, TcpGate, etcd_available

pytestmark = pytest.mark.skipif(not etcd_available(), reason="needs etcd and etcdctl "
                                "(apt-get install etcd-server etcd-client)")

TTL = 2


def ep(text: str) -> EndpointRecord:
    return EndpointRecord(HostPort.parse(text), "static")


def addrs(reg: EtcdRegistry, service: str) -> set[str]:
    rec = reg.services().get(service)
    return set() if rec is None else {str(e.addr) for e in rec.endpoints}


async def eventually(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `pred` until it holds; the seconds that took. Fails the test after `timeout`."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.001)
    return time.monotonic() - start


def run(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body on a fresh event loop (no pytest-asyncio here)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path / "etcd", members=1) as cluster:
        cluster.start()
        yield cluster


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path / "etcd", members=3) as cluster:
        cluster.start()
        yield cluster


@contextlib.asynccontextmanager
async def agents(endpoints: list[tuple[str, int]] | list[list[tuple[str, int]]],
                 tmp_path: Path, *names: str,
                 **options: Any) -> AsyncIterator[list[EtcdRegistry]]:
    """Started registries, one per node name; abandoned (no network needed) on the way out,
    so a failed test cannot hang on a dead etcd."""
    regs = []
    try:
        for i, name in enumerate(names):
            eps = endpoints[i] if isinstance(endpoints[0], list) else endpoints
            opts: dict[str, Any] = {"ttl": TTL, "request_timeout": 1.0, "connect_timeout": 10.0,
                                    "backoff_min": 0.05, "backoff_max": 0.5, **options}
            reg = EtcdRegistry(eps, node=name,  # type: ignore[arg-type]
                               cache_path=tmp_path / f"{name}-cache.json", **opts)
            regs.append(reg)
            await reg.start()
            assert reg.describe()["connected"], reg.describe()
        yield regs
    finally:
        for reg in regs:
            await reg.abandon()


@pytest.mark.timeout(60)
@run
async def test_a_service_and_its_endpoints_reach_the_other_agent(etcd: EtcdCluster,
                                                                 tmp_path: Path) -> None:
    async with agents(etcd.endpoints, tmp_path, "a", "b") as (a, b):
        heard: list[int] = []
        b.subscribe(lambda: heard.append(1))
        web = await patch_service(a, "web", {"port": 80})
        assert a.services()["web"] == web  # read-your-writes, before the watch says so
        assert web.vip == IPv4Address("127.240.0.1") and web.id == VipRange().id_of(web.vip)
        await eventually(lambda: "web" in b.services(), 1, "service at b")
        at_b = b.services()["web"]
        assert (at_b.vip, at_b.id, at_b.port) == (web.vip, web.id, 80)
        await eventually(lambda: bool(heard), 1, "b's listeners hear of a remote change")
        # the same name from the other agent: the same service, settings merged
        again = await patch_service(b, "web", {"failMode": "closed"})
        assert (again.vip, again.id, again.port, again.fail_closed) == (web.vip, web.id, 80,
                                                                        True)

        heard.clear()
        start = time.monotonic()
        await a.add_endpoints("web", [ep("10.1.0.1:8080"), ep("10.1.0.2:8080")])
        took = await eventually(lambda: addrs(b, "web") == {"10.1.0.1:8080", "10.1.0.2:8080"},
                                1, "a's endpoints at b")
        print(f"\nregistration at a -> visible at b: {(time.monotonic() - start) * 1000:.1f} ms"
              f" (after the write returned: {took * 1000:.1f} ms)")
        await eventually(lambda: bool(heard), 1, "b's listeners hear of it")
        assert {e.node for e in b.services()["web"].endpoints} == {"a"}
        # the snapshot is also on disk, for an agent restarting while etcd is down
        cache = tmp_path / "b-cache.json"  # written at most every CACHE_DELAY
        await eventually(lambda: cache.exists() and "10.1.0.1:8080" in cache.read_text(),
                         5, "b's cache file")

        await b.remove_endpoints("web", [HostPort.parse("10.1.0.1:8080")])  # a's, by b
        await eventually(lambda: addrs(a, "web") == {"10.1.0.2:8080"}, 1, "removal at a")
        await b.apply([], [Delete("Service", "web")])
        await eventually(lambda: "web" not in a.services(), 1, "service removal at a")
        assert a.describe()["own_endpoints"] == 0  # a service's removal takes ours along


@pytest.mark.timeout(60)
@run
async def test_racing_agents_never_share_a_vip(etcd: EtcdCluster, tmp_path: Path) -> None:
    async with agents(etcd.endpoints, tmp_path, "a", "b") as (a, b):
        names = [f"svc{i}" for i in range(20)]
        recs = await asyncio.gather(*(
            patch_service((a if i % 2 else b), n, {}) for i, n in enumerate(names)))
        assert len({r.vip for r in recs}) == 20 and len({r.id for r in recs}) == 20
        shared = await asyncio.gather(patch_service(a, "shared", {}),
                                      patch_service(b, "shared", {}))
        assert shared[0].vip == shared[1].vip and shared[0].id == shared[1].id
        await eventually(lambda: len(a.services()) == len(b.services()) == 21, 2, "21 each")
        assert a.services() == b.services()
        vips = {r.vip for r in b.services().values()}
        assert len(vips) == 21
        # a freed VIP is reused, with the same id: the id is the VIP's offset
        first = b.services()["svc0"]
        await a.apply([], [Delete("Service", "svc0")])
        fresh = await patch_service(b, "fresh", {})
        assert (fresh.vip, fresh.id) == (first.vip, first.id)


@pytest.mark.timeout(60)
@run
async def test_applies_are_atomic_compare_and_swap_with_history(etcd: EtcdCluster,
                                                               tmp_path: Path) -> None:
    def svc(name: str, version: int = 0, **spec: Any) -> Any:
        return parse({"kind": "Service", "name": name, "spec": spec, "version": version})

    async with agents(etcd.endpoints, tmp_path, "a", "b") as (a, b):
        [web] = await a.apply([svc("web", port=80)])
        assert web.action == "created" and web.version == a.revision()
        await eventually(lambda: ("Service", "web") in b.resources(), 1, "web at b")
        assert b.resources()[("Service", "web")].version == web.version  # one version
        await b.apply([svc("web", web.version, port=81)])
        # a still holds version 1 when it tries to write over it: a conflict, not a loss
        with pytest.raises(ConflictError, match=f"changed since version {web.version}"):
            await a.apply([svc("web", web.version, port=82)])
        assert a.services()["web"].port == 81
        # the last document conflicts: the first two are not written either
        with pytest.raises(ConflictError):
            await a.apply([svc("x"), svc("y"), svc("web", web.version)])
        assert "x" not in a.services() and "x" not in b.services()
        for port in range(83, 83 + store.HISTORY_DEPTH):
            await a.apply([svc("web", port=port)])
        await a.apply([], [Delete("Service", "web")])
        h = await b.history("Service", "web")
        assert len(h) == store.HISTORY_DEPTH and h[-1].spec is None
        assert [e.spec["port"] for e in h[:-1] if e.spec] == list(range(84, 83 + 10))
        assert all(x.version < y.version for x, y in itertools.pairwise(h))


@pytest.mark.timeout(60)
@run
async def test_errors_match_the_embedded_store(etcd: EtcdCluster, tmp_path: Path) -> None:
    async with agents(etcd.endpoints, tmp_path, "a", "b") as (a, b):
        await patch_service(a, "a", {})
        await patch_service(a, "b", {})
        await a.add_endpoints("a", [ep("127.0.0.1:9000")])
        with pytest.raises(ConflictError, match="already belongs to service 'a'"):
            await b.add_endpoints("b", [ep("127.0.0.1:9000")])
        with pytest.raises(ConflictError, match="already belongs to service 'a'"):
            await a.add_endpoints("b", [ep("127.0.0.2:1"), ep("127.0.0.1:9000")])
        assert addrs(a, "b") == set()  # all or nothing
        # the same address in the same service from another node is fine (its own key)
        await b.add_endpoints("a", [ep("127.0.0.1:9000")])
        await eventually(lambda: len(a.services()["a"].endpoints) == 2, 1, "both nodes' keys")
        for bad in ("", "Web", "-a", "a_b", "x" * 64):
            with pytest.raises(UsageError):
                await patch_service(a, bad, {})
        with pytest.raises(UsageError):
            await patch_service(a, "p", {"port": 70000})
        with pytest.raises(NotFoundError):
            await b.add_endpoints("nope", [ep("127.0.0.1:1")])
        with pytest.raises(NotFoundError):
            await b.apply([], [Delete("Service", "nope")])
        await b.remove_endpoints("nope", [HostPort.parse("127.0.0.1:1")])  # no error
        # an address freed by its service's removal can join another service
        await b.apply([], [Delete("Service", "a")])
        await a.add_endpoints("b", [ep("127.0.0.1:9000")])


@pytest.mark.timeout(60)
@run
async def test_a_crashed_agents_endpoints_expire_within_the_ttl(etcd: EtcdCluster,
                                                                tmp_path: Path) -> None:
    async with agents(etcd.endpoints, tmp_path, "a", "b") as (a, b):
        await patch_service(a, "web", {})
        await a.add_endpoints("web", [ep("10.2.0.1:80")])
        await b.add_endpoints("web", [ep("10.2.0.2:80")])
        await eventually(lambda: len(addrs(b, "web")) == 2, 1, "both at b")
        await a.abandon()  # a crash: no revoke, the keepalive just stops
        took = await eventually(lambda: addrs(b, "web") == {"10.2.0.2:80"}, TTL + 2,
                                "a's endpoint expiring at b")
        print(f"\ncrash of a (ttl={TTL} s) -> its endpoints gone at b: {took:.2f} s")
        assert took <= TTL + 1.0  # etcd checks for expired leases every 0.5 s
        assert "web" in b.services()  # services have no lease: they stay


@pytest.mark.timeout(60)
@run
async def test_close_revokes_the_lease_at_once(etcd: EtcdCluster, tmp_path: Path) -> None:
    async with agents(etcd.endpoints, tmp_path, "a", "b") as (a, b):
        await patch_service(a, "web", {})
        await a.add_endpoints("web", [ep("10.3.0.1:80")])
        await eventually(lambda: bool(addrs(b, "web")), 1, "a's endpoint at b")
        await a.close()
        took = await eventually(lambda: not addrs(b, "web"), 1, "a's endpoint gone at b")
        print(f"\nclose of a -> its endpoints gone at b: {took * 1000:.1f} ms")


@pytest.mark.timeout(90)
@run
async def test_outage_keeps_the_snapshot_and_the_resync_resets_it(etcd: EtcdCluster,
                                                                  tmp_path: Path) -> None:
    gate = TcpGate(etcd.endpoints[0])  # a reaches etcd through it; b directly
    await gate.mend()
    try:
        async with agents([[gate.endpoint], etcd.endpoints], tmp_path, "a", "b") as (a, b):
            await patch_service(a, "web", {})
            await a.add_endpoints("web", [ep("10.4.0.1:80"), ep("10.4.0.2:80")])
            await b.add_endpoints("web", [ep("10.4.0.9:80")])
            await eventually(lambda: len(addrs(a, "web")) == 3, 1, "all three at a")
            before = a.services()

            # etcd goes down: a serves its snapshot, writes fail fast and say so
            await asyncio.to_thread(etcd.stop_member, 0)
            await eventually(lambda: not a.describe()["connected"], 5, "a notices")
            assert a.services() == before
            with pytest.raises(TemporaryError) as exc:
                await a.add_endpoints("web", [ep("10.4.0.3:80")])
            assert "etcd" in exc.value.hint
            with pytest.raises(TemporaryError):
                await patch_service(a, "other", {})
            with pytest.raises(TemporaryError):  # raised, but remembered for the resync
                await a.remove_endpoints("web", [HostPort.parse("10.4.0.2:80")])
            assert a.describe()["last_error"]

            # etcd returns, but a stays cut off long enough for its lease to expire, while
            # b removes its own endpoint
            await gate.cut()
            await asyncio.to_thread(etcd.start_member, 0)
            await eventually(lambda: b.describe()["connected"], 10, "b reconnects")
            await b.remove_endpoints("web", [HostPort.parse("10.4.0.9:80")])
            cut = time.monotonic()
            await eventually(lambda: addrs(b, "web") == set(), TTL + 10,
                             "a's lease expiring (seen from b)")
            print(f"\na cut off: its lease expired after {time.monotonic() - cut:.2f} s")
            assert addrs(a, "web") == {"10.4.0.1:80", "10.4.0.2:80", "10.4.0.9:80"}  # stale

            # a comes back: a full resync (b's removal is gone), its lease re-granted and
            # its endpoints back, minus the one it removed during the outage
            await gate.mend()
            back = time.monotonic()
            await eventually(lambda: a.describe()["connected"], 10, "a reconnects")
            await eventually(lambda: addrs(b, "web") == {"10.4.0.1:80"}, 2,
                             "a's endpoints back in etcd (seen from b)")
            print(f"a reconnected and re-registered in {time.monotonic() - back:.2f} s")
            # (b's watch may hear of a's write before a hears etcd's answer)
            await eventually(lambda: addrs(a, "web") == {"10.4.0.1:80"}, 1, "a's own view")
            assert a.describe()["last_error"] is None
            await a.add_endpoints("web", [ep("10.4.0.3:80")])  # writes work again
            await eventually(lambda: "10.4.0.3:80" in addrs(b, "web"), 1, "new write at b")
    finally:
        await gate.close()


@pytest.mark.timeout(60)
@run
async def test_an_agent_restarting_while_etcd_is_down_serves_its_cache(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    async with agents(etcd.endpoints, tmp_path, "a") as (a,):
        await patch_service(a, "web", {"port": 80})
        await a.add_endpoints("web", [ep("10.5.0.1:80")])
        cache = tmp_path / "a-cache.json"  # written CACHE_DELAY after the changes
        await eventually(lambda: cache.exists() and "10.5.0.1:80" in cache.read_text(), 5,
                         "cache written")
        last = a.services()
        await a.abandon()
    await asyncio.to_thread(etcd.stop_member, 0)
    again = EtcdRegistry(etcd.endpoints, node="a", cache_path=tmp_path / "a-cache.json",
                         ttl=TTL, request_timeout=0.5, connect_timeout=0.5, backoff_min=0.05,
                         backoff_max=0.2)
    try:
        await again.start()  # does not fail: etcd is down, the cache serves
        assert again.services() == last
        assert not again.describe()["connected"]
        with pytest.raises(TemporaryError):
            await again.add_endpoints("web", [ep("10.5.0.2:80")])
        await asyncio.to_thread(etcd.start_member, 0)
        await eventually(lambda: again.describe()["connected"], 10, "reconnect")
        assert again.services()["web"].vip == last["web"].vip
    finally:
        await again.abandon()


@pytest.mark.timeout(60)
@run
async def test_a_lease_lost_behind_the_agents_back_is_regranted(etcd: EtcdCluster,
                                                                tmp_path: Path) -> None:
    async with agents(etcd.endpoints, tmp_path, "a", "b") as (a, b):
        await patch_service(a, "web", {})
        await a.add_endpoints("web", [ep("10.6.0.1:80"), ep("10.6.0.2:80")])
        # b removes one of a's endpoints: a must forget it, not resurrect it later
        await b.remove_endpoints("web", [HostPort.parse("10.6.0.2:80")])
        await eventually(lambda: a.describe()["own_endpoints"] == 1, 2, "a forgets it")
        lease = a.describe()["lease_id"]
        await asyncio.to_thread(etcd.etcdctl, "lease", "revoke", lease)
        start = time.monotonic()
        await eventually(lambda: a.describe()["lease_id"] != lease, 2, "a new lease")
        await eventually(lambda: addrs(b, "web") == {"10.6.0.1:80"}, 2, "re-registered")
        print(f"\nlease revoked -> a's endpoints back: {time.monotonic() - start:.2f} s")


@pytest.mark.timeout(120)
@run
async def test_three_members_restarted_one_at_a_time(etcd3: EtcdCluster,
                                                     tmp_path: Path) -> None:
    async with agents([etcd3.endpoints, etcd3.endpoints[::-1]], tmp_path, "a", "b") as (a, b):
        await patch_service(a, "web", {})
        written: set[str] = set()
        failures: list[float] = []  # each failed stretch of writes, in seconds
        catch_up: list[float] = []  # after each restart: until b has all of a's writes
        ok = 0
        stop = asyncio.Event()

        async def writer() -> None:
            nonlocal ok
            n, failing_since = 0, None
            while not stop.is_set():
                addr = f"10.7.{n // 250}.{n % 250 + 1}:80"
                try:
                    await a.add_endpoints("web", [ep(addr)])
                    written.add(addr)
                    ok += 1
                    n += 1
                    if failing_since is not None:
                        failures.append(time.monotonic() - failing_since)
                        failing_since = None
                except TemporaryError:
                    failing_since = failing_since or time.monotonic()
                await asyncio.sleep(0.02)  # pacing the load, not synchronising

        task = asyncio.create_task(writer())
        try:
            for i in range(3):
                seen = ok
                # a crash (no leadership hand-over): when it hits the leader, the others
                # elect a new one first
                await asyncio.to_thread(functools.partial(etcd3.stop_member, i, kill=True))
                await eventually(lambda s=seen: ok > s + 5, 15, f"writes with m{i} down")
                await asyncio.to_thread(etcd3.start_member, i)
                seen = ok
                await eventually(lambda s=seen: ok > s + 5, 15, f"writes with m{i} back")
                # the watch keeps delivering (when b's own member was the one stopped, b
                # first moves to another member and resyncs)
                catch_up.append(await eventually(lambda: written <= addrs(b, "web"), 5,
                                                 "b caught up"))
        finally:
            stop.set()
            await task
        await eventually(lambda: addrs(b, "web") == written, 1, "final state at b")
        worst = max(failures, default=0.0)
        print(f"\n3 members restarted one at a time: {ok} writes, {len(failures)} failed "
              f"stretches, longest {worst:.2f} s; b caught up within "
              f"{', '.join(f'{t:.2f}' for t in catch_up)} s")
        assert worst < 5.0


@pytest.mark.timeout(60)
@run
async def test_a_restarted_agent_takes_over_its_predecessors_lease(etcd: EtcdCluster,
                                                                   tmp_path: Path) -> None:
    """An agent restart (detach, then a new registry on the same state directory) keeps this
    node's endpoints in etcd throughout: the new agent keeps the old lease alive instead of
    re-registering under a new one, so no other host sees them vanish."""
    async with agents(etcd.endpoints, tmp_path, "b") as (b,):
        first = EtcdRegistry(etcd.endpoints, node="a", cache_path=tmp_path / "a-cache.json",
                             ttl=TTL, request_timeout=1.0, backoff_min=0.05, backoff_max=0.5)
        await first.start()
        await patch_service(first, "web", {})
        await first.add_endpoints("web", [ep("10.7.0.1:80")])
        lease = first.describe()["lease_id"]
        await eventually(lambda: addrs(b, "web") == {"10.7.0.1:80"}, 2, "a's endpoint at b")
        vanished: list[int] = []
        b.subscribe(lambda: vanished.extend([1] if not addrs(b, "web") else []))
        await first.detach()  # an agent restart's stop
        await asyncio.sleep(TTL / 2)
        second = EtcdRegistry(etcd.endpoints, node="a", cache_path=tmp_path / "a-cache.json",
                              ttl=TTL, request_timeout=1.0, backoff_min=0.05, backoff_max=0.5)
        try:
            await second.start()
            assert second.describe()["lease_id"] == lease
            assert second.describe()["own_endpoints"] == 1  # adopted, not forgotten
            await asyncio.sleep(TTL + 1)  # past the old lease's TTL had nobody kept it alive
            assert addrs(b, "web") == {"10.7.0.1:80"} and not vanished
            await second.close()  # a removal: the lease is revoked, the endpoint goes
            await eventually(lambda: not addrs(b, "web"), 2, "a's endpoint gone at b")
        finally:
            await second.abandon()


@contextlib.asynccontextmanager
async def slow_link(target: tuple[str, int], delay: float) -> AsyncIterator[tuple[str, int]]:
    """A forwarder to `target` whose every connection answers `delay` late (the first bytes
    back: a busy host, a slow network); yields its address."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       late: float) -> None:
            try:
                while data := await src.read(65536):
                    await asyncio.sleep(late)
                    late = 0.0
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer, 0.0), pump(up_reader, writer, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield ("127.0.0.1", int(server.sockets[0].getsockname()[1]))
    finally:
        server.close()


@pytest.mark.timeout(60)
@run
async def test_a_member_behind_a_slow_link_is_reached(etcd: EtcdCluster,
                                                      tmp_path: Path) -> None:
    """A member that takes 300 ms to set a connection up is reached (gRPC's least connect
    time was 100 ms: such a member never was, and the agent moved on to the next one)."""
    async with slow_link(etcd.endpoints[0], 0.3) as member:
        t0 = time.monotonic()
        async with agents([member], tmp_path, "a", connect_timeout=5.0) as (a,):
            took = time.monotonic() - t0
            assert a.describe()["last_error"] is None
            await patch_service(a, "web", {})
        print(f"connected through a 300 ms link in {took:.2f} s")
        assert took < 2.0
