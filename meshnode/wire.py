"""Typed messages of meshnode's two channels, each with one encode and one decode path.

1. Agent <-> proxy worker: newline-delimited JSON over the agent's worker socket, which every
   worker connects to, and again after the agent restarts (framing: proxy/control.py on the
   worker's side, agent/workers.py on the agent's). One
   msgspec Struct per kind, tagged by "t". The agent opens with `Hello` (its protocol
   version) and the worker answers with its own, so an agent can tell what a worker it did not
   start speaks (a restarted agent re-adopting workers, issue 13). A kind the receiver does not
   know (a newer peer's) is ignored and counted, not fatal; a line that is not a message is a
   WireError, which the receiver logs and drops.

   agent -> worker   hello, reset / add / remove / gone (discovery updates), sync, stats,
                     sources (cgroup id -> source service), tap (services to send events for),
                     retain (the services still known, after an adoption), identities
                     (TLS material), peers (hosts serving mTLS), security (mTLS default,
                     authorization), gateway (ingress listeners with their certificates)
   worker -> agent   hello, listening, error (start-up failed, then exit), synced, stats
                     (counters, named by meshnode.counters), event (a tapped connection)

   Discovery updates carry the model's value types (ServiceSpec, Endpoint and the policy
   structs) as they are: msgspec encodes dataclasses and Structs field by field and builds them
   back through their constructors (so their validation runs), so a field added to one of them
   travels without an edit here.

2. CLI <-> agent control socket: one `Request` per connection line, `{"op", "args"}`; the agent
   answers with one `Reply`: `Result`, `Failure` (a typed error rebuilt whole on the CLI side,
   errno included), or `StreamStart` followed by `StreamItem` lines until the client hangs up.
   An op keeps its arguments as a name -> value mapping (the op validates them).

Pure, shared by the agent, the worker and the CLI: imports nothing of meshnode's but errors,
model and counters (and never a process package).
"""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address
from typing import Any, Generic, TypeVar

import msgspec

from meshnode.errors import MeshnodeError, WireError, from_wire
from meshnode.model import Add, DoesNotExist, Endpoint, Remove, Reset, ServiceSpec, Update
from meshnode.policy.authz import AuthzTable
from meshnode.policy.traffic import RouteSpec

__all__ = [
    "GATEWAY_FDS_SOCKET",
    "MIN_PROTOCOL",
    "PROTOCOL",
    "AgentMessage",
    "CgroupSources",
    "Codec",
    "ConnEvent",
    "EndpointsAdded",
    "EndpointsRemoved",
    "ErrorInfo",
    "Failure",
    "GatewayCert",
    "GatewayConfig",
    "GatewayListenerConfig",
    "Hello",
    "HistogramCounts",
    "Identities",
    "LabelledValue",
    "Listening",
    "PairCounters",
    "Peers",
    "Reply",
    "Request",
    "Result",
    "Retain",
    "Security",
    "ServiceGone",
    "ServiceReset",
    "StartError",
    "StatsReply",
    "StatsRequest",
    "StreamItem",
    "StreamStart",
    "Sync",
    "Synced",
    "Tap",
    "Tracing",
    "Traffic",
    "WorkerMessage",
    "agent_codec",
    "as_update",
    "decode_reply",
    "decode_request",
    "encode",
    "update_message",
    "worker_codec",
]

# The agent-worker protocol. Bump PROTOCOL when a message changes meaning; a peer speaking less
# than MIN_PROTOCOL cannot be driven and is replaced instead.
# 2: workers outlive the agent and reconnect to its worker socket; Hello names the worker;
# Listening names the listener's descriptor; Retain.
# 3: Identities, Peers, Security (mTLS between hosts, authorization).
# 4: Tracing; request counters and tap events of HTTP ports.
# 5: Traffic (Route resources), GatewayConfig (ingress gateway listeners).
PROTOCOL = 5
MIN_PROTOCOL = 1


class _Message(msgspec.Struct, frozen=True, tag_field="t"):
    """Base of the channel messages: tagged by "t". Unknown fields are allowed, so a newer
    peer may add one to a kind without breaking this one."""


# -- both directions -------------------------------------------------------------------------
class Hello(_Message, frozen=True, tag="hello"):
    """The agent's first message, and the worker's answer: the protocol each speaks. A worker
    names itself too (slot, pid, code build, the descriptors it holds for the agent), so an
    agent that did not start it (a restarted one) can adopt it."""

    protocol: int
    software: str = ""  # meshnode's version, for logs
    worker: int = -1
    pid: int = 0
    build: str = ""  # meshnode.build.code_build() of the agent that started the worker
    held: dict[str, int] = {}  # name -> descriptor number held for the agent (its DNS sockets)


