"""Endpoint labels end to end on a real agent: two real processes enrolled into one service,
one by `meshnode run --label version=v1`, one by `meshnode enroll PID --label version=v2`,
and a static endpoint by `service add --label`. What `meshnode status` shows, what the
subsets of a service table built from the agent's report pick (`route_backend`), that a
relabel and an agent restart keep the labels right, and that `meshnode apply` warns of a Route
naming a subset no endpoint carries."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from meshnode.model import Endpoint, HostPort, Labels, Reset, ServiceSpec
from meshnode.policy.labels import labels_from
from meshnode.route import NoEndpoint, ServiceTable, ToService
from tests.harness import Host, free_port, wait_for
from tests.integration import progs

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

V1: Labels = (("version", "v1"),)
V2: Labels = (("version", "v2"),)


def labelled(h: Host, service: str) -> dict[str, Labels]:
    """Each endpoint address of `service` -> its labels, as `meshnode status` reports them."""
    return {e["addr"]: labels_from(e["labels"]) for e in h.service(service)["endpoints"]}


def table_of(h: Host, service: str) -> ServiceTable:
    """A service table holding `service` as the agent reports it (its VIP and endpoints)."""
    s = h.service(service)
    t = ServiceTable()
    t.apply(Reset(ServiceSpec.build(service, s["id"], IPv4Address(s["vip"]), s["port"]),
                  tuple(Endpoint(HostPort.parse(e["addr"]), labels=labels_from(e["labels"]))
                        for e in s["endpoints"])))
    return t


def picks(t: ServiceTable, service: str, port: int, subset: Labels) -> set[str]:
    r = t.route_backend(service, port, subset)
    assert isinstance(r, ToService), r
    return {str(e.addr) for e in r.attempts}


def test_enrolled_processes_carry_their_labels(make_host: Any, tmp_path: Path) -> None:
    h = make_host("ebpf", workers=1)
    h.start()
    assert h.cli("service", "add", "reviews").returncode == 0
    p1, p2, p3 = free_port(), free_port(), free_port()
    v1 = h.popen([sys.executable, "-m", "meshnode.cli", "run", "--instance", h.tag,
                  "--service", "reviews", "--label", "version=v1", "--label", "track=stable",
                  "--", sys.executable, "-c", progs.NAME_SERVER, "v1", str(p1), "127.0.0.1"],
                 stdout=subprocess.PIPE, text=True)
    v2 = h.server("v2", p2)  # started outside the mesh, then enrolled
    enrolled = h.cli("enroll", str(v2.pid), "--service", "reviews", "--label", "version=v2")
    assert enrolled.returncode == 0, enrolled.stderr
    assert "labels version=v2" in enrolled.stdout, enrolled.stdout
    assert v1.stdout is not None and v1.stdout.readline().strip() == "listening"
    a1, a2 = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"
    h.wait_endpoints("reviews", {a1, a2})
    wait_for("labels in status", lambda: labelled(h, "reviews") == {
        a1: (("track", "stable"), ("version", "v1")), a2: V2})

    out = h.cli("status")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[1]: line.split() for line in out.stdout.splitlines()
            if line.startswith("reviews ") and "127.0.0.1:" in line}
    assert rows[a1][4] == "track=stable,version=v1" and rows[a2][4] == "version=v2", out.stdout

    t = table_of(h, "reviews")
    assert picks(t, "reviews", p1, V1) == {a1}
    assert picks(t, "reviews", p2, V2) == {a2}
    assert t.route_backend("reviews", p1, V2) == NoEndpoint(
        "reviews", f"no endpoint of reviews on port {p1} carries version=v2")

    # a static endpoint with labels; then the v2 process relabelled to v3
    added = h.cli("service", "add", "reviews", "--endpoint", f"127.0.0.1:{p3}",
                  "--label", "version=v2")
    assert added.returncode == 0 and f"127.0.0.1:{p3} version=v2" in added.stdout, added
    relabel = h.cli("enroll", str(v2.pid), "--service", "reviews", "--label", "version=v3")
    assert relabel.returncode == 0, relabel.stderr
    a3 = f"127.0.0.1:{p3}"
    wait_for("relabelled", lambda: labelled(h, "reviews")[a2] == (("version", "v3"),))
    assert labelled(h, "reviews")[a3] == V2

    # an agent restart re-registers the enrolled ports with their saved labels
    assert h.stop() == 0
    h.start()
    wait_for("labels after a restart", lambda: labelled(h, "reviews") == {
        a1: (("track", "stable"), ("version", "v1")), a2: (("version", "v3"),), a3: V2})

    bad = h.cli("enroll", str(v2.pid), "--service", "reviews", "--label", "version=v 3")
    assert bad.returncode == 64 and "invalid value 'v 3' of label version" in bad.stderr


def test_apply_warns_of_a_route_subset_no_endpoint_carries(make_host: Any,
                                                           tmp_path: Path) -> None:
    h = make_host("ebpf", workers=1)
    h.start()
    port = free_port()
    added = h.cli("service", "add", "reviews", "--endpoint", f"127.0.0.1:{port}",
                  "--label", "version=v1")
    assert added.returncode == 0, added.stderr
    doc = tmp_path / "route.yaml"
    doc.write_text(
        "kind: Service\nname: reviews\nspec: {protocol: http}\n---\n"
        "kind: Route\nname: reviews\nspec:\n  service: reviews\n  rules:\n"
        "  - name: canary\n    backends:\n"
        "    - {service: reviews, subset: {version: v9}, weight: 10}\n"
        "    - {service: reviews, subset: {version: v1}, weight: 90}\n")
    r = h.cli("apply", "-f", str(doc))
    assert r.returncode == 0, r.stderr
    assert "Route/reviews created" in r.stdout, r.stdout
    assert r.stderr.splitlines() == [
        "warning: Route reviews: no endpoint of reviews carries version=v9; its requests get "
        "503 until one does"], r.stderr
