"""`meshnode ca ...`: the mesh CA, run by the agent of the host that holds it.

Examples:
  sudo meshnode ca init --trust-domain mesh.example.org
  sudo meshnode ca init --trust-domain mesh.example.org --root-cert root.pem --root-key root.key
  sudo meshnode ca status
  sudo meshnode ca token create --ttl 10m --node web-3
  sudo meshnode ca revoke-host web-3
  sudo meshnode ca root add            # then, once every agent holds the new bundle:
  sudo meshnode ca root activate FP    # then, once every leaf was renewed:
  sudo meshnode ca root remove OLDFP

Root rotation overlaps the trust anchors: `root add` publishes the new root beside the old
one (agents trust both), `root activate` issues from the new one (agents renew leaves that
do not chain to it at once), `root remove` drops the old one (refused while unexpired leaves
still chain to it, unless --force).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from meshnode.cli.options import Instance, OutputOpt, client
from meshnode.cli.output import Output, emit_json, table

from meshnode.errors import UsageError

app = typer.Typer(help="The mesh CA: trust domain, roots, join tokens, revoked hosts.",
                  no_args_is_help=True)
token_app = typer.Typer(help="Join tokens for new hosts.", no_args_is_help=True)
root_app = typer.Typer(help="Trust anchors: rotation by overlap (add, activate, remove).",
                       no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(root_app, name="root")

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_duration(text: str, what: str = "TTL") -> float:
    """Seconds of "90s", "10m", "24h", "7d" or a plain number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m is None or float(m.group(1)) <= 0:
        raise UsageError(f"invalid {what} {text!r}",
                         "use a positive number with s, m, h or d, e.g. 10m or 24h")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _read(path: Path | None, what: str) -> str:
    if path is None:
        return ""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"cannot read {what} {path}: {reason}", f"check the path given to "
                         f"--{what.replace(' ', '-')}") from None


def _when(t: float, now: float) -> str:
    left = t - now
    day = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))
    if left < 0:
        return f"{day} (EXPIRED)"
    if left >= 2 * 86_400:
        return f"{day} ({left / 86_400:.0f}d)"
    if left >= 7200:
        return f"{day} ({left / 3600:.0f}h)"
    return f"{day} ({left / 60:.0f}m)"


def status_text(s: dict[str, Any]) -> str:
    now = float(s["now"])
    ttl = float(s["leaf_ttl"])
    published = s.get("published_serial")
    out = [f"trust domain  {s['trust_domain']}",
           f"CA            host {s.get('node', '?')}, {s['directory']}",
           f"bundle        serial {s['bundle_serial']}"
           + ("" if published == s["bundle_serial"] else
              f" (registry holds {published if published is not None else 'none'})"),
           f"leaf TTL      {ttl / 3600:g}h", ""]
    rows = []
    for r in s["roots"]:
        issuer = r.get("issuer")
        rows.append([r["fingerprint"], "yes" if r["active"] else "", _when(r["not_after"], now),
                     "-" if issuer is None else
                     ("intermediate " if issuer["intermediate"] else "self ")
                     + _when(issuer["not_after"], now), str(r["leaves"])])
    out.append(table(rows, ["ROOT", "ACTIVE", "EXPIRES", "ISSUER EXPIRES", "LEAVES"]))
    out.append("")
    revoked = set(s["revoked"])
    rows = []
    for node, certs in sorted(s["hosts"].items()):
        for c in certs:
            rows.append([node + (" (REVOKED)" if node in revoked else ""), c["identity"],
                         c["kind"], _when(c["not_after"], now), c["root"]])
    out.append(table(rows, ["HOST", "IDENTITY", "KIND", "EXPIRES", "ROOT"]) if rows
               else "no certificates issued yet")
    out.append("")
    out.append("revoked hosts: " + (", ".join(s["revoked"]) or "none"))
    tokens = s["tokens"]
    out.append(f"join tokens outstanding: {len(tokens)}" + "".join(
        f"\n  {t['id']}  node {t['node']}, expires {_when(t['expires'], now)}" for t in tokens))
    return "\n".join(out)


@app.command("init")
def init(
    trust_domain: Annotated[str, typer.Option(
        help="the SPIFFE trust domain: identities are spiffe://DOMAIN/svc/NAME")] =
        "mesh.internal",
    root_cert: Annotated[Path | None, typer.Option(
        help="an operator's root certificate (PEM): the CA becomes an intermediate under it")]
        = None,
    root_key: Annotated[Path | None, typer.Option(
        help="the key of --root-cert (PEM); used once to sign the intermediate, not kept")] =
        None,
    leaf_ttl: Annotated[str, typer.Option(help="lifetime of node and workload certificates")] =
        "24h",
    instance: Instance = "default", output: OutputOpt = Output.table,
) -> None:
    """Create the mesh CA on this host (its agent signs from then on)."""
    if bool(root_cert) != bool(root_key):
        raise UsageError("--root-cert and --root-key go together",
                         "give both (an intermediate is made under that root), or neither")
    args = {"trust_domain": trust_domain, "leaf_ttl": parse_duration(leaf_ttl, "leaf TTL"),
            "root_cert": _read(root_cert, "root cert"), "root_key": _read(root_key, "root key")}
    s = client(instance).call("ca.init", **args)
    if output is Output.json:
        emit_json(s)
        return
    root = next(r for r in s["roots"] if r["active"])
    kind = "an intermediate under your root" if root["issuer"]["intermediate"] else \
        "a self-signed root"
    typer.echo(f"mesh CA created for trust domain {s['trust_domain']}: {kind}, root "
               f"{root['fingerprint']}\nnext: meshnode ca token create --ttl 10m (for each "
               "host that joins)")


