"""The wheelhouse the VMs install from (they have no PyPI): the project's dependencies as
wheels for Python 3.11, the guests' Python, built with this venv's pip."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path

# meshnode itself is built with these, installed in the venv (setup.sh's wheelhouse mode builds
# without an isolated environment: under emulation each one costs minutes)
BUILD = ["setuptools>=68", "wheel"]


def requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *BUILD]


def build(pyproject: Path, out: Path) -> bool:
    """Fill `out` unless it holds this very requirement list already; True when built. The
    list is also written as `out/requirements.txt` (the box pre-installs it)."""
    reqs = requirements(pyproject)
    stamp = out / ".requirements"
    digest = hashlib.sha256("\n".join(reqs).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and (out / "requirements.txt").exists():
        return False
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError("the wheelhouse must be built with Python 3.11 (Debian 12's)")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "-w", str(out), *reqs], check=True, timeout=600)
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n")
    stamp.write_text(digest)
    return True