# -- agent -> worker -------------------------------------------------------------------------
class Identities(_Message, frozen=True, tag="identities"):
    """The TLS material for connections between hosts. Paths, not PEM: the ssl module loads
    keys only from files. Each file is written once and never changed (0600, under the
    agent's run directory on tmpfs), so a worker may build contexts from it at any time;
    a rotated certificate arrives as a new file in a new message. Empty `node`: this host
    has no valid identity (no mTLS: inbound refuses, outbound to STRICT services fails)."""

    trust_domain: str = ""
    bundle: str = ""  # PEM trust anchors
    node: str = ""  # this host's certificate chain + key: the inbound listener presents it
    services: dict[str, str] = {}  # source service -> its certificate chain + key
    revoked_nodes: tuple[str, ...] = ()  # peers whose certificates are refused
    generation: int = 0  # grows with every change


class Peers(_Message, frozen=True, tag="peers"):
    """Hosts that accept the mesh's mTLS: node -> "ip:port" of its inbound listener."""

    nodes: dict[str, str] = {}


class Security(_Message, frozen=True, tag="security"):
    """Mesh-wide security settings: the default mTLS mode (a service's own overrides it)
    and the compiled authorization."""

    mtls_default: str = "PERMISSIVE"
    authz: AuthzTable = AuthzTable()


class Tracing(_Message, frozen=True, tag="tracing"):
    """Mesh-wide tracing (the Mesh resource's `tracing`): where spans go ("": kept nowhere)
    and the sampling probability of traces the proxy starts; `node` names this host in spans."""

    otlp_endpoint: str = ""
    sampling: float = 0.0
    node: str = ""


class Traffic(_Message, frozen=True, tag="traffic"):
    """Every Route resource (traffic control), by name, as validated; the worker compiles
    them (meshnode/route/traffic.py). `workers`: how many workers share this host's rate
    limits (each refills at its share)."""

    routes: dict[str, RouteSpec] = {}
    workers: int = 1


class ServiceReset(_Message, frozen=True, tag="reset"):
    service: ServiceSpec
    endpoints: tuple[Endpoint, ...] = ()


class EndpointsAdded(_Message, frozen=True, tag="add"):
    service: str
    endpoints: tuple[Endpoint, ...]


class EndpointsRemoved(_Message, frozen=True, tag="remove"):
    service: str
    endpoints: tuple[Endpoint, ...]


class ServiceGone(_Message, frozen=True, tag="gone"):
    service: str


class Sync(_Message, frozen=True, tag="sync"):
    """A barrier: the worker answers Synced once everything sent before it is applied."""

    seq: int


class StatsRequest(_Message, frozen=True, tag="stats"):
    seq: int


class CgroupSources(_Message, frozen=True, tag="sources"):
    """Every enrolled cgroup's id (low 32 bits, as text) -> its source service."""

    cgroups: dict[str, str]


class Retain(_Message, frozen=True, tag="retain"):
    """Forget every service but these: a restarted agent tells a worker it adopts which of
    the routes it kept are still in the registry (the Resets before it refreshed those)."""

    services: tuple[str, ...]


class Tap(_Message, frozen=True, tag="tap"):
    """Send events for connections from or to these services ("*": all; none: stop)."""

    services: tuple[str, ...] = ()


# -- the ingress gateway (agent -> worker) -------------------------------------------------------
# The agent binds each gateway listener (root, like the inbound one) and keeps it among the
# descriptors the workers hold for it (Hello.held, under GatewayListenerConfig.held). A worker
# that does not hold one yet (the listener opened after it started) takes a copy over this
# socket, beside the worker socket: it sends the held name and a newline, the agent answers
# with one byte and the descriptor (SCM_RIGHTS), or with no descriptor when it has none.
GATEWAY_FDS_SOCKET = "gateway-fds.sock"


class GatewayCert(msgspec.Struct, frozen=True):
    """One certificate of an https listener: the host names it serves, its chain and key
    (PEM: the agent read and checked the operator's files; the worker loads them from
    memory, never from a path it may not be allowed to read)."""

    hosts: tuple[str, ...]
    chain: str
    key: str