@app.command("status")
def status(instance: Instance = "default", output: OutputOpt = Output.table) -> None:
    """Roots, issuers, certificates per host with their expiry; revoked hosts, join tokens.

    The trust domain, each root (the active one first) with its issuer and the unexpired
    leaves that chain to it, the newest certificate of each host and identity, the revoked
    hosts and the join tokens that can still be used."""
    s = client(instance).call("ca.status")
    if output is Output.json:
        emit_json(s)
    else:
        typer.echo(status_text(s))


@token_app.command("create")
def token_create(
    ttl: Annotated[str, typer.Option(help="how long it can be used: 90s, 10m, 1h (at most 7d)")]
        = "10m",
    node: Annotated[str | None, typer.Option(
        help="only the host with this --node name (a glob) may use it")] = None,
    instance: Instance = "default", output: OutputOpt = Output.table,
) -> None:
    """Print a single-use join token: start the new host's agent with --join-token TOKEN."""
    r = client(instance).call("ca.token.create", ttl=parse_duration(ttl), node=node or "")
    if output is Output.json:
        emit_json(r)
    else:
        typer.echo(r["token"])


@app.command("node-cert")
def node_cert(
    name: Annotated[str, typer.Argument(help="the new host's --node name")],
    out: Annotated[Path, typer.Option(help="folder to write NAME.pem and NAME.key into")] =
        Path("."),
    ttl: Annotated[str, typer.Option(help="lifetime (at most 30d); the agent renews it")] =
        "24h",
    instance: Instance = "default",
) -> None:
    """Pre-provision a host (instead of a join token): write its node certificate and key.

    The key is made here and never sent anywhere; copy both files to the host and start its
    agent with --node NAME --node-cert NAME.pem --node-key NAME.key."""
    from meshnode.host.statefile import write_atomic
    from meshnode.security import certs

    r0 = client(instance).call("ca.status")  # the trust domain, and a clear error without CA
    key = certs.make_key()
    csr = certs.make_csr(key, f"spiffe://{r0['trust_domain']}/node/{name}", name)
    r = client(instance).call("ca.node.issue", node=name, csr=csr, ttl=parse_duration(ttl))
    write_atomic(out / f"{name}.key", certs.key_pem(key).encode(), mode=0o600)
    write_atomic(out / f"{name}.pem", "".join(r["chain"]).encode(), mode=0o600)
    typer.echo(f"{r['identity']}: {out / (name + '.pem')} and {out / (name + '.key')}, valid "
               f"until {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['not_after']))} UTC")


@app.command("revoke-host")
def revoke_host(name: Annotated[str, typer.Argument(help="the host's --node name")],
                instance: Instance = "default") -> None:
    """Revoke a host: every agent refuses its certificates once it holds the new bundle."""
    r = client(instance).call("ca.revoke_host", node=name)
    state = "revoked" if r["changed"] else "already revoked"
    typer.echo(f"host {r['node']} {state} (trust bundle serial {r['serial']})")


@root_app.command("add")
def root_add(
    root_cert: Annotated[Path | None, typer.Option(
        help="an operator's new root (PEM): an intermediate is made under it")] = None,
    root_key: Annotated[Path | None, typer.Option(help="the key of --root-cert (not kept)")] =
        None,
    instance: Instance = "default",
) -> None:
    """Trust a new root beside the current one (published at once, not issuing yet)."""
    if bool(root_cert) != bool(root_key):
        raise UsageError("--root-cert and --root-key go together",
                         "give both, or neither (a new self-signed root)")
    r = client(instance).call("ca.root.add", root_cert=_read(root_cert, "root cert"),
                              root_key=_read(root_key, "root key"))
    typer.echo(f"root {r['fingerprint']} added (trusted, not issuing; bundle serial "
               f"{r['serial']})\nnext, once every agent holds it: meshnode ca root activate "
               f"{r['fingerprint']}")


@root_app.command("activate")
def root_activate(fingerprint: Annotated[str, typer.Argument(
                      help="the root's fingerprint (8 or more hex digits, see ca status)")],
                  instance: Instance = "default") -> None:
    """Issue from this root from now on (agents renew their leaves from it)."""
    r = client(instance).call("ca.root.activate", fingerprint=fingerprint)
    typer.echo(f"root {r['fingerprint']} is active (bundle serial {r['serial']})")


@root_app.command("remove")
def root_remove(fingerprint: Annotated[str, typer.Argument(help="the root's fingerprint")],
                force: Annotated[bool, typer.Option(
                    help="even while unexpired leaves chain to it")] = False,
                instance: Instance = "default") -> None:
    """Stop trusting a root: leaves that chain to it stop verifying mesh-wide."""
    r = client(instance).call("ca.root.remove", fingerprint=fingerprint, force=force)
    typer.echo(f"root {r['fingerprint']} removed (bundle serial {r['serial']})")


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="ca")
