"""The on-disk store: a self-describing directory, written so that nothing is ever half-written.

Layout::

    STORE/manifest.json             format, version, chunk length, tokenizer, embedder
                                    fingerprint, metric, index type, finished shards, pending shards
    STORE/shards/<name>/shard.json  the shard's own manifest: counts, a size + CRC-32 of every file,
                                    resolved index options, build timings
    STORE/shards/<name>/*.npy       tokens [n, C], lengths [n], doc_ids [n], positions [n],
                                    embeddings [n, dim] float32, docs [d, 4] (id, first chunk, chunks, tokens)
    STORE/shards/<name>/docs.json   document names
    STORE/shards/<name>/index.bin   the shard's serialized ANN index (none for "exact")
    STORE/neighbours/<name>/        batch-precomputed neighbours (see precompute.py)

A shard is written into ``shards/.tmp-<name>-<random>/`` and renamed to
``shards/<name>`` once complete (an atomic rename), so a shard directory
exists only if it is whole; a killed build leaves at most ``.tmp-*``
directories, removed by the next build. JSON files are written to a temporary
name and renamed. Loading checks the manifest, every shard's file sizes and
``.npy`` headers (truncation) and, with ``verify=True``, their CRC-32
(corruption), and refuses mismatches with a ``ValueError`` saying what and where.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib

import numpy as np

from ..atomic import atomic_open, fsync_dir

FORMAT = "kvmemory.retro"
SHARD_FORMAT = "kvmemory.retro.shard"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_META = "shard.json"
SHARD_ARRAYS = ("tokens", "lengths", "doc_ids", "positions", "embeddings", "docs")


# -- atomic writes -----------------------------------------------------------------------
def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name in the same directory, then rename."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path!r} is corrupt (not readable JSON: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path!r} is corrupt (a JSON {type(obj).__name__}, expected an object)")
    return obj


# -- files with checksums ---------------------------------------------------------------------
def file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def write_array(directory: str, name: str, arr: np.ndarray) -> dict:
    """Save ``arr`` as ``<name>.npy`` in ``directory`` (fsync'd); returns its record for shard.json."""
    arr = np.ascontiguousarray(arr)
    path = os.path.join(directory, name + ".npy")
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": os.path.getsize(path), "crc32": file_crc(path), "shape": list(arr.shape),
            "dtype": arr.dtype.str}


def write_file(directory: str, filename: str, data: bytes) -> dict:
    path = os.path.join(directory, filename)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def check_file(path: str, record: dict, verify: bool) -> None:
    """ValueError if ``path`` is missing, of another size than ``record`` says, or (verify) fails its CRC-32."""
    if not os.path.exists(path):
        raise ValueError(f"store file {path!r} is missing")
    size = os.path.getsize(path)
    if size != record.get("bytes"):
        raise ValueError(f"store file {path!r} is truncated or altered: {size} bytes, "
                         f"the shard manifest says {record.get('bytes')}")
    if verify and file_crc(path) != record.get("crc32"):
        raise ValueError(f"store file {path!r} is corrupt: it fails its CRC-32 check")


def load_array(directory: str, name: str, record: dict, verify: bool) -> np.ndarray:
    """``<name>.npy`` memory-mapped read-only, after checking size, header (shape, dtype) and CRC."""
    path = os.path.join(directory, name + ".npy")
    check_file(path, record, verify)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"store file {path!r} is not a readable .npy file: {e}") from None
    if list(arr.shape) != list(record.get("shape", [])) or arr.dtype.str != record.get("dtype"):
        raise ValueError(f"store file {path!r} holds {arr.dtype.str} {list(arr.shape)}, the shard manifest "
                         f"says {record.get('dtype')} {record.get('shape')}")
    return arr


# -- the manifest --------------------------------------------------------------------------
def manifest_path(store: str) -> str:
    return os.path.join(store, MANIFEST)


