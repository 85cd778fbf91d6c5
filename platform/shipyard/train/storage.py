"""Where runs and checkpoints live: a local directory (default `.shipyard/runs`) or object storage.

Everything goes through a pyarrow filesystem, the interface Ray Train persists checkpoints with,
so the same completeness checks and listings work wherever the run directory is.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from shipyard.cluster import home


def storage_root(path: str | None) -> str:
    """The storage root of a spec's `storage.path` (absolute, so every Ray worker agrees)."""
    if path is None:
        return str(home() / "runs")
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    return pafs.FileSystem.from_uri(uri)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])
