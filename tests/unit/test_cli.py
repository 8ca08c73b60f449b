"""The CLI edge: typed errors become one line and a sysexits code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def meshnode(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {"MESHNODE_RUN_DIR": str(tmp), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "meshnode.cli", *args], capture_output=True,
                          text=True, env=env, timeout=30)


def test_no_agent_is_one_line_with_the_fix(tmp_path: Path) -> None:
    r = meshnode("status", tmp=tmp_path)
    assert r.returncode == 69
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no meshnode agent" in lines[0] and "meshnode agent" in lines[0]


@pytest.mark.parametrize("args", [["enroll", "abc", "--service", "x"], ["enroll", "1"],
                                  ["status", "--output", "yaml"], ["nope"]])
def test_usage_errors_exit_64(args: list[str], tmp_path: Path) -> None:
    assert meshnode(*args, tmp=tmp_path).returncode == 64


def test_bad_instance_name(tmp_path: Path) -> None:
    r = meshnode("status", "--instance", "../x", tmp=tmp_path)
    assert r.returncode == 64 and "invalid instance name" in r.stderr


def test_run_unknown_command_is_refused_before_enrolling(tmp_path: Path) -> None:
    r = meshnode("run", "--service", "web", "--", "no-such-cmd-xyz", tmp=tmp_path)
    assert r.returncode == 64 and "command not found" in r.stderr


def test_version(tmp_path: Path) -> None:
    r = meshnode("--version", tmp=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("meshnode ")


def test_agent_config_travels_as_argv_to_the_lean_entry_point() -> None:
    from meshnode.config import AgentConfig

    cfg = AgentConfig(instance="x1", workers=3, netns="ns",
                      dns_upstreams=("192.0.2.1", "10.0.0.2:53"), state_dir=Path("/tmp/s"),
                      access_log="-", access_log_sample=0.25)
    assert AgentConfig.from_argv(cfg.to_argv()) == cfg
    assert AgentConfig.from_argv([]) == AgentConfig()


def test_agent_defaults_are_the_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """`meshnode agent` with no options hands the agent AgentConfig's defaults (one source:
    meshnode/constants.py), not literals restated in the CLI."""
    import os

    from meshnode.cli.app import app
    from typer.testing import CliRunner

    from meshnode.config import AgentConfig

    execs: list[list[str]] = []

    def execv(path: str, argv: list[str]) -> None:
        execs.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", execv)
    result = CliRunner().invoke(app, ["agent"])
    assert result.exit_code == 0, result.output
    [argv] = execs
    assert argv[1:4] == ["-m", "meshnode.cli.agent_main", "--log-level=info"]
    assert AgentConfig.from_argv(argv[4:]) == AgentConfig(workers=os.cpu_count() or 1)
