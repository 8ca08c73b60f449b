"""This host's ingress gateway listeners: the `Gateway` resources whose `nodes` match this
host, opened, checked and handed to the proxy workers.

For each listener of such a Gateway the agent binds the socket (it is root: a port below
1024 needs it) and keeps it among the descriptors the workers hold for it (WorkerPool.held,
named `gateway:ADDRESS:PORT`), so the listener outlives an agent restart as the inbound one
does: a worker started later gets it by pass_fds, a running one takes a copy over the
GATEWAY_FDS_SOCKET (SCM_RIGHTS), a restarted agent takes it back from the workers' Hello.held.
It reads the certificate and key files (they live on this host), checks that each key is its
certificate's, and sends the workers one wire.GatewayConfig with every listener and its PEMs.
A file it cannot read, or a key that does not match, leaves that listener closed (or serving
with the last certificates that were good, when it was open): the reason is in the log (once)
and in `meshnode status` (gateway.problems); the other listeners serve on.

The files are watched (stat every WATCH_INTERVAL seconds): a renewed certificate written
over the old one is served without an apply, a fixed file opens its listener. The problems
are also written to the run directory (gateway.json), where `meshnode doctor` reads them.

A listener no Gateway names any more is closed here and, on the next GatewayConfig, by every
worker: nothing keeps the port. This host also takes each gateway's Service identity (the
workload certificate it calls into the mesh with): `services()` is added to what the identity
client asks the CA for and to the host report's enrolled list the CA checks.

Takes the registry, the node name and the held descriptors (a callable: the pool's dict is
replaced at start), not the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshnode.discovery.registry import Registry
from meshnode.errors import ConfigError, MeshnodeError, TrustError
from meshnode.host.statefile import write_json
from meshnode.listen import listen_tcp
from meshnode.policy.gateway import GatewayCertificate, GatewayListener, GatewaySpec
from meshnode.security import certs, clock
from meshnode.wire import GatewayCert, GatewayConfig, GatewayListenerConfig

__all__ = ["HELD_PREFIX", "GatewayListeners", "held_name", "read_certificate"]

log = logging.getLogger(__name__)

HELD_PREFIX = "gateway:"  # the held descriptors of gateway listeners: gateway:ADDRESS:PORT
MAX_PEM = 1024 * 1024  # a certificate chain or key file larger than this is not one
WATCH_INTERVAL = 5.0  # seconds between looks at the certificate files (renewals, fixes)
STATUS_FILE = "gateway.json"  # in the run directory: the problems, for `meshnode doctor`


def held_name(address: str, port: int) -> str:
    return f"{HELD_PREFIX}{address}:{port}"


@dataclass(frozen=True)
class _FileStamp:
    """What a read of a file depends on: it is read again only when one of these moves."""

    path: str
    ino: int
    size: int
    mtime_ns: int


def _stamp(path: str) -> _FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _FileStamp(path, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}",
                          "check the path and that root can read it") from None
    if len(data) > MAX_PEM:
        raise ConfigError(f"the {what} {path} is larger than {MAX_PEM} bytes: not a PEM file",
                          "point to the PEM file")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"the {what} {path} is not PEM text", "convert it to PEM") from None


def read_certificate(c: GatewayCertificate) -> GatewayCert:
    """The operator's chain and key, read and checked: the chain parses, the key is
    unencrypted and is the leaf's. ConfigError saying which file and why, otherwise."""
    chain_text = _read(c.cert_file, "certificate file")
    key_text = _read(c.key_file, "key file")
    try:
        chain = certs.load_chain([chain_text])
    except (TrustError, ValueError) as exc:
        raise ConfigError(f"the certificate file {c.cert_file} does not parse: {exc}",
                          "give a PEM chain: the leaf, then its issuers") from None
    if not chain:
        raise ConfigError(f"the certificate file {c.cert_file} holds no certificate",
                          "give a PEM chain: the leaf, then its issuers")
    if "ENCRYPTED" in key_text:
        raise ConfigError(f"the key file {c.key_file} is encrypted",
                          "give the key unencrypted (readable by root only)")
    if not certs.key_matches(chain[0], key_text):
        raise ConfigError(f"the key in {c.key_file} does not match the certificate in "
                          f"{c.cert_file} (or does not parse)",
                          "give the key the certificate was issued for")
    pems = "".join(certs.cert_pem(cert) for cert in chain)
    return GatewayCert(tuple(c.hosts), pems, key_text)


