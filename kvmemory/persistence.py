"""One-file save/load of a Memory: an uncompressed .npz with a JSON header.

Layout: ``__kvmemory__`` holds the UTF-8 JSON header (format, version, config,
backend name, resolved options, a CRC-32 of every array); every other member
is an array of the backend's ``state_dict``. numpy's npz reader does not
verify zip CRCs of members it reads, so the checksums are ours. Files are written to a temporary name and renamed,
so a crash never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib

import numpy as np

from .atomic import atomic_open

FORMAT = "kvmemory"
VERSION = 1
HEADER = "__kvmemory__"


def save(path, memory) -> None:
    arrays = {name: np.ascontiguousarray(arr) for name, arr in memory.backend.state_dict().items()}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": memory.config.as_dict(),
        "backend": memory.backend_name,
        "options": memory.options,
        "crc32": {name: _crc(arr) for name, arr in arrays.items()},
    }
    arrays[HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def _crc(arr: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).reshape(-1))


def _read(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            if HEADER not in z.files:
                raise ValueError(f"no {HEADER!r} header")
            header = json.loads(bytes(z[HEADER]).decode())
            arrays = {name: z[name] for name in z.files if name != HEADER}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not a readable kvmemory file: {e}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a kvmemory file (header {header!r})")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} was saved in kvmemory file format version "
            f"{header.get('version')!r}; this kvmemory reads version {VERSION}"
        )
    checksums = header.get("crc32")
    if not isinstance(checksums, dict) or set(checksums) != set(arrays):
        raise ValueError(f"{os.fspath(path)!r} has a header whose checksums do not list its arrays")
    for name, arr in arrays.items():
        if _crc(arr) != checksums[name]:
            raise ValueError(f"{os.fspath(path)!r} is corrupt: array {name!r} fails its CRC-32 check")
    return header, arrays


def load(cls, path, **overrides):
    header, arrays = _read(path)
    try:
        config, backend, options = header["config"], header["backend"], dict(header["options"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)!r} has an incomplete header: {e}") from e
    fixed = sorted(set(overrides) & (set(config) | {"backend"}))
    if fixed:
        raise ValueError(f"Memory.load overrides backend options only; {fixed} are part of the saved memory")
    options.update(overrides)
    memory = cls(**config, backend=backend, **options)
    memory.backend.load_state_dict(arrays)
    return memory
