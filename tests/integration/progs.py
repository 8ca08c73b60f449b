"""Small programs the integration tests run as real processes (no meshnode code in them):
servers that say who they are, a hash-checking bulk server, and a probe that connects where it
is told. Each is a `python3 -c` script, so it runs unchanged inside a test namespace."""

from __future__ import annotations

# argv: NAME PORT [HOST]. Answers every connection with its name, then closes.
NAME_SERVER = r"""
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(512)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(name.encode() + b"\n")
    except OSError:
        pass
    c.close()
"""

# argv: PORT. Reads until EOF (the client's half-close), then answers with the sha256 of what
# it got, followed by N bytes of a deterministic stream (N = first 8 bytes of the request).
BULK_SERVER = r"""
import hashlib, socket, sys, threading
def pattern(n):
    block = hashlib.sha256(b"meshnode").digest() * 2048
    while n > 0:
        chunk = block[:n]; n -= len(chunk); yield chunk
def serve(c):
    h = hashlib.sha256(); head = b""
    while True:
        d = c.recv(1 << 18)
        if not d: break
        if len(head) < 8: head += d[:8 - len(head)]
        h.update(d)
    c.sendall(h.hexdigest().encode() + b"\n")
    for chunk in pattern(int.from_bytes(head, "big")):
        c.sendall(chunk)
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
print("listening", flush=True)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Reads one JSON command per stdin line, answers one JSON line:
#   {"op": "connect", "host": H, "port": P, "v6": false} -> {"ok": true, "reply": "<first line>"}
#   {"op": "bulk", "host": H, "port": P, "up": N, "down": M} -> hashes both ways
#   {"op": "resolve", "name": N} -> {"ok": true, "addrs": [...]} (getaddrinfo, via glibc)
#   {"op": "dns", "host": H, "port": P, "query": HEX} -> {"ok": true, "reply": HEX, "from": [..]}
#   errors -> {"ok": false, "errno": E, "error": "...", "seconds": T}
PROBE = r"""
import hashlib, json, socket, sys, time
def pattern(n):
    block = hashlib.sha256(b"meshnode").digest() * 2048
    while n > 0:
        chunk = block[:n]; n -= len(chunk); yield chunk
def connect(cmd):
    fam = socket.AF_INET6 if cmd.get("v6") else socket.AF_INET
    host = "::ffff:" + cmd["host"] if cmd.get("v6") else cmd["host"]
    s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(cmd.get("timeout", 5))
    s.connect((host, cmd["port"]))
    return s
def run(cmd):
    if cmd["op"] == "resolve":  # through glibc, whatever nameserver resolv.conf names
        return {"ok": True, "addrs": sorted({a[4][0] for a in socket.getaddrinfo(
            cmd["name"], 80, socket.AF_INET, socket.SOCK_STREAM)})}
    if cmd["op"] == "dns":  # one raw query (hex) to a resolver, as an app's own stub would
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(cmd.get("timeout", 3))
        u.sendto(bytes.fromhex(cmd["query"]), (cmd["host"], cmd["port"]))
        data, src = u.recvfrom(4096)
        return {"ok": True, "reply": data.hex(), "from": list(src)}
    if cmd["op"] == "ping":  # one line over a held stream, its echo back
        s = held[cmd["id"]]
        s.sendall(cmd["data"].encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            d = s.recv(4096)
            if not d: raise ConnectionResetError(104, "stream closed by the peer")
            data += d
        return {"ok": data.decode().strip() == cmd["data"], "reply": data.decode().strip()}
    s = connect(cmd)
    if cmd["op"] == "open":  # a long-lived stream, kept under an id for ping
        held.append(s)
        return {"ok": True, "id": len(held) - 1}
    if cmd["op"] == "connect":
        data = b""
        while not data.endswith(b"\n"):
            d = s.recv(4096)
            if not d: break
            data += d
        s.close()
        return {"ok": True, "reply": data.decode().strip()}
    up, down = cmd["up"], cmd["down"]
    sent = hashlib.sha256()
    first = True
    for chunk in pattern(up):
        if first:  # the first 8 bytes tell the server how much to send back
            chunk = down.to_bytes(8, "big") + chunk[8:]; first = False
        sent.update(chunk); s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)  # half-close: the reply must still arrive
    buf = b""
    while b"\n" not in buf:
        d = s.recv(1 << 16)
        if not d: break
        buf += d
    line, _, rest = buf.partition(b"\n")
    got = hashlib.sha256(rest); n = len(rest)
    while True:
        d = s.recv(1 << 18)
        if not d: break
        got.update(d); n += len(d)
    s.close()
    want = hashlib.sha256()
    for chunk in pattern(down): want.update(chunk)
    return {"ok": True, "server_hash_ok": line.decode() == sent.hexdigest(),
            "down_bytes": n, "down_hash_ok": got.hexdigest() == want.hexdigest()}
held = []
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    t0 = time.monotonic()
    try:
        out = run(cmd)
    except OSError as e:
        out = {"ok": False, "errno": e.errno, "error": str(e)}
    except socket.gaierror as e:
        out = {"ok": False, "errno": e.errno, "error": str(e)}
    out["seconds"] = round(time.monotonic() - t0, 4)
    print(json.dumps(out), flush=True)
"""

# An echo server: each connection gets back every byte it sends (long-lived streams).
ECHO_SERVER = r"""
import socket, sys, threading
def serve(c):
    with c:
        while d := c.recv(65536):
            c.sendall(d)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1]))); s.listen(128)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
