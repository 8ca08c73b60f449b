"""The typed wire (meshnode.wire): both channels' messages survive a round trip, a value type's
new field travels without an edit to the wire, an unknown kind is skipped and counted, and no
input (random bytes, random JSON, plausible-but-wrong messages) crashes a decoder: it is a
message, a skipped kind, or a WireError. The control socket is driven end to end through a real
Unix socket by the CLI's client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnode.agent.client import AgentClient
from meshnode.agent.control import ControlServer
from meshnode.errors import (
    EX_PROTOCOL,
    KernelError,
    MeshnodeError,
    UsageError,
    WireError,
)
from meshnode.model import (
    Add,
    BalancerConfig,
    DoesNotExist,
    Endpoint,
    HostPort,
    Remove,
    Reset,
    ServicePolicy,
    ServiceSpec,
)
from meshnode.policy.resources import Timeouts
from meshnode.wire import (
    PROTOCOL,
    AgentMessage,
    CgroupSources,
    Codec,
    ConnEvent,
    ErrorInfo,
    Failure,
    Hello,
    HistogramCounts,
    Listening,
    PairCounters,
    Request,
    Result,
    StartError,
    StatsReply,
    StatsRequest,
    StreamItem,
    StreamStart,
    Sync,
    Synced,
    Tap,
    WorkerMessage,
    agent_codec,
    as_update,
    decode_reply,
    decode_request,
    encode,
    update_message,
    worker_codec,
)

pytestmark = pytest.mark.timeout(60)

SPEC = ServiceSpec("web", 3, IPv4Address("127.240.0.9"), ServicePolicy(
    port=80, fail_mode="closed", balancer=BalancerConfig("ring-hash", locality=False),
    timeouts=Timeouts(connect=0.5, idle=30.0), max_connections=100))
EPS = (Endpoint(HostPort.parse("127.0.0.1:8001"), "n1", "z1", 3),
       Endpoint(HostPort.parse("127.0.0.1:8002")))


@pytest.mark.parametrize("update", [Reset(SPEC, EPS), Add("web", EPS), Remove("web", EPS[:1]),
                                    DoesNotExist("web")])
def test_discovery_updates_survive_the_wire(update: Any) -> None:
    """Every field of the value types arrives, policy included (timeouts and max_connections
    are fields wire.py never names: they travel because the encoding is generic)."""
    msg = agent_codec().decode(encode(update_message(update)))
    assert as_update(msg) == update  # type: ignore[arg-type]


@pytest.mark.parametrize("msg", [
    Hello(PROTOCOL, "1.0"), Sync(7), StatsRequest(8), CgroupSources({"1234": "web"}),
    Tap(("web", "*")),
])
def test_agent_messages_survive_the_wire(msg: AgentMessage) -> None:
    assert agent_codec().decode(encode(msg)) == msg


@pytest.mark.parametrize("msg", [
    Hello(PROTOCOL), Listening(3, 1234), StartError("cannot listen", "ss -ltnp", 69),
    Synced(9), ConnEvent({"event": "close", "src": "web", "bytes_up": 5}),
    StatsReply(1, 0, 99, (PairCounters("web", "api", {"connections": 3}, {"refused": 1},
                                       {"connect": HistogramCounts([1, 2, 0], 0.25)}),),
               {"api": {"127.0.0.1:1": {"active": 1, "ewma_ms": 1.5}}},
               {"api": {"127.0.0.1:1": 3}}, {"unrouted": 2}),
])
def test_worker_messages_survive_the_wire(msg: WorkerMessage) -> None:
    assert worker_codec().decode(encode(msg)) == msg


def test_a_newer_peers_kind_is_skipped_and_counted_not_fatal() -> None:
    codec = agent_codec()
    assert codec.decode(b'{"t":"certificates","pem":"..."}') is None
    assert codec.decode(b'{"t":"certificates"}') is None
    assert codec.unknown == {"certificates": 2}
    # a known kind with a field this side does not know: the field is ignored
    assert codec.decode(b'{"t":"sync","seq":1,"deadline":3}') == Sync(1)
    # a known kind that is wrong is an error, not a skipped kind
    with pytest.raises(WireError, match=r"\$\.seq"):
        codec.decode(b'{"t":"sync","seq":"one"}')
    assert codec.unknown.total() == 2


@pytest.mark.parametrize("line", [
    b"", b"\n", b"null", b"[]", b"{}", b'{"t":5}', b"\xff\xfe", b'{"t":"reset"}',
    b'{"t":"reset","service":{"name":"web","id":1,"vip":"300.1.1.1"}}',
    b'{"t":"add","service":"web","endpoints":[{"addr":{"ip":"127.0.0.1","port":0}}]}',
    b'{"t":"reset","service":{"name":"web","id":1,"vip":"1.1.1.1","policy":{"lb":1}}}',
    b'{"t":"reset","service":{"name":"web","id":1,"vip":7}}',
    b"[" * 10000,
])
def test_bad_lines_are_wire_errors(line: bytes) -> None:
    with pytest.raises(WireError) as info:
        agent_codec().decode(line)
    assert info.value.exit_code == EX_PROTOCOL and info.value.hint


def _decode_all(data: bytes) -> None:
    """Every typed decoder, on one input: a value, a skipped kind or a WireError, nothing else."""
    codecs: list[Codec[Any]] = [agent_codec(), worker_codec()]
    for codec in codecs:
        with contextlib.suppress(WireError):
            codec.decode(data)
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(WireError):
            decode(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_a_decoder(data: bytes) -> None:
    _decode_all(data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20)
# The names the wire uses, so random objects reach deep into the typed decoders.
_KEYS = st.sampled_from([
    "t", "seq", "service", "endpoints", "name", "id", "vip", "policy", "addr", "ip", "port",
    "node", "zone", "weight", "protocol", "software", "cgroups", "services", "worker", "pid",
    "pairs", "values", "failures", "histograms", "selections", "record", "message", "hint",
    "exit_code", "op", "args", "value", "error", "type", "details", "item", "src", "dst",
    "balancer", "outlier", "failMode", "timeouts", "maxConnections", "algorithm"])
_TAGS = st.sampled_from(["hello", "reset", "add", "remove", "gone", "sync", "stats", "sources",
                         "tap", "listening", "error", "synced", "event", "result", "stream",
                         "item", "future-kind"])
_PLAUSIBLE = st.recursive(
    _JSON, lambda inner: st.dictionaries(_KEYS, inner, max_size=6), max_leaves=30)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_JSON, st.builds(lambda t, d: {**d, "t": t}, _TAGS,
                                  st.dictionaries(_KEYS, _PLAUSIBLE, max_size=6))))
def test_random_json_never_crashes_a_decoder(obj: Any) -> None:
    _decode_all(msgspec.json.encode(obj))


def test_request_envelope_is_strict() -> None:
    assert decode_request(b'{"op":"status"}') == Request("status", {})
    # the old flat form put arguments beside "op": refused, not silently dropped
    with pytest.raises(WireError, match="pid"):
        decode_request(b'{"op":"explain","pid":1}')


@pytest.mark.parametrize("err", [
    KernelError("bpf_prog_load failed", "see dmesg", errno=1),
    UsageError("bad name", "use letters"),
    WireError("bad line"),
])
def test_errors_survive_the_reply(err: MeshnodeError) -> None:
    reply = decode_reply(encode(Failure(ErrorInfo.of(err))))
    assert isinstance(reply, Failure)
    back = reply.error.error()
    assert type(back) is type(err) and str(back) == str(err)
    assert back.exit_code == err.exit_code
    assert getattr(back, "errno", None) == getattr(err, "errno", None)


def test_an_unknown_error_type_keeps_message_and_exit_code() -> None:
    reply = decode_reply(b'{"t":"error","error":{"type":"QuotaError","message":"too many",'
                         b'"hint":"remove one","exit_code":75}}')
    assert isinstance(reply, Failure)
    err = reply.error.error()
    assert type(err) is MeshnodeError and (err.message, err.exit_code) == ("too many", 75)


# -- the control socket, end to end ----------------------------------------------------------
@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentClient]:
    """A ControlServer with a few ops in its own loop thread, and the CLI's client for it."""
    if os.geteuid() != 0:
        pytest.skip("the control socket answers root only")

    async def echo(args: dict[str, Any]) -> Any:
        return {"args": args}

    async def fail(args: dict[str, Any]) -> Any:
        raise KernelError("cannot attach", "is bpffs mounted?", errno=int(args["errno"]))

    async def crash(args: dict[str, Any]) -> Any:
        raise RuntimeError("boom")

    async def count(args: dict[str, Any]) -> AsyncIterator[dict[str, int]]:
        async def items() -> AsyncIterator[dict[str, int]]:
            for i in range(int(args["n"])):
                yield {"i": i}
            await asyncio.Event().wait()  # a stream ends when the client hangs up

        return items()

    loop = asyncio.new_event_loop()
    server = ControlServer(tmp_path / "agent.sock",
                           {"echo": echo, "fail": fail, "crash": crash, "count": count})
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield AgentClient(tmp_path / "agent.sock", timeout=10)
    finally:
        async def shutdown() -> None:
            await server.stop()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:  # connections still being served
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_control_socket_results_errors_and_streams(agent: AgentClient) -> None:
    assert agent.call("echo", window=5, service="web") == {"args": {"window": 5,
                                                                    "service": "web"}}
    with pytest.raises(KernelError) as info:
        agent.call("fail", errno=13)
    assert info.value.errno == 13 and info.value.hint == "is bpffs mounted?"
    with pytest.raises(UsageError, match="unknown control operation 'nope'"):
        agent.call("nope")
    with pytest.raises(MeshnodeError, match="crash failed inside the agent: boom"):
        agent.call("crash")
    items = agent.stream("count", n=3)
    assert [next(items) for _ in range(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]
    items.close()  # hangs up: the agent ends the stream


def test_control_socket_answers_garbage_with_a_wire_error(agent: AgentClient) -> None:
    import socket

    for line in (b"not json\n", b'{"op":"echo","window":5}\n', b"[1,2]\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(agent.path))
            s.sendall(line)
            reply = decode_reply(s.makefile("rb").readline())
        assert isinstance(reply, Failure) and reply.error.type == "WireError", reply
    assert agent.call("echo") == {"args": {}}  # and it still serves


def test_stream_start_and_item_are_distinct_replies() -> None:
    assert decode_reply(encode(StreamStart())) == StreamStart()
    assert decode_reply(encode(StreamItem({"event": "open"}))) == StreamItem({"event": "open"})
    assert decode_reply(encode(Result([1, "a"]))) == Result([1, "a"])
