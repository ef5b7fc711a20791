"""File-tree fingerprints for tests that promise to leave the user's files unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hash(*roots: Path) -> str:
    """sha256 over every path name (hidden ones too) and file's bytes under ``roots``."""
    h = hashlib.sha256()
    for root in roots:
        root = Path(root)
        for p in sorted(root.rglob("*")):
            h.update(str(p.relative_to(root)).encode() + b"\0")
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()