class GatewayListenerConfig(msgspec.Struct, frozen=True):
    """One listener: which gateway, the Service it calls into the mesh as, where, how.
    `certificates`: the first is the default (no SNI, or a name none lists)."""

    held: str  # the descriptor's name among the held ones
    gateway: str
    service: str
    address: str
    port: int
    protocol: str = "https"  # https | http
    certificates: tuple[GatewayCert, ...] = ()


class GatewayConfig(_Message, frozen=True, tag="gateway"):
    """Every gateway listener this host serves (none: close them all)."""

    listeners: tuple[GatewayListenerConfig, ...] = ()


AgentMessage = (Hello | ServiceReset | EndpointsAdded | EndpointsRemoved | ServiceGone | Sync
                | StatsRequest | CgroupSources | Tap | Retain | Identities | Peers | Security
                | Tracing | Traffic | GatewayConfig)


def update_message(u: Update) -> ServiceReset | EndpointsAdded | EndpointsRemoved | ServiceGone:
    """The message that carries a discovery update to the workers."""
    match u:
        case Reset(service, endpoints):
            return ServiceReset(service, endpoints)
        case Add(name, endpoints):
            return EndpointsAdded(name, endpoints)
        case Remove(name, endpoints):
            return EndpointsRemoved(name, endpoints)
        case DoesNotExist(name):
            return ServiceGone(name)
    raise TypeError(f"not a discovery update: {u!r}")


def as_update(msg: ServiceReset | EndpointsAdded | EndpointsRemoved | ServiceGone) -> Update:
    """The discovery update a message carries (the worker's side of update_message)."""
    match msg:
        case ServiceReset(service, endpoints):
            return Reset(service, endpoints)
        case EndpointsAdded(name, endpoints):
            return Add(name, endpoints)
        case EndpointsRemoved(name, endpoints):
            return Remove(name, endpoints)
        case ServiceGone(name):
            return DoesNotExist(name)
    raise TypeError(f"not an update message: {msg!r}")


# -- worker -> agent -------------------------------------------------------------------------
class Listening(_Message, frozen=True, tag="listening"):
    """The worker accepts connections; `listener` is the descriptor number of its listening
    socket, which the agent copies (pidfd_getfd) to hand to the workers it starts later."""

    worker: int
    pid: int
    listener: int = -1


class StartError(_Message, frozen=True, tag="error"):
    """The worker could not start (then it exits with `exit_code`)."""

    message: str
    hint: str = ""
    exit_code: int = 0


class Synced(_Message, frozen=True, tag="synced"):
    seq: int


class HistogramCounts(msgspec.Struct, frozen=True, array_like=True):
    """Counts per bucket (the last is +Inf) and the sum of the observations."""

    counts: list[int]
    sum: float = 0.0


class PairCounters(msgspec.Struct, frozen=True):
    """One (source, destination service) pair's figures, by meshnode.counters names:
    `values` (PAIR_FIELDS), `failures` by reason, `histograms` (PAIR_HISTOGRAMS)."""

    src: str
    dst: str
    values: dict[str, int] = {}
    failures: dict[str, int] = {}
    histograms: dict[str, HistogramCounts] = {}


class LabelledValue(msgspec.Struct, frozen=True, array_like=True):
    """One row of a counters.LabelledField: its label values, in the field's order."""

    labels: tuple[str, ...]
    value: int


class StatsReply(_Message, frozen=True, tag="stats"):
    """A worker's counters since it started. `pid` tells the agent when a worker id is a new
    process (its counters restarted from zero). `endpoints`: service -> endpoint -> ENDPOINT
    field -> value; `selections`: service -> endpoint -> attempts; `values`: WORKER_FIELDS;
    `labelled`: SECURITY_FIELDS rows (a worker before protocol 3 sends none)."""

    seq: int
    worker: int
    pid: int
    pairs: tuple[PairCounters, ...] = ()
    endpoints: dict[str, dict[str, dict[str, int | float]]] = {}
    selections: dict[str, dict[str, int]] = {}
    values: dict[str, int] = {}
    labelled: dict[str, tuple[LabelledValue, ...]] = {}  # counters.SECURITY_FIELDS by name


class ConnEvent(_Message, frozen=True, tag="event"):
    """A tapped connection opened or closed: the access log record plus "event"."""

    record: dict[str, Any]


WorkerMessage = Hello | Listening | StartError | Synced | StatsReply | ConnEvent


