"""The declarative API as an operator uses it: `meshnode apply / get / diff / history /
rollback / delete` against a running agent, checked by where connections land afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.harness import Host, free_port

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

WEB = """\
kind: Service
name: web
spec:
  port: {port}
  balancer: {{algorithm: round-robin}}
  health: {{kind: none}}
"""


def write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def lands(h: Host, vip: str, port: int, n: int = 4) -> set[str]:
    """Which instances answer n connections from an enrolled client to vip:port."""
    client = h.probe(service="client")
    try:
        replies = [client.connect(vip, port) for _ in range(n)]
    finally:
        client.proc.kill()
    assert all(r["ok"] for r in replies), replies
    return {r["reply"] for r in replies}


@pytest.mark.parametrize("backend", ["ebpf"])
def test_apply_get_diff_history_rollback_delete(make_host, backend: str,
                                                tmp_path: Path) -> None:
    h = make_host(backend, workers=1)
    h.start()
    ports = [free_port(), free_port()]
    v1 = write(tmp_path, "web.yaml", WEB.format(port=80))
    out = h.cli("apply", "-f", v1)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Service/web created (version ")
    for i, p in enumerate(ports):
        h.server(f"instance-{i}", p, service="web")
    h.wait_endpoints("web", {f"127.0.0.1:{p}" for p in ports})
    vip = h.service("web")["vip"]
    assert lands(h, vip, 80) == {"instance-0", "instance-1"}
    # the agent says which revision its workers and kernel run: this apply's, or later
    version = h.service("web")["version"]
    reg = h.status()["registry"]
    assert reg["applied_revision"] >= version and reg["revision"] >= version
    status, metrics = h.http_get("/metrics")
    assert status == 200
    applied = [line for line in metrics.splitlines()
               if line.startswith('meshnode_registry_revision{state="applied"}')]
    assert applied and float(applied[0].split()[-1]) >= version

    # idempotent: the same document again changes nothing
    assert h.cli("apply", "-f", v1).stdout.strip() == "Service/web unchanged"
    # get -o yaml is a document that applies back unchanged
    got = h.cli("get", "Service", "web", "-o", "yaml")
    doc = yaml.safe_load(got.stdout)
    assert doc["kind"] == "Service" and doc["spec"]["port"] == 80 and doc["version"] > 0
    again = write(tmp_path, "got.yaml", got.stdout)
    assert h.cli("apply", "-f", again).stdout.strip() == "Service/web unchanged"

    # diff shows what would change, exit 1; nothing is applied by it
    v2 = write(tmp_path, "web2.yaml", WEB.format(port=8080))
    d = h.cli("diff", "-f", v2)
    assert d.returncode == 1 and "-  port: 80" in d.stdout and "+  port: 8080" in d.stdout
    assert h.cli("diff", "-f", v1).returncode == 0
    assert lands(h, vip, 80) == {"instance-0", "instance-1"}

    # applied: the very next connection sees the new port
    out = h.cli("apply", "-f", v2)
    assert "Service/web configured" in out.stdout, out.stderr
    assert lands(h, vip, 8080) == {"instance-0", "instance-1"}

    # a stale version is refused, naming the fix; nothing changes
    stale = dict(doc, spec={**doc["spec"], "port": 9090})
    bad = h.cli("apply", "-f", write(tmp_path, "stale.yaml", yaml.safe_dump(stale)))
    assert bad.returncode == 65, bad.stderr  # EX_DATAERR
    assert f"Service web changed since version {doc['version']}" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) <= 2  # the line and its hint

    hist = h.cli("history", "Service", "web")
    assert hist.returncode == 0 and "port=80" in hist.stdout and "port=8080" in hist.stdout
    rb = h.cli("rollback", "Service", "web")
    assert "rolled back to version" in rb.stdout, rb.stderr
    assert h.service("web")["port"] == 80
    assert lands(h, vip, 80) == {"instance-0", "instance-1"}

    out = h.cli("delete", "Service", "web")
    assert out.stdout.strip() == "Service/web deleted", out.stderr
    assert h.cli("get", "Service", "web").returncode == 66  # EX_NOINPUT
    assert "web" not in {s["name"] for s in h.status()["services"]}


@pytest.mark.parametrize("backend", ["iptables"])
def test_a_bad_document_changes_nothing(make_host, backend: str, tmp_path: Path) -> None:
    h = make_host(backend)
    h.start()
    assert h.cli("apply", "-f", write(tmp_path, "a.yaml", WEB.format(port=80))).returncode == 0
    before = h.cli("get", "Service", "web", "-o", "json").stdout
    # the second document is bad: the first, valid one is not applied either
    text = ("kind: Service\nname: api\nspec: {port: 81}\n---\n"
            "kind: Service\nname: web\nspec: {port: 82, health: {timeout: 10}}\n")
    bad = h.cli("apply", "-f", write(tmp_path, "b.yaml", text))
    assert bad.returncode == 64, bad.stderr  # EX_USAGE
    first = bad.stderr.strip().splitlines()[0]
    assert "b.yaml#2 (Service web): spec.health: use 0 < timeout <= interval" in first
    assert "meshnode schema Service" in bad.stderr
    assert h.cli("get", "Service", "web", "-o", "json").stdout == before
    assert h.cli("get", "Service", "api").returncode == 66
    unknown = h.cli("apply", "-f", write(tmp_path, "c.yaml", "kind: Ingress\nname: x\n"))
    assert unknown.returncode == 64 and "unknown kind 'Ingress'" in unknown.stderr
