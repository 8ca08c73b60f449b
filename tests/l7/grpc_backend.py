"""A gRPC server and client for the L7 tests (grpcio, generic handlers, raw bytes: no codegen).

  python -m tests.l7.grpc_backend serve NAME PORT [--unavailable]
      Service test.Echo; prints "listening" once it accepts calls. Methods (messages are bytes):
        Unary          answers b"NAME:" + the request
        ServerStream   request b"N": N answers b"NAME:i"
        ClientStream   answers b"NAME:" + the requests joined by b","
        Bidi           answers each request with b"NAME:" + it, as it comes
        Flaky          UNAVAILABLE on a server started with --unavailable, else like Unary
        Fail           request b"CODE": fails with that status code (b"5": NOT_FOUND)
        Slow           request b"MS": answers after MS milliseconds
        Count          answers a JSON object: calls served per method
  python -m tests.l7.grpc_backend call TARGET SCENARIO [N]
      Calls TARGET (host:port) and prints one JSON line per call:
      {"method", "code" (status name), "replies" [str], "details"}. Scenarios: unary (N unary
      calls), streams (one call of each streaming kind), statuses (Fail with NOT_FOUND and
      INVALID_ARGUMENT), flaky (N Flaky calls), slow (one Slow call of N ms, 10 s deadline),
      count (one Count call).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "test.Echo"


def serve(name: str, port: int, unavailable: bool) -> None:
    served: Counter[str] = Counter()
    lock = threading.Lock()
    tag = name.encode() + b":"

    def count(method: str) -> None:
        with lock:
            served[method] += 1

    def unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        count("Unary")
        return tag + req

    def server_stream(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        count("ServerStream")
        for i in range(int(req or b"3")):
            yield tag + str(i).encode()

    def client_stream(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
        count("ClientStream")
        return tag + b",".join(reqs)

    def bidi(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
        count("Bidi")
        for req in reqs:
            yield tag + req

    def flaky(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        count("Flaky")
        if unavailable:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{name} is unavailable")
        return tag + req

    def fail(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        count("Fail")
        code = next(c for c in grpc.StatusCode if c.value[0] == int(req))
        ctx.abort(code, f"{name} fails with {code.name}")
        raise AssertionError("abort returned")

    def slow(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        count("Slow")
        time.sleep(int(req) / 1000)
        return tag + req

    def counts(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        with lock:
            return json.dumps(dict(served)).encode()

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Count": grpc.unary_unary_rpc_method_handler(counts),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def _result(method: str, fn: Any) -> dict[str, Any]:
    try:
        out = fn()
    except grpc.RpcError as exc:
        return {"method": method, "code": exc.code().name, "replies": [],
                "details": exc.details()}
    replies = [out] if isinstance(out, bytes) else list(out)
    return {"method": method, "code": "OK", "replies": [r.decode() for r in replies],
            "details": ""}


def call(target: str, scenario: str, n: int) -> None:
    # gRPC's own retries off: any retry seen is the mesh's
    channel = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
    grpc.channel_ready_future(channel).result(timeout=10)

    def method(kind: str, name: str) -> Any:
        return getattr(channel, kind)(f"/{SERVICE}/{name}")

    results: list[dict[str, Any]] = []
    if scenario == "unary":
        unary = method("unary_unary", "Unary")
        results += [_result("Unary", lambda i=i: unary(b"u%d" % i, timeout=10))
                    for i in range(n)]
    elif scenario == "streams":
        results.append(_result("ServerStream", lambda: method(
            "unary_stream", "ServerStream")(b"5", timeout=10)))
        results.append(_result("ClientStream", lambda: method(
            "stream_unary", "ClientStream")(iter([b"a", b"b", b"c"]), timeout=10)))

        def bidi() -> list[bytes]:
            # one request at a time, each answered before the next goes: streaming both ways
            out: list[bytes] = []
            sent = threading.Semaphore(0)

            def requests() -> Iterator[bytes]:
                for i in range(4):
                    yield b"m%d" % i
                    sent.acquire()

            for reply in method("stream_stream", "Bidi")(requests(), timeout=10):
                out.append(reply)
                sent.release()
            return out

        results.append(_result("Bidi", bidi))
    elif scenario == "statuses":
        fail = method("unary_unary", "Fail")
        results += [_result("Fail", lambda c=c: fail(b"%d" % c, timeout=10)) for c in (5, 3)]
    elif scenario == "flaky":
        flaky = method("unary_unary", "Flaky")
        results += [_result("Flaky", lambda i=i: flaky(b"f%d" % i, timeout=10))
                    for i in range(n)]
    elif scenario == "slow":
        slow = method("unary_unary", "Slow")
        results.append(_result("Slow", lambda: slow(b"%d" % n, timeout=10)))
    elif scenario == "count":
        results.append(_result("Count", lambda: method("unary_unary", "Count")(b"", timeout=10)))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    for r in results:
        print(json.dumps(r), flush=True)
    channel.close()


def main() -> None:
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), "--unavailable" in sys.argv[4:])
    else:
        call(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 10)


if __name__ == "__main__":
    main()
