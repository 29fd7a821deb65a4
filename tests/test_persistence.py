"""save/load: exact round trip, FIFO continues where it stopped, bad files refused clearly."""

import json
import zipfile
import zlib

import numpy as np
import pytest

import kvmemory
from conftest import backend_options, installed_backends


def filled(backend="exact", capacity=10, metric="cosine"):
    mem = kvmemory.Memory(key_dim=4, value_dim=2, capacity=capacity, num_heads=2, batch_size=2,
                          backend=backend, metric=metric, **backend_options(backend, capacity))
    rng = np.random.default_rng(5)
    for t in (7, 9):
        mem.add(rng.standard_normal((2, t, 2, 4)).astype(np.float32),
                rng.standard_normal((2, t, 2, 2)).astype(np.float32))
    mem.clear(1)
    mem.add(rng.standard_normal((2, 3, 2, 4)).astype(np.float32),
            rng.standard_normal((2, 3, 2, 2)).astype(np.float32))
    return mem


def as_np(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


@pytest.mark.parametrize("backend", installed_backends())
def test_round_trip_continues_fifo(backend, tmp_path):
    mem = filled(backend)
    path = tmp_path / "mem.kvm"
    mem.save(path)
    loaded = kvmemory.Memory.load(path)
    assert loaded.config == mem.config and loaded.backend_name == backend
    assert loaded.options == mem.options
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 3, 2, 4)).astype(np.float32)
    for a, b in zip(mem.search(q, k=12), loaded.search(q, k=12)):
        np.testing.assert_array_equal(as_np(a), as_np(b))
    # the same adds to both: ids and contents keep matching
    keys = rng.standard_normal((2, 6, 2, 4)).astype(np.float32)
    values = rng.standard_normal((2, 6, 2, 2)).astype(np.float32)
    mem.add(keys, values)
    loaded.add(keys, values)
    assert loaded.size.tolist() == mem.size.tolist() == [10, 9]
    for a, b in zip(mem.search(q, k=12), loaded.search(q, k=12)):
        np.testing.assert_array_equal(as_np(a), as_np(b))
    assert not list(tmp_path.glob("*.tmp-*"))


def test_save_keeps_the_exact_path(tmp_path):
    path = tmp_path / "no_suffix"
    filled().save(path)
    assert path.exists() and not (tmp_path / "no_suffix.npz").exists()


def test_load_overrides_options(tmp_path):
    filled().save(tmp_path / "m")
    assert kvmemory.Memory.load(tmp_path / "m", block_bytes=1024).options["block_bytes"] == 1024


def test_load_refuses_to_override_the_saved_shape(tmp_path):
    filled().save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"overrides backend options only; \['backend', 'capacity'\]"):
        kvmemory.Memory.load(tmp_path / "m", capacity=3, backend="faiss")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        kvmemory.Memory.load(tmp_path / "nope")


def test_corrupt_and_truncated_files(tmp_path):
    path = tmp_path / "m"
    filled().save(path)
    data = path.read_bytes()
    (tmp_path / "trunc").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable kvmemory file"):
        kvmemory.Memory.load(tmp_path / "trunc")
    (tmp_path / "garbage").write_bytes(b"this is not a memory")
    with pytest.raises(ValueError, match="not a readable kvmemory file"):
        kvmemory.Memory.load(tmp_path / "garbage")
    flipped = bytearray(data)
    at = data.index(np.load(path)["keys"].tobytes()[:64]) + 8  # inside the keys array's data
    flipped[at] ^= 0xFF
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="not a readable kvmemory file: Bad CRC-32"):
        kvmemory.Memory.load(tmp_path / "flipped")


def rewrite(src, dst, change_header=None, change_arrays=None, keep_crc=False):
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(bytes(arrays.pop("__kvmemory__")).decode())
    if change_header:
        change_header(header)
    if change_arrays:
        change_arrays(arrays)
    if not keep_crc:
        header["crc32"] = {k: zlib.crc32(np.ascontiguousarray(v).view(np.uint8).reshape(-1)) for k, v in arrays.items()}
    arrays["__kvmemory__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


def test_incompatible_version(tmp_path):
    filled().save(tmp_path / "m")
    rewrite(tmp_path / "m", tmp_path / "v2", change_header=lambda h: h.update(version=2))
    with pytest.raises(ValueError, match="format version 2; this kvmemory reads version 1"):
        kvmemory.Memory.load(tmp_path / "v2")


def test_not_a_kvmemory_npz(tmp_path):
    with open(tmp_path / "plain.npz", "wb") as f:
        np.savez(f, x=np.arange(3))
    with pytest.raises(ValueError, match="no '__kvmemory__' header"):
        kvmemory.Memory.load(tmp_path / "plain.npz")
    filled().save(tmp_path / "m")
    rewrite(tmp_path / "m", tmp_path / "fmt", change_header=lambda h: h.update(format="other"))
    with pytest.raises(ValueError, match="is not a kvmemory file"):
        kvmemory.Memory.load(tmp_path / "fmt")
    rewrite(tmp_path / "m", tmp_path / "nocfg", change_header=lambda h: h.pop("config"))
    with pytest.raises(ValueError, match="incomplete header"):
        kvmemory.Memory.load(tmp_path / "nocfg")


def test_mismatched_arrays(tmp_path):
    filled().save(tmp_path / "m")

    def shrink(a):
        a["keys"] = a["keys"][:, :, :5]

    rewrite(tmp_path / "m", tmp_path / "shape", change_arrays=shrink)
    with pytest.raises(ValueError, match="saved 'keys' has shape"):
        kvmemory.Memory.load(tmp_path / "shape")
    rewrite(tmp_path / "m", tmp_path / "missing", change_arrays=lambda a: a.pop("values"))
    with pytest.raises(ValueError, match="lacks 'values'"):
        kvmemory.Memory.load(tmp_path / "missing")
    rewrite(tmp_path / "m", tmp_path / "neg", change_arrays=lambda a: a.update(counts=-a["counts"] - 1))
    with pytest.raises(ValueError, match="negative"):
        kvmemory.Memory.load(tmp_path / "neg")
    rewrite(tmp_path / "m", tmp_path / "cfg", change_header=lambda h: h["config"].update(capacity=11))
    with pytest.raises(ValueError, match="saved 'keys' has shape"):
        kvmemory.Memory.load(tmp_path / "cfg")


def test_changed_array_fails_our_checksum(tmp_path):
    """A consistent zip whose array differs from what was saved (e.g. rewritten by another tool)."""
    filled().save(tmp_path / "m")
    rewrite(tmp_path / "m", tmp_path / "edited", change_arrays=lambda a: a.update(values=a["values"] + 1),
            keep_crc=True)
    with pytest.raises(ValueError, match="corrupt: array 'values' fails its CRC-32 check"):
        kvmemory.Memory.load(tmp_path / "edited")


def test_array_not_listed_in_checksums(tmp_path):
    filled().save(tmp_path / "m")
    with np.load(tmp_path / "m") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["extra"] = np.zeros(3)
    with open(tmp_path / "extra", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match="checksums do not list its arrays"):
        kvmemory.Memory.load(tmp_path / "extra")


def test_file_is_a_plain_zip_of_arrays(tmp_path):
    """No pickles: every member is a .npy array."""
    filled().save(tmp_path / "m")
    names = zipfile.ZipFile(tmp_path / "m").namelist()
    assert all(n.endswith(".npy") for n in names) and "__kvmemory__.npy" in names
