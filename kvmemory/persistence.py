"""One-file save/load of a Memory: an uncompressed .npz with a JSON header.

Layout: ``__kvmemory__`` holds the UTF-8 JSON header (format, version, config,
backend name, resolved options); every other member is an array of the
backend's ``state_dict``. Files are written to a temporary name and renamed,
so a crash never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

FORMAT = "kvmemory"
VERSION = 1
HEADER = "__kvmemory__"


def save(path, memory) -> None:
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": memory.config.as_dict(),
        "backend": memory.backend_name,
        "options": memory.options,
    }
    arrays = {name: np.asarray(arr) for name, arr in memory.backend.state_dict().items()}
    arrays[HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    return header, arrays


def load(cls, path, **overrides):
    header, arrays = _read(path)
    try:
        config, backend, options = header["config"], header["backend"], dict(header["options"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)!r} has an incomplete header: {e}") from e
    options.update(overrides)
    memory = cls(**config, backend=backend, **options)
    memory.backend.load_state_dict(arrays)
    return memory
