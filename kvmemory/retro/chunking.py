"""Tokenizers and the cutting of documents into fixed-length chunks.

A document is a 1-D array of token ids. It is cut into chunks of
``chunk_len`` tokens; the last chunk of a document may be shorter (it is
padded with ``pad_id`` and its ``length`` says how many tokens are real), so a
document shorter than one chunk still gives one chunk and an empty document
gives none. Chunk ``i`` of a document has position ``i``; its continuation is
chunk ``i + 1`` of the same document (none for the last chunk).
"""

from __future__ import annotations

import dataclasses

import numpy as np


class ByteTokenizer:
    """Bytes as tokens (vocab 256): UTF-8 encoding; decoding replaces invalid sequences (a chunk may cut a character)."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """Token ids [n] uint8 of ``text``."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).copy()

    def decode(self, tokens) -> str:
        return bytes(np.asarray(tokens, np.uint8)).decode("utf-8", errors="replace")

    def config(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}


TOKENIZERS = {"bytes": ByteTokenizer}


def make_tokenizer(spec) -> object:
    """A tokenizer from its name ("bytes") or an object with encode, decode, vocab_size and name."""
    if isinstance(spec, str):
        if spec not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {sorted(TOKENIZERS)} or a tokenizer object, got {spec!r}")
        return TOKENIZERS[spec]()
    missing = [a for a in ("encode", "decode", "vocab_size", "name") if not hasattr(spec, a)]
    if missing:
        raise TypeError(f"tokenizer {spec!r} lacks {missing}: it needs encode(text), decode(tokens), "
                        "vocab_size and name")
    return spec


def tokenizer_config(tokenizer) -> dict:
    if hasattr(tokenizer, "config"):
        return dict(tokenizer.config())
    return {"name": tokenizer.name, "vocab_size": int(tokenizer.vocab_size)}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids < vocab_size (uint8 for bytes)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise ValueError(f"vocab_size {vocab_size} is too large for 32-bit token ids")


@dataclasses.dataclass
class Chunks:
    """Chunks of consecutive documents, in document order.

    tokens     [n, chunk_len] token ids, padded with pad_id after ``lengths``
    lengths    [n] int32, real tokens per chunk (1..chunk_len)
    doc_ids    [n] int64, the document of each chunk
    positions  [n] int32, the chunk's index within its document
    doc_table  [docs, 4] int64: doc id, first chunk (index into these chunks), chunks, tokens
    """

    tokens: np.ndarray
    lengths: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray
    doc_table: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def check_document(tokens, name: str, vocab_size: int) -> np.ndarray:
    """``tokens`` as a 1-D integer array with ids in [0, vocab_size); else a clear error naming ``name``."""
    if isinstance(tokens, (bytes, bytearray, memoryview)):
        tokens = np.frombuffer(tokens, np.uint8)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"document {name} must be a 1-D array of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"document {name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"document {name} has token ids in [{lo}, {hi}], expected [0, {vocab_size})")
    return arr


def chunk_documents(docs, chunk_len: int, first_doc_id: int = 0, dtype=np.uint8, pad_id: int = 0,
                    vocab_size: int = 256, names=None) -> Chunks:
    """Cut documents (1-D token id arrays) into chunks; document ``j`` gets id ``first_doc_id + j``."""
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, (int, np.integer)) or chunk_len < 1:
        raise ValueError(f"chunk_len must be an int >= 1, got {chunk_len!r}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id must be in [0, {vocab_size}), got {pad_id}")
    docs = [check_document(d, repr(names[j]) if names else str(first_doc_id + j), vocab_size)
            for j, d in enumerate(docs)]
    counts = np.array([-(-len(d) // chunk_len) for d in docs], np.int64)
    n = int(counts.sum())
    tokens = np.full((n, chunk_len), pad_id, dtype)
    lengths = np.empty(n, np.int32)
    doc_ids = np.repeat(np.arange(first_doc_id, first_doc_id + len(docs), dtype=np.int64), counts)
    positions = np.empty(n, np.int32)
    table = np.zeros((len(docs), 4), np.int64)
    row = 0
    for j, d in enumerate(docs):
        m = int(counts[j])
        full = len(d) // chunk_len
        tokens[row:row + full] = d[:full * chunk_len].reshape(full, chunk_len)
        if m > full:
            tokens[row + full, :len(d) - full * chunk_len] = d[full * chunk_len:]
        lengths[row:row + m] = chunk_len
        if m > full:
            lengths[row + full] = len(d) - full * chunk_len
        positions[row:row + m] = np.arange(m)
        table[j] = (first_doc_id + j, row, m, len(d))
        row += m
    return Chunks(tokens, lengths, doc_ids, positions, table)
