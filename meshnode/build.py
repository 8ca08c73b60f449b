"""Which code is running: a short digest of meshnode's own files.

A restarted agent compares it with the build its workers report (and the BPF programs it
finds pinned): the same build is adopted as it is, a different one is replaced without a gap
(a rolling worker replacement; an atomic program swap). MESHNODE_BUILD_ID overrides it, so a
test or a drill can stage an upgrade without changing a file.
"""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

from meshnode import __version__

ENV = "MESHNODE_BUILD_ID"


@cache
def code_build() -> str:
    override = os.environ.get(ENV)
    if override:
        return override
    root = Path(__file__).parent
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
