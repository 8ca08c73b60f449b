"""`meshnode authz suggest`: least-privilege AuthorizationPolicy documents from the traffic the
agent observed, for review and `meshnode apply -f` (the agent builds them; this renders).

Examples:
  meshnode authz suggest --window 10m -o policies.yaml
  meshnode authz suggest --service web --dry-run | meshnode apply -f -
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from meshnode.cli.options import Instance, client, complete_service

from meshnode.errors import NotFoundError, UsageError

authz_app = typer.Typer(help="Authorization: who may call which service.",
                        no_args_is_help=True)

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def register(app: typer.Typer) -> None:
    app.add_typer(authz_app, name="authz")


def parse_duration(text: str) -> float:
    """"600", "90s", "10m", "1h" as seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if m is None or float(m.group(1)) <= 0:
        raise UsageError(f"invalid duration {text!r}", "write e.g. 90s, 10m or 600 (seconds)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _ago(seconds: float) -> str:
    return f"{seconds / 60:g}m" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g}s"


def render(r: dict[str, Any], window_text: str) -> str:
    """The suggestion as YAML documents, led by comments saying where they come from."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    head = [
        f"# meshnode authz suggest: the callers this host's proxy (node {r['node']}) saw in "
        f"the last {window_text} ({when}).",
        "# Only traffic this host's proxy carried is counted: callers on other hosts are not",
        "# listed and would be denied. Apply with dryRun: true first (--dry-run), watch for",
        "# \"would deny\", then drop it. Review, then: meshnode apply -f FILE",
        *(f"# note: {n}" for n in r["notes"]),
    ]
    body = yaml.safe_dump_all(r["policies"], sort_keys=False, explicit_start=True)
    return "\n".join(head) + "\n" + body


@authz_app.command("suggest")
def suggest(
    window: Annotated[str, typer.Option(
        help="how far back to look: 90s, 10m (the agent keeps 10 minutes by default)")] = "10m",
    service: Annotated[str | None, typer.Option(
        help="only this destination service", autocompletion=complete_service)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="write the documents to FILE (default: stdout)")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="write the policies with dryRun: true (counted, not enforced)")] =
        False,
    instance: Instance = "default",
) -> None:
    """Least-privilege AuthorizationPolicy documents from observed traffic: one ALLOW policy
    per destination service, listing the callers seen over the window."""
    seconds = parse_duration(window)
    r = client(instance).call("authz.suggest", window=seconds, service=service,
                              dry_run=dry_run)
    where = f" to service {service}" if service else ""
    if not r["edges"]:
        raise NotFoundError(
            f"no traffic{where} observed by this host's proxy (node {r['node']}) in the last "
            f"{_ago(seconds)}: nothing to suggest",
            "run it once the callers have been busy for a while, or use a longer --window")
    if not r["policies"]:
        raise NotFoundError(f"traffic{where} observed, but no caller could be named: "
                            + "; ".join(r["notes"]),
                            "enroll the callers (meshnode enroll PID --service NAME)")
    text = render(r, _ago(seconds))
    for note in r["notes"]:
        typer.echo(f"note: {note}", err=True)
    names = ", ".join(d["name"] for d in r["policies"])
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}",
                         "check the path given to -o") from None
    typer.echo(f"wrote {len(r['policies'])} AuthorizationPolicy document"
               f"{'s' if len(r['policies']) != 1 else ''} ({names}) from "
               f"{len(r['edges'])} observed edge{'s' if len(r['edges']) != 1 else ''} to "
               f"{output}; review, then: meshnode apply -f {output}", err=True)
