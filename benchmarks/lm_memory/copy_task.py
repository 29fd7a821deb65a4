"""The synthetic long-range copy task: random bytes in which passages recur far after their first occurrence.

A document is a sequence of passages of ``passage`` bytes. Each passage is
either fresh (bytes drawn uniformly from an alphabet of ``alphabet``
symbols) or a copy of an earlier passage: with probability ``far`` a
*far* copy, of a passage ``gap`` = (lo, hi) bytes back, beyond a segment
and its XL cache, so only a memory of the document's past can predict it;
with probability ``near`` a *near* copy, of one ``near_gap`` bytes back,
inside the local context. Near copies are what teaches attention to copy
at all: keys in a memory are written detached, so the key projection learns
only from local attention, as in the paper.

Outside copies the best possible prediction is log2(alphabet) bits/byte; on a
copy, a model that retrieves it pays for its first byte or two (which locate
it) and then almost nothing. ``copy_offset`` marks each byte: its offset in
a far copy (>= 0), -2 in a near copy, -1 elsewhere.
"""

from __future__ import annotations

import numpy as np

from .corpus import Document


def copy_document(rng: np.random.Generator, name: str, length: int, passage: int = 64,
                  gap: tuple[int, int] = (1024, 3072), far: float = 0.3, near: float = 0.3,
                  near_gap: tuple[int, int] | None = None, alphabet: int = 256) -> Document:
    """One copy-task document of ``length`` bytes (see the module docstring); near_gap defaults to (1, 3) passages."""
    near_gap = near_gap or (passage, 3 * passage)
    for label, (lo, hi) in (("gap", gap), ("near_gap", near_gap)):
        if not passage <= lo <= hi:
            raise ValueError(f"need passage <= {label}[0] <= {label}[1], got passage={passage}, {label}={(lo, hi)}")
    data = rng.integers(0, alphabet, length, dtype=np.uint8)
    offset = np.full(length, -1, np.int16)
    for pos in range(0, length - passage + 1, passage):
        r = rng.random()
        lo, hi = gap if r < far else near_gap if r < far + near else (pos + 1, pos + 1)
        if pos >= lo:                                   # else there is nothing that far back: stays fresh
            src = pos - passage * int(rng.integers(-(-lo // passage), min(hi, pos) // passage + 1))
            data[pos:pos + passage] = data[src:src + passage]
            offset[pos:pos + passage] = np.arange(passage) if r < far else -2
    return Document(name, data, offset)


def copy_documents(n: int, length: int, seed: int, **options) -> list[Document]:
    """``n`` copy-task documents of ``length`` bytes (options as :func:`copy_document`)."""
    rng = np.random.default_rng(seed)
    return [copy_document(rng, f"copy-{seed}-{i}", length, **options) for i in range(n)]
