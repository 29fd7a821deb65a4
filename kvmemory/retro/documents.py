"""Documents to build a database from: files under a directory, or token arrays / texts in memory."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os

import numpy as np

from .chunking import check_document


@dataclasses.dataclass
class Document:
    """A named document: its tokens, or the path of a file to read them from (``tokens`` None)."""

    name: str
    path: str | None = None
    tokens: np.ndarray | None = None

    def load(self, tokenizer) -> np.ndarray:
        """Token ids [n]: the file's raw bytes for the bytes tokenizer, else ``tokenizer.encode`` of its text."""
        if self.tokens is not None:
            return check_document(self.tokens, repr(self.name), tokenizer.vocab_size)
        with open(self.path, "rb") as f:
            data = f.read()
        if tokenizer.name == "bytes":
            return np.frombuffer(data, np.uint8)
        return check_document(tokenizer.encode(data.decode("utf-8", errors="replace")), repr(self.name),
                              tokenizer.vocab_size)


def as_documents(docs, tokenizer) -> list:
    """Documents from a list of Document, token arrays, bytes or texts (named by their index)."""
    if isinstance(docs, (str, os.PathLike)):
        raise TypeError("docs is a path: list its files with documents_from_dir(path, ...) first")
    out = []
    for i, d in enumerate(docs):
        if isinstance(d, Document):
            out.append(d)
        elif isinstance(d, str):
            out.append(Document(str(i), tokens=np.asarray(tokenizer.encode(d))))
        else:
            out.append(Document(str(i), tokens=check_document(d, str(i), tokenizer.vocab_size)))
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise ValueError("document names must be unique")
    return out


def documents_from_dir(root: str, pattern: str = "*", exclude_dirs=(), min_bytes: int = 0,
                       max_bytes: int | None = None, max_files: int | None = None) -> list:
    """Files under ``root`` matching ``pattern`` (fnmatch on the file name), sorted by relative path.

    exclude_dirs: directory names skipped wherever they occur (e.g. "test", "__pycache__");
    min_bytes / max_bytes: keep files of that size; max_files: the first that many (sorted order).
    Names are paths relative to ``root``.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise ValueError(f"docs must be a directory, got {root!r}")
    exclude = set(exclude_dirs)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude)
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            if not fnmatch.fnmatch(f, pattern) or not os.path.isfile(path):
                continue
            size = os.path.getsize(path)
            if size < min_bytes or (max_bytes is not None and size > max_bytes):
                continue
            found.append(Document(os.path.relpath(path, root), path=path))
    found.sort(key=lambda d: d.name)
    return found[:max_files] if max_files is not None else found


def content_hash(names_and_tokens) -> str:
    """sha256 over (name, token ids) pairs: what a shard was built from."""
    h = hashlib.sha256()
    for name, tokens in names_and_tokens:
        t = np.ascontiguousarray(tokens)
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + b"\0" + str(len(t)).encode() + b"\0")
        h.update(t.astype(t.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()[:32]
