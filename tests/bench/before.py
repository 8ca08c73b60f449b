"""The code before a change, run beside the current one in the same bench run (for "the proxy
path no slower than before", tests/bench/kernel.py): a host whose agent, workers and BPF
programs come from an earlier commit.

The commit's tree is exported with `git archive` (the repository is only read) and installed,
not editable, into a venv of its own under the cache folder, reusing this venv's dependencies
(a .pth line), so that only meshnode's code differs. Built once per commit, then reused.
`BeforeHost` is a tests/harness.Host whose meshnode commands run that install; the programs it
starts (backend, load generator) are the current tree's, which import nothing of meshnode's.
"""

from __future__ import annotations

import shutil
import site
import subprocess
from pathlib import Path
from typing import Any

from tests.harness import Host

# the file whose arrival marks the kernel path (issue 17): "before" is the commit ahead of it
MARKER = "meshnode/policy/datapath.py"


class BeforeError(RuntimeError):
    """The earlier code could not be exported or installed."""


def _git(repo: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise BeforeError(f"git {' '.join(args)}: {exc}") from exc


def default_rev(repo: Path) -> str:
    """The parent of the commit that added MARKER; HEAD while it is not committed."""
    added = _git(repo, "log", "-1", "--format=%H", "--diff-filter=A", "--", MARKER)
    return f"{added}^" if added else "HEAD"


def prepare(repo: Path, rev: str, cache: Path) -> tuple[str, Path]:
    """(the commit, the python of a venv holding that commit's meshnode)."""
    sha = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
    d = cache / sha[:12]
    python = d / "venv" / "bin" / "python"
    stamp = d / "installed"
    if stamp.exists() and python.exists():
        return sha, python
    shutil.rmtree(d, ignore_errors=True)
    tree = d / "tree"
    tree.mkdir(parents=True)
    try:
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", sha],
                                 capture_output=True, timeout=120, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, capture_output=True,
                       timeout=120, check=True)
        # Debian's python with its site packages: bcc (python3-bpfcc) lives there
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages",
                        str(d / "venv")], capture_output=True, timeout=120, check=True)
        own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        # this venv's packages, after the new venv's own: the same dependencies, not meshnode
        # (a .pth file in a folder added this way is not run: this venv's editable finder stays
        # out)
        Path(own.strip(), "current-deps.pth").write_text(
            "\n".join(site.getsitepackages()) + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--no-deps", str(tree)],
                       capture_output=True, timeout=600, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        raise BeforeError(f"installing {sha[:12]} failed: {exc} "
                          f"{err.decode(errors='replace')[-400:]}") from exc
    stamp.touch()
    return sha, python


class BeforeHost(Host):
    """A Host whose meshnode (agent, workers, `meshnode run`, `meshnode uninstall`) is the
    earlier install: neither PYTHONPATH nor the working folder on their path, either of which
    would put the current tree first."""

    def __init__(self, tmp: Path, backend: str, python: Path, repo: Path, **kw: Any) -> None:
        super().__init__(tmp, backend, **kw)
        self.python = str(python)
        self.repo = str(repo)
        # PYTHONSAFEPATH: `python -m` (the agent, the workers it starts) must not import the
        # current tree from the working folder either
        self.env = {**{k: v for k, v in self.env.items() if k != "PYTHONPATH"},
                    "PYTHONSAFEPATH": "1"}

    def popen(self, argv: list[str], service: str | None = None,
              **kw: Any) -> subprocess.Popen[Any]:
        # the current tree's programs need it on their path; meshnode run must not have it
        return super().popen(["env", f"PYTHONPATH={self.repo}", *argv], service, **kw)
