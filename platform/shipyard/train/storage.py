"""Where runs and checkpoints live: a local directory (default `.shipyard/runs`) or S3.

Everything goes through a pyarrow filesystem, the interface Ray Train persists checkpoints with,
so the same completeness checks and listings work wherever the run directory is. S3 goes through
s3fs wrapped for pyarrow: pyarrow's own S3 filesystem ignores `AWS_ENDPOINT_URL`
(apache/arrow#49643), so the endpoint is read here (spec, then `AWS_ENDPOINT_URL_S3`,
`AWS_ENDPOINT_URL`) and handed to s3fs explicitly. Credentials come from the spec or the usual AWS
environment variables / profiles, and are never logged or stored (see `JobSpec.to_dict`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from shipyard.cluster import home


def storage_root(path: str | None) -> str:
    """The storage root of a spec's `storage.path` (absolute, so every Ray worker agrees)."""
    if path is None:
        return str(home() / "runs")
    if "://" in path:
        if not path.startswith("s3://"):
            raise ValueError(f"storage.path: {path!r}: only local paths and s3:// URIs are supported")
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve())


def filesystem(uri: str, options=None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or an `s3://bucket/key` URI.

    `options` is the spec's `storage` block (or None: environment only).
    """
    if uri.startswith("s3://"):
        return s3_filesystem(options), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        raise ValueError(f"{uri}: only local paths and s3:// URIs are supported")
    return pafs.LocalFileSystem(), uri


def s3_filesystem(options=None) -> pafs.FileSystem:
    import s3fs
    get = (lambda k: getattr(options, k, None)) if options is not None else (lambda k: None)
    endpoint = get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {"endpoint_url": endpoint, "client_kwargs": {"region_name": region} if region else {}}
    if get("access_key_id"):
        kwargs.update(key=get("access_key_id"), secret=get("secret_access_key"))
    # A fresh instance, not s3fs's process-wide cache: each run may name its own endpoint.
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **{k: v for k, v in kwargs.items() if v is not None})
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def download(fs: pafs.FileSystem, path: str, local: Path) -> Path:
    """Copy a directory from storage to a local one (a no-op for local storage)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local
