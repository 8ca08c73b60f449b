"""`meshnode apply | get | diff | delete | history | rollback | schema`: the declarative API,
the way operators already work with kubectl and `consul config`.

Documents are read and validated here first (a bad file fails before the agent is asked), then
the agent validates them again and applies them atomically.
"""

from __future__ import annotations

import difflib
import enum
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from meshnode.cli import routes
from meshnode.cli.options import Instance, client
from meshnode.cli.output import emit_json, table

from meshnode.errors import NotFoundError, UsageError
from meshnode.policy.document import load_text, parse_all
from meshnode.policy.resources import KINDS, spec_schema


class Format(enum.StrEnum):
    table = "table"
    yaml = "yaml"
    json = "json"


FileOpt = Annotated[list[str], typer.Option("--filename", "-f",
                                            help="FILE, DIR (*.yaml, *.yml, *.json) or -")]
FormatOpt = Annotated[Format, typer.Option("--output", "-o", help="table, yaml or json")]
KindArg = Annotated[str, typer.Argument(help="resource kind, e.g. Service")]


def read_documents(paths: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every document in the files (a directory: its *.yaml, *.yml and *.json, sorted), with
    where each came from; validated, so a bad one fails before anything is sent."""
    docs: list[tuple[str, Any]] = []
    for p in paths:
        if p == "-":
            docs += load_text(sys.stdin.read(), "<stdin>")
            continue
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.iterdir()
                           if f.suffix in (".yaml", ".yml", ".json") and f.is_file())
            if not files:
                raise UsageError(f"no .yaml, .yml or .json files in {path}",
                                 "point -f at a file or a folder of documents")
        else:
            files = [path]
        for f in files:
            try:
                text = f.read_text()
            except OSError as exc:
                raise UsageError(f"cannot read {f}: {exc.strerror or exc}",
                                 "check the path given to -f") from None
            docs += load_text(text, str(f))
    if not docs:
        raise UsageError("no documents found", "give -f a file with at least one document")
    parse_all(docs)
    return [d for _, d in docs], [w for w, _ in docs]


def _canonical(doc: dict[str, Any]) -> str:
    body = {k: doc[k] for k in ("kind", "name", "spec") if k in doc}
    return yaml.safe_dump(body, sort_keys=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def apply(filename: FileOpt, instance: Instance = "default",
              output: FormatOpt = Format.table) -> None:
        """Create or update resources from documents (atomic: all of them or none)."""
        docs, sources = read_documents(filename)
        r = client(instance).call("apply", docs=docs, sources=sources)
        for warning in r.get("warnings", []):  # accepted, but it will not serve yet
            typer.echo(f"warning: {warning}", err=True)
        if output is not Format.table:
            _emit(r, output)
            return
        for res in r["results"]:
            version = f" (version {res['version']})" if res["action"] != "unchanged" else ""
            typer.echo(f"{res['kind']}/{res['name']} {res['action']}{version}")

    @app.command()
    def get(kind: Annotated[str, typer.Argument(
                help="resource kind, e.g. Service; or routes: the effective routing per "
                     "service")], name: Annotated[str | None, typer.Argument()] = None,
            instance: Instance = "default", output: FormatOpt = Format.table,
            hosts: Annotated[bool, typer.Option(
                "--hosts", help="which version each host's agent runs")] = False) -> None:
        """List resources of a kind, or print one (-o yaml gives a document to edit and
        apply). `get routes [SERVICE]`: the effective routing per service."""
        if kind == routes.WORD:
            routes.show_routes(instance, output.value, name)
            return
        c = client(instance)
        r = c.call("get", kind=kind, name=name)
        if hosts:
            _hosts(c.call("hosts"), r["items"], output)
            return
        if output is not Format.table:
            _emit(r["items"] if name is None else r["items"][0], output)
            return
        rows = [[d["name"], str(d.get("version", "")), _summary(d)] for d in r["items"]]
        typer.echo(table(rows, ["NAME", "VERSION", "SPEC"]) if rows else f"no {kind} resources")

    @app.command()
    def diff(filename: FileOpt, instance: Instance = "default") -> None:
        """What `apply -f` would change, as a unified diff against what is stored. Exit 1 when
        something would change (as `kubectl diff`)."""
        docs, _ = read_documents(filename)
        c = client(instance)
        changed = False
        for d in docs:
            try:
                live = c.call("get", kind=d["kind"], name=d["name"])["items"][0]
                before, label = _canonical(live), f"{d['kind']}/{d['name']} version " \
                                                  f"{live.get('version')}"
            except NotFoundError:
                before, label = "", f"{d['kind']}/{d['name']} (absent)"
            # the agent's defaults make specs comparable: compare what parse would store
            after = _canonical(_normalised(d))
            lines = list(difflib.unified_diff(before.splitlines(), after.splitlines(), label,
                                              f"{d['kind']}/{d['name']} from -f", lineterm=""))
            if lines:
                changed = True
                typer.echo("\n".join(lines))
        if changed:
            raise typer.Exit(1)

    @app.command()
    def delete(kind: KindArg, name: str, instance: Instance = "default",
               version: Annotated[int | None, typer.Option(
                   help="only if this is still the stored version")] = None) -> None:
        """Delete a resource (kept in its history: rollback brings it back)."""
        r = client(instance).call("delete", kind=kind, name=name, version=version)
        for res in r["results"]:
            typer.echo(f"{res['kind']}/{res['name']} deleted")

    @app.command()
    def history(kind: KindArg, name: str, instance: Instance = "default",
                output: FormatOpt = Format.table) -> None:
        """The versions of a resource that are kept (the last 10), oldest first."""
        r = client(instance).call("history", kind=kind, name=name)
        if output is not Format.table:
            _emit(r, output)
            return
        rows = []
        for v in r["versions"]:
            mark = "*" if v["version"] == r["current"] else ""
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["at"]))
            rows.append([f"{v['version']}{mark}", when,
                         "(deleted)" if v["deleted"] else _summary({"spec": v["spec"]})])
        typer.echo(table(rows, ["VERSION", "WRITTEN", "SPEC"]))

    @app.command()
    def rollback(kind: KindArg, name: str, instance: Instance = "default",
                 to: Annotated[int | None, typer.Option(
                     help="the version to go back to (default: the one before)")] = None
                 ) -> None:
        """Apply an earlier version of a resource again (as a new version)."""
        r = client(instance).call("rollback", kind=kind, name=name, to=to)
        for res in r["results"]:
            typer.echo(f"{res['kind']}/{res['name']} rolled back to version {r['from']}: "
                       f"{res['action']} (version {res['version']})")

    @app.command()
    def schema(kind: KindArg) -> None:
        """The fields of a kind's spec, as JSON schema."""
        if kind not in KINDS:
            raise UsageError(f"unknown kind {kind!r}", "use one of: " + ", ".join(KINDS))
        emit_json(spec_schema(kind))


def _normalised(doc: dict[str, Any]) -> dict[str, Any]:
    r = parse_all([("-", doc)])[0]
    return r.to_doc(with_version=False)


def _summary(doc: dict[str, Any]) -> str:
    spec = doc.get("spec") or {}
    parts = [f"{k}={v}" for k, v in sorted(spec.items()) if not isinstance(v, dict | list)]
    parts += [f"{k}={{…}}" for k, v in sorted(spec.items()) if isinstance(v, dict | list)]
    text = " ".join(parts) or "(defaults)"
    return text if len(text) <= 70 else text[:69] + "…"


def _emit(data: Any, output: Format) -> None:
    if output is Format.json:
        emit_json(data)
    else:
        typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


def _hosts(report: dict[str, Any], items: list[dict[str, Any]], output: Format) -> None:
    """Per host: the registry revision its agent last applied, and whether that covers each
    resource's current version (a rollout has converged when every row says yes)."""
    if output is not Format.table:
        _emit(report, output)
        return
    rows = []
    for h in report["hosts"]:
        applied = int(h.get("applied_revision") or 0)
        for d in items:
            ok = applied >= int(d.get("version") or 0)
            rows.append([h["node"], d["name"], str(d.get("version", "")),
                         str(applied), "yes" if ok and h.get("ready") else "no"])
    typer.echo(table(rows, ["HOST", "NAME", "VERSION", "HOST_APPLIED_REVISION", "CURRENT"]))
