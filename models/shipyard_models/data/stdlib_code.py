"""Byte-level corpus of the Python standard library's own source code.

The corpus is every `*.py` file under `sysconfig.get_paths()["stdlib"]` (or a given root),
skipping `site-packages`/`dist-packages`, `__pycache__` and, unless asked for, the test suites
(directories named `test`, `tests`, `idle_test`). Files are read in sorted order of their
relative POSIX path and joined with a newline; tokens are the raw bytes (vocabulary 256).

The train/validation split is by file and does not depend on which other files exist: a file is
in validation when crc32(relative path) % val_every == 0. `max_bytes` caps the corpus (so tests
stay small): validation gets max_bytes // val_every of it, train the rest, each filled with its
files in sorted order and cut at the cap.

Both splits are encoded once and cached as uint8 `.npy` files in `cache_dir`, keyed by the
options and the Python version; later loads memory-map them, which is what several data-loader
workers on one machine want.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FORMAT_VERSION = 1
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    """Where this interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, include_tests: bool = False) -> list[str]:
    """Relative POSIX paths of the corpus files under `root`, sorted."""
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name.endswith(".py"):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def is_val_file(rel_path: str, val_every: int) -> bool:
    """The split rule: stable per file, independent of the rest of the tree."""
    return zlib.crc32(rel_path.encode()) % val_every == 0


def split_files(rel_paths: list[str], val_every: int) -> tuple[list[str], list[str]]:
    """(train, val) relative paths, each in sorted order."""
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2, got {val_every}")
    val = [p for p in rel_paths if is_val_file(p, val_every)]
    train = [p for p in rel_paths if not is_val_file(p, val_every)]
    return sorted(train), sorted(val)


def _concat(root: Path, rel_paths: list[str], cap: int | None) -> np.ndarray:
    """Files joined by newlines, stopping once `cap` bytes are gathered (None = no cap)."""
    parts, size = [], 0
    for rel in rel_paths:
        data = (root / rel).read_bytes() + b"\n"
        parts.append(data)
        size += len(data)
        if cap is not None and size >= cap:
            break
    return np.frombuffer(b"".join(parts)[:cap], dtype=np.uint8)


def cache_key(root: Path, max_bytes: int, val_every: int, include_tests: bool) -> str:
    options = {"root": str(root), "max_bytes": max_bytes, "val_every": val_every,
               "include_tests": include_tests, "format": FORMAT_VERSION}
    digest = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    return f"stdlib_code-py{sys.version_info.major}{sys.version_info.minor}-{digest}"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write then rename, so concurrent workers never read half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def load_splits(cache_dir: Path, max_bytes: int = 0, val_every: int = 10,
                include_tests: bool = False,
                root: str | Path = "") -> tuple[np.ndarray, np.ndarray]:
    """(train, val) uint8 arrays of the corpus, encoded on first use and cached.

    Args:
        cache_dir: folder for the cached `.npy` files (created if missing).
        max_bytes: cap on train + val bytes; 0 = the whole corpus.
        val_every: roughly one file in `val_every` goes to validation.
        include_tests: also take the standard library's test suites.
        root: corpus root; "" = this interpreter's standard library.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    root = Path(root) if root else stdlib_root()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(root, max_bytes, val_every, include_tests)
    paths = {split: cache_dir / f"{key}-{split}.npy" for split in ("train", "val")}
    if not all(p.exists() for p in paths.values()):
        train_files, val_files = split_files(list_files(root, include_tests), val_every)
        val_cap = max_bytes // val_every if max_bytes else None
        train_cap = max_bytes - val_cap if max_bytes else None
        arrays = {"train": _concat(root, train_files, train_cap),
                  "val": _concat(root, val_files, val_cap)}
        for split, array in arrays.items():
            _save_atomic(paths[split], array)
    return tuple(np.load(paths[s], mmap_mode="r") for s in ("train", "val"))


class ByteWindows(Dataset):
    """Non-overlapping windows of a byte array: item i is {"tokens": int64[seq_len + 1]}.

    Consecutive windows share one boundary byte (the last target of one is the first input of
    the next), so every byte after the first is predicted exactly once per epoch.
    """

    def __init__(self, data_u8: np.ndarray, seq_len: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if len(data_u8) < seq_len + 1:
            raise ValueError(f"corpus of {len(data_u8)} bytes is shorter than seq_len + 1 = "
                             f"{seq_len + 1}; raise max_bytes or lower seq_len")
        self.data, self.seq_len = data_u8, seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.seq_len
        window = np.asarray(self.data[start:start + self.seq_len + 1], dtype=np.int64)
        return {"tokens": torch.from_numpy(window)}
