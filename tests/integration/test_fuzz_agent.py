"""Fuzzing a running agent (issue 13, item 8): everything a stranger on the host can send to
its sockets, and the agent keeps serving.

One agent (eBPF capture: none of these surfaces depends on capture) in its own namespace;
its control socket, its DNS server over UDP and TCP (127.0.0.1:15053) and its admin HTTP port
(127.0.0.1:15090) get random bytes and malformed-but-plausible input: garbage and wrong-typed
requests, DNS messages that are no queries, HTTP requests with bad methods, paths, headers and
bodies, huge headers, and bounded slowloris and connection floods. After each surface the
agent must still answer `ping`, a DNS query for a service (UDP and TCP) and GET /metrics, and
its log must hold no traceback (every failure a typed, one-line error). Counts per surface
are printed (`pytest -s`):
`fuzz SURFACE: N inputs, 0 crashes (outcomes)`.

The control socket is a path, reached from this process; the ports are reached from a fuzzer
process inside the namespace (`nsenter`, as Host.http_get does), which runs `fuzz_main` of
this module and prints its counts as one JSON line. Fixed seeds and counts: the same inputs
every run, the whole file in well under a minute.
"""

from __future__ import annotations

import json
import random
import re
import select
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, DNSRecord

from meshnode.errors import WireError
from meshnode.telemetry.admin import CLIENT_TIMEOUT
from meshnode.wire import Failure, Request, Result, StreamItem, StreamStart, decode_reply, encode
from tests.harness import Host, free_port

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

SEED = 138  # issue 13, item 8
SERVICE = "live-check"  # the liveness service: no fuzzed input names it
DNS_PORT, ADMIN_PORT = 15053, 15090
ROOT = Path(__file__).resolve().parents[2]
COUNTS = {"control-socket": 600, "dns-udp": 2000, "dns-tcp": 300, "admin-http": 400}
REPLY_TIMEOUT = 10.0  # seconds an answer may take before the input counts as a hang
# Control operations that once failed untyped on wrong-typed arguments (each now a UsageError):
# any untyped failure fails the test. (An entry here would tolerate one, by (operation,
# pattern of the exception's text), while its fix is pending.)
KNOWN_UNTYPED: list[tuple[str, str]] = []

Tally = Counter[str]


# -- inputs ----------------------------------------------------------------------------------
_ODD = ["", " ", "\n", "\x00", "Web", "é", "\u202e", "a" * 300, "-", "..", "/", "127.0.0.1:80",
        "127.0.0.1:0", "300.1.1.1:1", "Service", "*", "%s", "{}", "\\", "\udc80"]
# JSON text json.dumps cannot write: deep nesting, non-standard numbers, out-of-range numbers
_RAW = ["[" * 3000 + "]" * 3000, '{"a":' * 3000 + "1" + "}" * 3000, "Infinity", "NaN",
        "1e400", "18446744073709551616", "-9223372036854775809", "1" * 5000]