# -- encoding and decoding -------------------------------------------------------------------
def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, IPv4Address):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is IPv4Address and isinstance(obj, str):
        return IPv4Address(obj)  # a ValueError here becomes msgspec's ValidationError
    # TypeError, not NotImplementedError: msgspec turns it into a ValidationError with the path
    raise TypeError(f"expected an address string, got {type(obj).__name__}")


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)
# Any line that is a JSON object with a string "t": what an unknown kind still looks like.
_KIND = msgspec.json.Decoder(dict[str, Any])

# Everything a decoder may raise for bad input: msgspec's errors, and the model's constructors'
# (UsageError from HostPort and friends, ValueError/TypeError from odd values).
_BAD_INPUT = (msgspec.DecodeError, MeshnodeError, ValueError, TypeError, OverflowError,
              RecursionError)


def encode(msg: msgspec.Struct) -> bytes:
    """One message as a line (JSON and a newline): the only encoder of both channels."""
    return _ENCODER.encode(msg) + b"\n"


M = TypeVar("M")


class Codec(Generic[M]):
    """Decoding of one direction of the agent-worker channel: a line becomes a typed message,
    None for a kind this side does not know (counted in `unknown`), or a WireError."""

    def __init__(self, kind: Any, what: str) -> None:
        self._decoder: msgspec.json.Decoder[M] = msgspec.json.Decoder(kind, dec_hook=_dec_hook)
        self._what = what
        self._tags = _tags_of(kind)
        self.unknown: Counter[str] = Counter()

    def decode(self, line: bytes) -> M | None:
        try:
            return self._decoder.decode(line)
        except _BAD_INPUT as exc:
            kind = _kind_of(line)
            if kind is not None and kind not in self._tags:
                self.unknown[kind] += 1  # a newer peer's message: skip it
                return None
            raise WireError(f"bad {self._what} message: {_reason(exc)}",
                            "the agent and its workers run different meshnode versions?") \
                from None


def _tags_of(union: Any) -> frozenset[str]:
    info = msgspec.inspect.type_info(union)
    types = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return frozenset(str(t.tag) for t in types if isinstance(t, msgspec.inspect.StructType))


def _kind_of(line: bytes) -> str | None:
    try:
        obj = _KIND.decode(line)
    except _BAD_INPUT:
        return None
    kind = obj.get("t")
    return kind if isinstance(kind, str) else None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def agent_codec() -> Codec[AgentMessage]:
    """What the worker reads: messages from the agent."""
    return Codec(AgentMessage, "agent")


def worker_codec() -> Codec[WorkerMessage]:
    """What the agent reads: messages from a worker."""
    return Codec(WorkerMessage, "worker")


# -- the control socket ----------------------------------------------------------------------
class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One operation. Unknown fields are refused: a misspelt or misplaced argument (outside
    `args`) is an error, not silently dropped."""

    op: str
    args: dict[str, Any] = {}


class ErrorInfo(msgspec.Struct, frozen=True):
    """A MeshnodeError as data (MeshnodeError.to_wire); `details` are its further constructor
    arguments (errno)."""

    type: str
    message: str
    hint: str = ""
    exit_code: int = 70
    details: dict[str, int | str | float] = {}

    @classmethod
    def of(cls, err: MeshnodeError) -> ErrorInfo:
        return msgspec.convert(err.to_wire(), cls)

    def error(self) -> MeshnodeError:
        return from_wire(msgspec.structs.asdict(self))


class _Reply(msgspec.Struct, frozen=True, tag_field="t"):
    """Base of the agent's answers (unknown fields allowed: a newer agent may add some)."""


class Result(_Reply, frozen=True, tag="result"):
    value: Any = None


class Failure(_Reply, frozen=True, tag="error"):
    error: ErrorInfo


class StreamStart(_Reply, frozen=True, tag="stream"):
    """The op streams: StreamItem lines follow until the client closes the connection."""


class StreamItem(_Reply, frozen=True, tag="item"):
    item: Any = None


Reply = Result | Failure | StreamStart | StreamItem

_REQUEST = msgspec.json.Decoder(Request)
_REPLY = msgspec.json.Decoder(Reply)


def decode_request(line: bytes) -> Request:
    """The agent's side: a request line, or WireError."""
    try:
        return _REQUEST.decode(line)
    except _BAD_INPUT as exc:
        raise WireError(f"malformed control request: {_reason(exc)}",
                        'send one JSON object per line: {"op": NAME, "args": {...}}') from None


def decode_reply(line: bytes) -> Reply:
    """The CLI's side: a reply line, or WireError."""
    try:
        return _REPLY.decode(line)
    except _BAD_INPUT as exc:
        raise WireError(f"malformed reply from the agent: {_reason(exc)}") from None
