"""Authorization through the real CLI and a real agent (embedded registry): traffic, then
`meshnode authz suggest` writes the policy that traffic needs, `meshnode apply -f` takes it,
and `meshnode explain` names the policy that decides for an allowed and a refused caller.
(Enforcement in the proxy is tested with the workers; this checks what operators read.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import Host, free_port

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


def explain(h: Host, pid: int, dest: str) -> dict[str, Any]:
    r = h.cli("explain", str(pid), dest, "-o", "json")
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def apply(h: Host, path: Path, text: str) -> str:
    path.write_text(text)
    r = h.cli("apply", "-f", str(path))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_suggest_apply_explain(make_host, tmp_path: Path) -> None:
    h = make_host("ebpf", workers=1)
    h.start()
    port = free_port()
    h.server("web-0", port, service="web")
    h.call("service.add", name="web", patch={"port": 80})
    h.wait_endpoints("web", {f"127.0.0.1:{port}"})
    h.call("service.add", name="idle", patch={"port": 81})
    vip = h.service("web")["vip"]
    client = h.probe(service="client")

    # nothing applied: the mesh default allows, and explain says who the caller is
    e = explain(h, client.pid, "web.mesh:80")
    assert e["process"]["identity"] == "spiffe://local/svc/client"
    assert e["authorization"]["verdict"] == "allowed", e["authorization"]
    assert ("authorization (decided where the destination is): allowed by the mesh default "
            f"ALLOW: no AuthorizationPolicy decides spiffe://local/svc/client to web:{port}"
            ) in e["steps"]

    # a window without traffic says so, in one line
    r = h.cli("authz", "suggest", "--window", "1m", "--service", "web")
    assert r.returncode == 66, (r.returncode, r.stderr)
    assert "no traffic to service web observed by this host's proxy" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    for _ in range(3):
        assert client.connect(vip, 80)["reply"] == "web-0"
    out = tmp_path / "suggested.yaml"
    r = h.cli("authz", "suggest", "--window", "10m", "-o", str(out))
    assert r.returncode == 0, r.stderr
    print(f"\n$ meshnode authz suggest --window 10m -o {out}\n{r.stderr}{out.read_text()}")
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert docs == [{"kind": "AuthorizationPolicy", "name": "web-allow",
                     "spec": {"target": "web", "rules": [{"from": {"services": ["client"]}}]}}]
    assert "wrote 1 AuthorizationPolicy document (web-allow)" in r.stderr
    idle = h.cli("authz", "suggest", "--service", "idle")
    assert idle.returncode == 66 and "nothing to suggest" in idle.stderr, idle.stderr
    r = h.cli("apply", "-f", str(out))
    assert r.returncode == 0 and "AuthorizationPolicy/web-allow created" in r.stdout, r.stderr

    # the caller the traffic came from is allowed by it; another one is not
    ok = explain(h, client.pid, f"{vip}:80")
    assert ok["authorization"]["decisions"][0]["policy"] == "web-allow"
    assert ok["outcome"] == "proxied" and ok["authorization"]["verdict"] == "allowed"
    batch = h.probe(service="batch")
    no = explain(h, batch.pid, f"{vip}:80")
    assert no["outcome"] == "denied", no
    assert no["verdict"] == ("captured by ebpf → service web, then denied by "
                             "AuthorizationPolicy web-allow (no rule allows "
                             f"spiffe://local/svc/batch to web:{port}): the connection is reset")
    r = h.cli("explain", str(batch.pid), f"{vip}:80")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == no["verdict"]
    print(f"\n$ meshnode explain {batch.pid} {vip}:80\n{r.stdout}")

    # deny-by-default in dry run: a service no policy opens would deny, and still serves
    apply(h, tmp_path / "mesh.yaml", "kind: Mesh\nname: mesh\n"
          "spec: {authorization: {default: DENY, dryRun: true}}\n")
    idle_port = free_port()
    h.server("idle-0", idle_port, service="idle")
    h.wait_endpoints("idle", {f"127.0.0.1:{idle_port}"})
    w = explain(h, batch.pid, f"{vip}:80")
    assert w["outcome"] == "denied"  # the enforced allow-list still decides web
    w2 = explain(h, client.pid, f"{h.service('idle')['vip']}:81")
    assert w2["outcome"] == "proxied" and w2["authorization"]["verdict"] == "would deny", w2
    assert w2["verdict"].endswith("; authorization would deny it once the dry run ends "
                                  "(the mesh default DENY)"), w2["verdict"]

    # a policy for a service that does not exist is refused before anything is written
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: AuthorizationPolicy\nname: ghost\nspec: {target: ghost}\n")
    r = h.cli("apply", "-f", str(bad))
    assert r.returncode == 64, (r.returncode, r.stderr)
    assert "AuthorizationPolicy ghost refers to Service ghost, which does not exist" in r.stderr
    # ...and a Service a policy names cannot be deleted from under it
    r = h.cli("delete", "Service", "web")
    assert r.returncode == 64 and "refers to Service web" in r.stderr, r.stderr
    r = h.cli("get", "AuthorizationPolicy")
    assert r.returncode == 0 and "web-allow" in r.stdout, r.stderr
