"""The standard-library byte corpus: deterministic, split by file, cached."""
import numpy as np
import pytest

from shipyard_models.data import stdlib_code
from shipyard_models.data.stdlib_code import ByteWindows, list_files, load_splits, split_files


def test_split_is_by_file_disjoint_and_deterministic():
    files = list_files(stdlib_code.stdlib_root())
    assert len(files) > 200 and files == sorted(files)
    skipped = {"site-packages", "test", "tests"}
    assert not any(part in skipped for f in files for part in f.split("/")[:-1])
    train, val = split_files(files, 10)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(files)
    assert 0.05 < len(val) / len(files) < 0.15
    # the split of a file does not depend on the order or on the other files
    assert split_files(list(reversed(files)), 10) == (train, val)
    half = set(files[::2])
    assert split_files(sorted(half), 10) == ([f for f in train if f in half],
                                             [f for f in val if f in half])


@pytest.fixture
def tiny_tree(tmp_path):
    root = tmp_path / "lib"
    for i in range(40):
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        text = f"# module {i}\nx = {i}\n" * 5
        (root / f"pkg{i % 3}" / f"mod{i:02d}.py").write_bytes(text.encode())
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_bytes(b"assert True\n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "thirdparty.py").write_bytes(b"import this\n")
    return root


def test_splits_hold_exactly_their_files_and_are_cached(tiny_tree, tmp_path):
    cache = tmp_path / "cache"
    train, val = load_splits(cache, val_every=4, root=tiny_tree)
    files = list_files(tiny_tree)
    assert "test/test_x.py" not in files and len(files) == 40
    train_files, val_files = split_files(files, 4)
    assert val_files, "the fixture should put some files in validation"
    join = lambda fs: b"".join((tiny_tree / f).read_bytes() + b"\n" for f in fs)
    assert bytes(train) == join(train_files) and bytes(val) == join(val_files)
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 2 and all(name.endswith(".npy") for name in cached)
    train2, val2 = load_splits(cache, val_every=4, root=tiny_tree)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert sorted(p.name for p in cache.iterdir()) == cached
    with_tests, _ = load_splits(cache, val_every=4, root=tiny_tree, include_tests=True)
    assert len(list(cache.iterdir())) == 4 and len(with_tests) >= len(train)


def test_max_bytes_caps_each_split(tiny_tree, tmp_path):
    train, val = load_splits(tmp_path / "cache", max_bytes=500, val_every=4, root=tiny_tree)
    assert len(train) == 500 - 500 // 4 and len(val) == 500 // 4


def test_windows_are_non_overlapping_next_byte_pairs():
    data = np.arange(100, dtype=np.uint8)
    ds = ByteWindows(data, seq_len=8)
    assert len(ds) == 12
    first, second = ds[0]["tokens"], ds[1]["tokens"]
    assert first.tolist() == list(range(9)) and second.tolist() == list(range(8, 17))
    with pytest.raises(IndexError):
        ds[12]
    with pytest.raises(ValueError, match="seq_len"):
        ByteWindows(data[:5], seq_len=8)
