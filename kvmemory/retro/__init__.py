"""kvmemory.retro: RETRO's retrieval database (Borgeaud et al., 2021) on kvmemory's search machinery.

Documents are cut into chunks (64 tokens by default), keyed by a frozen
embedder (all-MiniLM-L6-v2, mean-pooled, by default), indexed per shard by any
kvmemory search backend (exact, faiss IVF / IVF-PQ / HNSW, ScaNN, hnswlib) and
stored in a self-describing directory. A query returns the k nearest chunks
of each input chunk, each followed by its continuation, leaving out the
query's own document.

>>> from kvmemory import retro
>>> docs = retro.documents_from_dir("/usr/lib/python3.11", "*.py", exclude_dirs=("test",))
>>> retro.build(docs, "stdlib.retro")                       # or workers=2: on Ray
>>> db = retro.RetroDatabase("stdlib.retro")
>>> nb = db.neighbours(["def parse_args(self):"], k=2)     # nb.tokens [1, 2, 128], ids, scores, mask
>>> pre = retro.precompute_neighbours(db, "train", k=2)    # every chunk, its own document excluded

Importing this package imports numpy only; the MiniLM embedder needs the
``retro`` extra (torch, transformers) and the Ray runner the ``ray`` extra.
"""

from .build import build
from .chunking import ByteTokenizer, Chunks, chunk_documents
from .database import Neighbours, RetroDatabase, SearchHits
from .documents import Document, documents_from_dir
from .embedder import (CallableEmbedder, Embedder, NgramHashEmbedder, available_embedders, make_embedder,
                       register_embedder)
from .index import INDEX_TYPES
from .precompute import Precomputed, load_neighbours, precompute_neighbours

__all__ = ["build", "ByteTokenizer", "Chunks", "chunk_documents", "Neighbours", "RetroDatabase", "SearchHits",
           "Document", "documents_from_dir", "CallableEmbedder", "Embedder", "NgramHashEmbedder",
           "available_embedders", "make_embedder", "register_embedder", "INDEX_TYPES", "Precomputed",
           "load_neighbours", "precompute_neighbours"]
