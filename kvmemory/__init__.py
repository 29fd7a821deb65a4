"""kvmemory: an external key/value memory for transformers (Memorizing Transformers, RETRO).

>>> import kvmemory
>>> mem = kvmemory.Memory(key_dim=64, capacity=65536, num_heads=8, batch_size=4)
>>> mem.add(keys, values)                 # [batch, tokens, heads, dim]
>>> res = mem.search(queries, k=32)       # res.keys/values/scores/ids/mask
"""

from . import backends as _backends  # noqa: F401  (registers the built-in backends)
from .config import METRICS, MemoryConfig
from .memory import Memory
from .registry import available_backends, register_backend
from .result import SearchResult

__version__ = "0.1.0"

__all__ = ["Memory", "MemoryConfig", "SearchResult", "available_backends", "register_backend", "METRICS"]