def read_manifest(store: str) -> dict:
    path = manifest_path(store)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{store!r} is not a retro store: it has no {MANIFEST}")
    m = read_json(path, "store manifest")
    if m.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a kvmemory retro manifest (format {m.get('format')!r})")
    if m.get("version") != VERSION:
        raise ValueError(f"{path!r} has store format version {m.get('version')!r}; this kvmemory reads {VERSION}")
    required = ("chunk_len", "pad_id", "tokenizer", "token_dtype", "embedder", "metric", "index", "shards",
                "pending")
    missing = [k for k in required if k not in m]
    if missing:
        raise ValueError(f"{path!r} is incomplete: it lacks {missing}")
    return m


def write_manifest(store: str, manifest: dict) -> None:
    shards = manifest["shards"]
    manifest["counts"] = {"shards": len(shards), "docs": sum(s["docs"] for s in shards),
                          "chunks": sum(s["chunks"] for s in shards), "tokens": sum(s["tokens"] for s in shards)}
    atomic_write_json(manifest_path(store), manifest)


# -- shards ---------------------------------------------------------------------------------
def shards_dir(store: str) -> str:
    return os.path.join(store, "shards")


def shard_dir(store: str, name: str) -> str:
    return os.path.join(shards_dir(store), name)


def new_shard_tmp(store: str, name: str) -> str:
    path = os.path.join(shards_dir(store), f".tmp-{name}-{uuid.uuid4().hex[:12]}")
    os.makedirs(path)
    return path


def commit_shard(store: str, name: str, tmp: str) -> bool:
    """Rename the finished ``tmp`` shard directory to its name; False (tmp removed) if it exists already."""
    final = shard_dir(store, name)
    try:
        os.rename(tmp, final)
    except OSError:
        if os.path.isdir(final):          # another worker finished the same shard first
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    fsync_dir(shards_dir(store))
    return True


def clean_tmp(store: str) -> list:
    """Remove leftovers of killed builds (``.tmp-*`` shard directories); returns their names."""
    d = shards_dir(store)
    if not os.path.isdir(d):
        return []
    gone = [n for n in os.listdir(d) if n.startswith(".tmp-")]
    for n in gone:
        shutil.rmtree(os.path.join(d, n), ignore_errors=True)
    return gone


def read_shard_meta(store: str, name: str) -> dict | None:
    """The shard's shard.json, or None if the shard has not been (completely) written."""
    path = os.path.join(shard_dir(store, name), SHARD_META)
    if not os.path.exists(path):
        return None
    meta = read_json(path, "shard manifest")
    if meta.get("format") != SHARD_FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path!r} is not a version-{VERSION} retro shard manifest")
    return meta


def load_shard_arrays(store: str, name: str, meta: dict, verify: bool) -> dict:
    """Every array of a shard, memory-mapped, checked against its shard.json."""
    d = shard_dir(store, name)
    files = meta.get("files", {})
    missing = [a for a in SHARD_ARRAYS if a + ".npy" not in files]
    if missing or "docs.json" not in files:
        raise ValueError(f"shard manifest of {d!r} does not list {missing or ['docs.json']}")
    arrays = {a: load_array(d, a, files[a + ".npy"], verify) for a in SHARD_ARRAYS}
    check_file(os.path.join(d, "docs.json"), files["docs.json"], verify)
    if "index.bin" in files:
        check_file(os.path.join(d, "index.bin"), files["index.bin"], verify)
    n = meta["counts"]["chunks"]
    for a in ("tokens", "lengths", "doc_ids", "positions", "embeddings"):
        if arrays[a].shape[0] != n:
            raise ValueError(f"shard {d!r}: {a}.npy has {arrays[a].shape[0]} rows, the shard has {n} chunks")
    if arrays["docs"].shape != (meta["counts"]["docs"], 4):
        raise ValueError(f"shard {d!r}: docs.npy has shape {arrays['docs'].shape}, "
                         f"expected ({meta['counts']['docs']}, 4)")
    return arrays


def read_doc_names(store: str, name: str) -> list:
    with open(os.path.join(shard_dir(store, name), "docs.json"), "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def read_index_bytes(store: str, name: str) -> bytes:
    with open(os.path.join(shard_dir(store, name), "index.bin"), "rb") as f:
        return f.read()