def nasty(rng: random.Random, depth: int = 0) -> str:
    """A random JSON value as text: scalars of every type, odd strings, huge and out-of-range
    numbers, nesting, and now and then text that is no JSON at all."""
    roll = rng.random()
    if depth < 3 and roll < 0.15:
        return "[" + ",".join(nasty(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"
    if depth < 3 and roll < 0.3:
        return "{" + ",".join(f"{json.dumps(rng.choice(_ODD))}:{nasty(rng, depth + 1)}"
                              for _ in range(rng.randrange(4))) + "}"
    if roll < 0.38:
        return rng.choice(_RAW)
    return json.dumps(rng.choice([
        None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 - 1, 10**20, 0.5, -1e308,
        rng.randrange(-(2**40), 2**40), rng.choice(_ODD),
        "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(8)))]))


def mutate(rng: random.Random, data: bytes, count: int = 3) -> bytes:
    """`data` with a few random edits: flips, cuts, inserts, repeats."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, count + 1)):
        at = rng.randrange(len(buf) + 1)
        end = min(len(buf), at + rng.randrange(1, 30))
        match rng.randrange(4):
            case 0 if buf:
                buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
            case 1:
                del buf[at:end]
            case 2:
                buf[at:at] = rng.randbytes(rng.randrange(1, 12))
            case _:
                buf[at:at] = buf[at:end] * rng.randrange(2, 20)
    return bytes(buf)


# Operations a fuzzed request may name: every read, and writes that only add or remove what
# the fuzz itself names. Never enroll (it moves processes between cgroups) nor anything that
# stops the agent.
CONTROL_OPS = ["ping", "status", "explain", "stat", "top", "tap", "hosts", "get", "history",
               "rollback", "delete", "apply", "service.add", "service.remove", "", "nope",
               "PING", "ping\n", "status ", "resources.apply", "\u0000"]
ARG_NAMES = ["pid", "dest", "service", "name", "kind", "window", "limit", "src", "dst",
             "failed_only", "docs", "sources", "version", "to", "endpoints", "patch", "weight"]
_PLAUSIBLE_VALUES = {
    "kind": ['"Service"', '"Route"', '""'], "name": ['"fz-a"', '"fz-b"', '"Fz"', '""'],
    "docs": ['[{"kind":"Service","name":"fz-doc","spec":{"port":81}}]',
             '[{"kind":"Service","name":"fz-doc","spec":{"port":"81"}}]', "[]", "[5]"],
    "patch": ['{"port":82}', '{"port":70000}', '{"balancer":{"algorithm":"nope"}}', "[]"],
    "endpoints": ['["127.0.0.1:9"]', '["x"]', "[5]", '"127.0.0.1:9"'],
    "window": ["60", "0", "-1", "600.5", '"10"'], "pid": ["1", "-1", '"1"', "4194305"],
}


def control_inputs(rng: random.Random, count: int) -> Iterator[bytes]:
    """Lines for the control socket: random bytes, edits of valid requests, and requests of
    real operations whose arguments are right, wrong-typed or absurd."""
    corpus = [encode(Request("ping")), encode(Request("status")),
              encode(Request("explain", {"pid": 1, "dest": "fz-a.mesh:80"})),
              encode(Request("get", {"kind": "Service"})),
              encode(Request("stat", {"window": 10, "service": "fz-a"}))]
    # regression: PID 1's namespace link is unreadable even to root in a container, and
    # explain failed untyped (PermissionError) instead of an AccessError
    yield encode(Request("explain", {"pid": 1, "dest": f"{SERVICE}.mesh:80"}))
    for i in range(count - 1):
        kind = i % 4
        if kind == 0:
            yield rng.randbytes(rng.choice((0, 1, 5, 64, 500, 3000))) + rng.choice((b"\n", b""))
        elif kind == 1:
            yield mutate(rng, rng.choice(corpus))
        else:
            args = {}
            for name in rng.sample(ARG_NAMES, rng.randrange(4)):
                plausible = _PLAUSIBLE_VALUES.get(name)
                args[name] = (rng.choice(plausible) if plausible and rng.random() < 0.6
                              else nasty(rng))
            body = ",".join(f"{json.dumps(k)}:{v}" for k, v in args.items())
            op = json.dumps(rng.choice(CONTROL_OPS))
            line = (f'{{"op":{op},"args":{{{body}}}}}' if rng.random() < 0.9
                    else f'{{"op":{op},{body}}}')  # arguments beside "op": refused
            yield line.encode(errors="surrogatepass") + b"\n"


def _dns_query(name: str, qtype: str = "A", qid: int = 0x1234,
               edns: int | None = None) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid  # not dnslib's random one: the same inputs every run
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return bytes(q.pack())


def dns_inputs(rng: random.Random, count: int) -> Iterator[bytes]:
    """DNS messages: random bytes, edits of queries (mesh names, SRV, EDNS, outside names),
    and well-formed messages that are wrong as queries (responses, odd opcodes, flag and
    RCODE bits, counts that lie, labels DNS cannot carry)."""
    corpus = [_dns_query(n, t, edns=e) for n in (f"{SERVICE}.mesh", f"_{SERVICE}._tcp.mesh",
                                                 "10-0-0-1.n1.ep.mesh", "nope.mesh", "mesh",
                                                 "example.org")
              for t in ("A", "AAAA", "SRV", "ANY") for e in (None, 4096)]
    # regressions: names dnslib parses but cannot pack (a 64-byte label, a 260-byte name)
    # raised out of the zone; a query with RCODE and TC set got NOTAUTH, truncated
    header = struct.pack("!HHHHHH", 0x0BAD, 0x0100, 1, 0, 0, 0)
    tail = b"\x04mesh\0" + struct.pack("!HH", 1, 1)
    yield header + b"\x40" + b"a" * 64 + tail
    yield header + (b"\x3f" + b"a" * 63) * 4 + tail
    flagged = bytearray(_dns_query(f"{SERVICE}.mesh"))
    flagged[2:4] = b"\x03\x09"  # TC, RD; RCODE 9
    yield bytes(flagged)
    for i in range(count - 3):
        kind = i % 5
        if kind == 0:
            yield rng.randbytes(rng.choice((0, 1, 11, 12, 13, 40, 512, 1500)))
        elif kind in (1, 2):
            yield mutate(rng, rng.choice(corpus))
        elif kind == 3:
            msg = bytearray(rng.choice(corpus))
            msg[0:2] = rng.randbytes(2)  # the id
            msg[2] = rng.randrange(256)  # QR, opcode, AA, TC, RD
            msg[3] = rng.randrange(256)  # RA, Z, AD, CD, RCODE
            msg[4:12] = struct.pack("!HHHH", *(rng.choice((0, 1, 2, 255, 65535))
                                               for _ in range(4)))
            yield bytes(msg)
        else:
            labels = [bytes([rng.choice((63, 64, 127, 128, 191))]) + b"a" * 191,  # too long
                      (b"\x3f" + b"a" * 63) * 4, b"\xc0\x0c", b"\xc0\xff", b"\x01\x00"]
            yield (struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 1, 0, 0, 0)
                   + rng.choice(labels) + b"\x04mesh\0" + struct.pack("!HH", 1, 1))


# -- the fuzzer inside the namespace ---------------------------------------------------------
def _recv_all(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything until the peer closes; (data, whether it closed within `timeout`)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        return b"".join(chunks), False
    except ConnectionError:
        pass
    return b"".join(chunks), True


def _dns_answer_ok(data: bytes, sent_ids: set[int] | None) -> bool:
    """An answer (QR set) that parses, to a message we sent (None: to whatever we sent)."""
    try:
        answer = DNSRecord.parse(data)
    except Exception:
        return False
    return bool(answer.header.qr) and (sent_ids is None or answer.header.id in sent_ids)


def _id_of(message: bytes) -> set[int] | None:
    return {struct.unpack("!H", message[:2])[0]} if len(message) >= 2 else None


def fuzz_dns_udp(port: int, seed: int, count: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tally: Tally = Counter()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sent_ids: set[int] = set()

    def drain(wait: float) -> None:
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                return
            data = sock.recv(65536)
            tally["answered" if _dns_answer_ok(data, sent_ids) else "bad answer"] += 1

    inputs = list(dns_inputs(rng, count))
    inputs += [rng.randbytes(65000), _dns_query(SERVICE + ".mesh") + b"\0" * 60000]  # huge
    for n, data in enumerate(inputs):
        if len(data) >= 2:
            sent_ids.add(struct.unpack("!H", data[:2])[0])
        sock.sendto(data, ("127.0.0.1", port))
        if n % 50 == 49:
            drain(0.02)  # paced: the agent's socket buffer, not the fuzz, decides
    drain(3.0)  # forwarded names: the (absent) upstream fails within its 1.5 s timeout
    tally["no answer"] = len(inputs) - tally.total()
    return {"inputs": len(inputs), "outcomes": tally}


def fuzz_dns_tcp(port: int, seed: int, count: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tally: Tally = Counter()
    for n, query in enumerate(dns_inputs(rng, count)):
        framed = struct.pack("!H", len(query)) + query
        ids = None if n % 6 == 0 else _id_of(query)  # garbage may read as any query
        payload = [
            rng.randbytes(rng.randrange(0, 600)),  # garbage (a length, then whatever)
            framed,
            framed * rng.randrange(2, 6),  # pipelined
            struct.pack("!H", 65535) + query,  # a length the message never fills
            b"\x00\x00",  # an empty message
            framed[: rng.randrange(1, len(framed) + 1)],  # cut short
        ][n % 6]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError:  # closed mid-send
                pass
            data, closed = _recv_all(s, REPLY_TIMEOUT)
        answers, bad = 0, 0
        while len(data) >= 2 and len(data) >= 2 + (size := struct.unpack("!H", data[:2])[0]):
            answers += 1
            bad += not _dns_answer_ok(data[2:2 + size], ids)
            data = data[2 + size:]
        if not closed:
            tally["hang"] += 1
        elif bad:
            tally["bad answer"] += 1
        else:
            tally[f"{answers} answers" if answers < 3 else "3+ answers"] += 1
    # Connections held open: idle ones beyond the server's limit (128), and slowloris ones
    # that sent half a length; UDP must answer meanwhile, TCP again once they are gone.
    held = []
    for i in range(150):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 5 == 0:
            s.sendall(b"\x00")
        held.append(s)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    udp.sendto(_dns_query(SERVICE + ".mesh", qid=7), ("127.0.0.1", port))
    during = "answered" if _dns_answer_ok(udp.recv(4096), {7}) else "bad answer"
    for s in held:
        s.close()
    return {"inputs": count, "outcomes": tally,
            "note": f"UDP while 150 TCP connections were held: {during}"}


HTTP_PATHS = ["/metrics", "/ready", "/api/overview", "/api/hosts", "/", "/index.html",
              "/static/", "/static/../../etc/passwd", "/static/%2e%2e/x", "/static/a%0a",
              "/static/%00", "/v1/catalog/services", f"/v1/catalog/service/{SERVICE}",
              "/v1/catalog/service/", "/v1/catalog/service/a/b", "//", "*", "", "x",
              "/%ff%fe", "/\u00e9", "/" + "a" * 5000, "/api/overview?window=nan",
              "/api/overview?window=1e999", "/api/overview?window=-1&window=2",
              "/v1/catalog/services?index=" + "9" * 5000, "/v1/catalog/services?wait=1e999s",
              "/v1/catalog/services?index=x", "/v1/catalog/services?x=1",
              f"/v1/catalog/service/{SERVICE}?index=1&wait=100ms", "/metrics?%zz"]
HTTP_METHODS = ["GET"] * 6 + ["HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT",
                              "PRI", "get", "G\x00T", "", "GET GET", "\u00c9"]
HTTP_VERSIONS = ["HTTP/1.1"] * 4 + ["HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x", "HTTP/",
                                    "HTTP/1.1.1", "FTP/1.0", "HTTP/9999999999999999999.0"]
HTTP_HEADERS = ["Accept: application/openmetrics-text; version=abc",  # once a 500
                "Accept: application/openmetrics-text; version=1.0.0; escaping=values",
                "Accept: text/plain; version=\u00e90.0.4", "Host: " + "h" * 3000,
                "Content-Length: -1", "Content-Length: 99999999999999999999",
                "Content-Length: x", "Transfer-Encoding: chunked", "Expect: 100-continue",
                "Connection: keep-alive", "X-Empty:", ": no name", "No-Colon",
                " folded: header", "Cookie: " + "c=1;" * 1000]


def http_inputs(rng: random.Random, count: int) -> Iterator[bytes]:
    """Requests: random bytes, and requests whose method, path, version, headers and body
    are picked from bad ones (or random edits of good ones), huge headers included."""
    # regression: prometheus-client's parser raised TypeError (a 500) on this Accept header
    yield (b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=abc"
           b"\r\n\r\n")
    for i in range(1, count):
        if i % 8 == 0:
            yield rng.randbytes(rng.choice((1, 10, 200, 5000)))
            continue
        method = rng.choice(HTTP_METHODS)
        path = rng.choice(HTTP_PATHS)
        version = rng.choice(HTTP_VERSIONS)
        headers = rng.sample(HTTP_HEADERS, rng.randrange(4))
        if i % 8 == 1:
            headers.append("X-Huge: " + "a" * 70_000)  # over http.server's 64 KiB line
        elif i % 8 == 2:
            headers += [f"X-{n}: {n}" for n in range(120)]  # over its 100 headers
        elif i % 8 == 3:
            path = "/" + "p" * 70_000
        request = (f"{method} {path} {version}\r\n" + "".join(h + "\r\n" for h in headers)
                   + "\r\n" + ("body" * rng.randrange(3) if method != "GET" else ""))
        data = request.encode(errors="surrogatepass")
        yield mutate(rng, data) if i % 8 == 4 else data


def _status_of(response: bytes) -> str:
    line = response.split(b"\r\n", 1)[0]
    parts = line.split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    # http.server takes a request line it cannot read, or one of two words, for HTTP/0.9
    # and answers as that did: the body (an error page) without status line or headers
    if m := re.search(rb"<p>Error code: (\d+)</p>", response):
        return f"{m[1].decode()} (HTTP/0.9 error page)"
    return "HTTP/0.9 body" if response else "closed without a response"


def _get(port: int, path: str, timeout: float = 10.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return _status_of(_recv_all(s, timeout)[0])


def fuzz_admin(port: int, seed: int, count: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tally: Tally = Counter()
    # Slowloris, bounded: requests that never end their headers, opened first; /metrics must
    # answer while they are held, and the agent must drop them after its client timeout.
    held = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GE")
        held.append(s)
    deadline = time.monotonic() + CLIENT_TIMEOUT + 5
    for request in http_inputs(rng, count):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(request)
                s.shutdown(socket.SHUT_WR)
            except OSError:  # the agent answered and closed mid-send (a 414, say)
                pass
            data, closed = _recv_all(s, REPLY_TIMEOUT)
        tally[_status_of(data) if closed else "hang"] += 1
    during = _get(port, "/metrics")
    dropped = sum(_recv_all(s, max(0.1, deadline - time.monotonic()))[1] for s in held)
    for s in held:
        s.close()
    tally["hang"] += len(held) - dropped
    return {"inputs": count + len(held), "outcomes": tally,
            "note": f"/metrics while 40 slowloris requests were held: {during}; "
                    f"{dropped} of them dropped by the agent within {CLIENT_TIMEOUT + 5:g} s"}


def probe(dns_port: int, admin_port: int, name: str) -> dict[str, Any]:
    """What a client gets now: the A records of `name` over UDP and TCP, and /metrics."""
    def addresses(answer: bytes) -> list[str]:
        return [str(rr.rdata) for rr in DNSRecord.parse(answer).rr if rr.rtype == QTYPE.A]

    query = _dns_query(name, qid=0x4242)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    udp.sendto(query, ("127.0.0.1", dns_port))
    over_udp = addresses(udp.recv(4096))
    with socket.create_connection(("127.0.0.1", dns_port), timeout=5) as s:
        s.sendall(struct.pack("!H", len(query)) + query)
        s.shutdown(socket.SHUT_WR)
        over_tcp = addresses(_recv_all(s, 5)[0][2:])
    return {"udp": over_udp, "tcp": over_tcp, "metrics": _get(admin_port, "/metrics")}


def fuzz_main() -> None:
    """Entry point of the fuzzer process (argv: SURFACE ARGS...): prints one JSON line."""
    what, *args = sys.argv[1:]
    surfaces: dict[str, Callable[..., dict[str, Any]]] = {
        "dns-udp": fuzz_dns_udp, "dns-tcp": fuzz_dns_tcp, "admin-http": fuzz_admin,
        "probe": probe}
    if what == "probe":
        out = probe(int(args[0]), int(args[1]), args[2])
    else:
        out = surfaces[what](int(args[0]), int(args[1]), int(args[2]))
    print(json.dumps(out))


def in_namespace(h: Host, *args: str, timeout: float = 120) -> dict[str, Any]:
    """`fuzz_main ARGS` in a process inside the host's namespace."""
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{h.netns}", sys.executable, "-c",
         "from tests.integration.test_fuzz_agent import fuzz_main; fuzz_main()", *args],
        cwd=ROOT, env=h.env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- the control socket (a path: reached from here) ------------------------------------------
def fuzz_control(path: Path, seed: int, count: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tally: Tally = Counter()
    untyped: list[str] = []

    def send(payload: bytes) -> list[str]:
        """The outcome of each reply line to `payload` (one connection)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(path))
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)  # the end of a stream too (tap)
            except OSError:  # closed mid-send (a line over the 1 MiB limit)
                pass
            data, closed = _recv_all(s, REPLY_TIMEOUT)
        if not closed:
            return ["hang"]
        outcomes = []
        for line in data.splitlines():
            try:
                reply = decode_reply(line)
            except WireError:
                outcomes.append("undecodable reply")
                continue
            match reply:
                case Failure(error) if "failed inside the agent" in error.message:
                    outcomes.append("untyped error")
                    untyped.append(error.message)
                case Failure(error):
                    outcomes.append(error.type)
                case Result() | StreamStart() | StreamItem():
                    outcomes.append(type(reply).__name__)
        return outcomes or ["closed without a reply"]

    inputs = list(control_inputs(rng, count))
    for payload in inputs:
        tally.update(send(payload))
    # a line over the 1 MiB limit, nothing at all, and 100 requests on one connection
    tally.update(send(b'{"op":"ping","args":{"x":"' + b"a" * (1 << 20) + b'"}}\n'))
    tally.update(send(b""))
    pipelined = send(b"".join(inputs[:100]))
    tally.update(o for o in pipelined if o in ("hang", "undecodable reply", "untyped error"))
    return {"inputs": len(inputs) + 3, "outcomes": tally, "untyped": untyped, "per_reply": True,
            "note": f"100 requests on one connection: {len(pipelined)} replies"}


# -- the test --------------------------------------------------------------------------------
def report(surface: str, result: dict[str, Any]) -> None:
    outcomes = Counter(result["outcomes"])
    text = ", ".join(f"{n} {what}" for what, n in outcomes.most_common() if n)
    if result.get("per_reply"):  # a line of random bytes may hold several requests
        text = f"per reply: {text}"
    crashes = outcomes["hang"] + outcomes["bad answer"] + outcomes["undecodable reply"]
    note = f"; {result['note']}" if result.get("note") else ""
    print(f"\nfuzz {surface}: {result['inputs']} inputs, {crashes} crashes ({text}){note}")


def known(message: str) -> bool:
    """Whether an untyped failure's reply is one of KNOWN_UNTYPED."""
    op, _, text = message.partition(" failed inside the agent: ")
    return any(op == o and re.search(pattern, text) for o, pattern in KNOWN_UNTYPED)


def tracebacks(h: Host) -> list[str]:
    """The agent log's tracebacks, each with the line before it (what logged it), but those
    of the known untyped control failures."""
    lines = (h.tmp / f"agent-{h.starts}.log").read_text(errors="replace").splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")),
                       len(lines) - 1)
            op = lines[i - 1].partition("control operation ")[2].removesuffix(" failed")
            if not known(f"{op} failed inside the agent: {lines[end].partition(': ')[2]}"):
                found.append(f"{lines[i - 1]} ... {lines[end]}")
    return found


def assert_serving(h: Host, vip: str, surface: str) -> None:
    assert h.agent is not None and h.agent.poll() is None, f"after {surface}: the agent " \
        f"exited\n{h.log_tail()}"
    assert h.call("ping")["ready"], f"after {surface}: not ready"
    got = in_namespace(h, "probe", str(DNS_PORT), str(ADMIN_PORT), f"{SERVICE}.mesh")
    assert got == {"udp": [vip], "tcp": [vip], "metrics": "200"}, f"after {surface}: {got}"
    assert not tracebacks(h), f"after {surface}: {tracebacks(h)}"


def test_a_fuzzed_agent_keeps_serving(make_host: Callable[..., Host]) -> None:
    # names outside .mesh go to an upstream on the namespace's loopback where nothing
    # listens: forwarding fails fast and no query leaves the namespace
    h = make_host("ebpf", workers=1,
                  agent_args=("--dns-upstream", f"127.0.0.1:{free_port()}"))
    h.start()
    vip = h.call("service.add", name=SERVICE, patch={"port": 80})["vip"]
    assert_serving(h, vip, "start")
    t0 = time.monotonic()
    result = fuzz_control(h.client.path, SEED, COUNTS["control-socket"])
    report("control-socket", result)
    for message in sorted(set(result["untyped"])):
        print(f"  untyped, known: {message}" if known(message) else f"  UNTYPED: {message}")
    assert all(map(known, result["untyped"])), result["untyped"]
    assert_serving(h, vip, "control-socket")
    for surface, port in (("dns-udp", DNS_PORT), ("dns-tcp", DNS_PORT),
                          ("admin-http", ADMIN_PORT)):
        before = h.status()["dns"]["counters"]
        result = in_namespace(h, surface, str(port), str(SEED), str(COUNTS[surface]))
        outcomes = Counter(result["outcomes"])
        if surface == "dns-udp":
            # every datagram the agent read and did not drop on purpose got its answer
            counted = {k: v - before[k] for k, v in h.status()["dns"]["counters"].items()}
            result["note"] = (f"the agent counted {counted['queries']} queries, dropped "
                              f"{counted['dropped']} (no header, a response, overload)")
            assert outcomes["answered"] == counted["queries"] - counted["dropped"], counted
        report(surface, result)
        assert not outcomes["hang"] and not outcomes["bad answer"], result
        # an untyped exception in the admin app
        assert not {"500", "500 (HTTP/0.9 error page)"} & set(outcomes), result
        assert_serving(h, vip, surface)
    print(f"\nfuzz: all surfaces in {time.monotonic() - t0:.1f} s")