@dataclass
class _Open:
    """A listener this agent opened (or adopted), and the config the workers last got."""

    config: GatewayListenerConfig | None = None  # None: never had good certificates


class GatewayListeners:
    def __init__(self, registry: Registry, node: str, held: Callable[[], dict[str, int]],
                 fds_socket: Path, on_change: Callable[[], None] = lambda: None) -> None:
        """`held`: the descriptors the workers hold for the agent; `on_change`: a certificate
        file changed (the agent reconciles)."""
        self.registry = registry
        self.node = node
        self.held = held
        self.fds_socket = fds_socket
        self.on_change = on_change
        self._watched: dict[str, _FileStamp | None] = {}  # path -> as last read
        self._watcher: asyncio.Task[None] | None = None
        self.problems: dict[str, str] = {}  # listener (gateway address:port) -> why closed
        self._open: dict[str, _Open] = {}  # held name -> its state
        self._certs: dict[tuple[Any, ...], GatewayCert] = {}  # (stamps, hosts) -> read
        self._services: set[str] = set()
        # what the workers were last told; None until the first pass (an adopted worker
        # keeps the listeners it serves until then, instead of being told "none")
        self._sent: GatewayConfig | None = None
        self._server: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # -- what this host runs -------------------------------------------------------------------
    def gateways(self) -> list[tuple[str, GatewaySpec]]:
        """The Gateway resources whose nodes match this host, by name."""
        out = []
        for (kind, name), r in sorted(self.registry.resources().items()):
            if kind == "Gateway" and any(fnmatch.fnmatchcase(self.node, g)
                                         for g in r.spec.nodes):
                out.append((name, r.spec))
        return out

    def services(self) -> set[str]:
        """The Services whose identity this host's gateways call into the mesh with."""
        return set(self._services)

    def initial(self) -> list[GatewayConfig]:
        """What a started or adopted worker gets first: what the others were last told
        (nothing before the first pass)."""
        return [self._sent] if self._sent is not None else []

    def reconcile(self) -> GatewayConfig | None:
        """Open, re-read and close listeners to match the Gateway resources; the workers'
        new message, or None when it says what they have."""
        held = self.held()
        gateways = self.gateways()
        self._services = {spec.service for _, spec in gateways}
        want: dict[str, tuple[str, GatewaySpec, GatewayListener]] = {}
        problems: dict[str, str] = {}
        for gname, spec in gateways:
            for li in spec.listeners:
                name = held_name(li.address, li.port)
                if name in want:  # two Gateways on one address:port of this host
                    problems[f"{gname} {li.address}:{li.port}"] = (
                        f"Gateway {want[name][0]} listens on {li.address}:{li.port} already")
                    continue
                want[name] = (gname, spec, li)
        # descriptors no Gateway names any more (an adopted one too): closed, so no queue
        # keeps taking connections for a listener nobody serves
        for name in [n for n in held if n.startswith(HELD_PREFIX) and n not in want]:
            self._close(name)
        listeners: list[GatewayListenerConfig] = []
        for name, (gname, spec, li) in want.items():
            label = f"{gname} {li.address}:{li.port}"
            state = self._open.get(name)
            try:
                config = GatewayListenerConfig(
                    name, gname, spec.service, li.address, li.port, li.protocol,
                    tuple(self._certificate(c) for c in li.certificates))
            except MeshnodeError as exc:
                if state is not None and state.config is not None:
                    problems[label] = f"{exc.message}: serving with the last good certificates"
                    listeners.append(state.config)
                else:
                    problems[label] = f"{exc.message}: listener not opened"
                    if name in held and state is None:
                        self._close(name)  # adopted, never configured by this agent
                continue
            if name not in held:
                try:
                    held[name] = listen_tcp(li.address, li.port, what=f"for Gateway {gname}",
                                            hint="choose another address or port in the "
                                                 "Gateway's listeners").detach()
                except MeshnodeError as exc:
                    problems[label] = f"{exc.message} ({exc.hint}): listener not opened"
                    continue
                log.info("gateway %s: listening on %s:%d (%s)", gname, li.address, li.port,
                         li.protocol)
            self._open[name] = _Open(config)
            listeners.append(config)
        self._say(problems)
        self._watched = {p: _stamp(p) for _, spec in gateways for li in spec.listeners
                         for c in li.certificates for p in (c.cert_file, c.key_file)}
        msg = GatewayConfig(tuple(sorted(listeners, key=lambda li: li.held)))
        if msg == self._sent:
            return None
        self._sent = msg
        return msg

    def _certificate(self, c: GatewayCertificate) -> GatewayCert:
        """Read once per version of the files (a changed file is read again)."""
        key = (_stamp(c.cert_file), _stamp(c.key_file), c.hosts)
        got = self._certs.get(key)
        if got is None or key[0] is None or key[1] is None:
            got = read_certificate(c)
            if len(self._certs) > 1024:
                self._certs.clear()
            self._certs[key] = got
        return got

    def _close(self, name: str) -> None:
        fd = self.held().pop(name, None)
        self._open.pop(name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
            log.info("gateway listener %s closed", name[len(HELD_PREFIX):])

    def _say(self, problems: dict[str, str]) -> None:
        """Each problem logged once, when it appears (not on every pass)."""
        for label, why in problems.items():
            if self.problems.get(label) != why:
                log.error("gateway %s: %s", label, why)
        for label in set(self.problems) - set(problems):
            log.info("gateway %s: fixed", label)
        if problems != self.problems or not self.status_file.exists():
            with contextlib.suppress(OSError):
                write_json(self.status_file, {"problems": problems})
        self.problems = problems

    @property
    def status_file(self) -> Path:
        return self.fds_socket.parent / STATUS_FILE

    async def _watch(self) -> None:
        """A certificate or key file replaced, fixed or gone: reconcile."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if any(_stamp(p) != was for p, was in self._watched.items()):
                self._watched = {}  # told once: the reconcile sets it again
                self.on_change()

    def describe(self) -> dict[str, Any]:
        now = clock.now()
        listeners = []
        for li in self._sent.listeners if self._sent is not None else ():
            listeners.append({
                "gateway": li.gateway, "service": li.service,
                "address": f"{li.address}:{li.port}", "protocol": li.protocol,
                "certificates": [
                    {"hosts": list(c.hosts),
                     "expires_in": round(certs.not_after_pem(c.chain) - now)}
                    for c in li.certificates]})
        return {"listeners": listeners, "services": sorted(self._services),
                "problems": dict(sorted(self.problems.items()))}

    # -- handing descriptors to running workers ------------------------------------------------
    async def start(self) -> None:
        """Serve the descriptors socket (root only, like the worker socket)."""
        path = self.fds_socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(64)
        sock.setblocking(False)
        self._server = sock
        self._task = asyncio.ensure_future(self._serve(sock))
        self._watcher = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        """Stop handing out descriptors (the listeners themselves are the pool's: a restart
        leaves them with the workers, a removal closes them with the rest)."""
        for t in [*([self._task] if self._task else []), *self._handlers,
                  *([self._watcher] if self._watcher else [])]:
            t.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.fds_socket.unlink()

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            task = asyncio.ensure_future(self._hand(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _hand(self, conn: socket.socket) -> None:
        """One request: a held name and a newline; answered with the descriptor, if held."""
        loop = asyncio.get_running_loop()
        with conn:
            data = b""
            try:
                async with asyncio.timeout(2.0):
                    while b"\n" not in data and len(data) < 256:
                        chunk = await loop.sock_recv(conn, 256)
                        if not chunk:
                            return
                        data += chunk
            except (TimeoutError, OSError):
                return
            name = data.split(b"\n", 1)[0].decode("ascii", "replace")
            fd = self.held().get(name) if name.startswith(HELD_PREFIX) else None
            with contextlib.suppress(OSError):  # one byte into an empty socket: never blocks
                socket.send_fds(conn, [b"1" if fd is not None else b"0"],
                                [fd] if fd is not None else [])
