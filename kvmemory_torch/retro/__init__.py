"""RETRO in PyTorch (Borgeaud et al., 2021): chunked cross-attention over retrieved neighbours.

>>> from kvmemory import retro
>>> from kvmemory_torch.retro import RetroTransformer, DatabaseRetriever, generate, precomputed_neighbours
>>> db = retro.RetroDatabase("stdlib.retro")                    # chunk_len 64
>>> model = RetroTransformer(256, dim=256, depth=6, chunk_len=db.chunk_len)
>>> nb, mask = precomputed_neighbours(db, pre.ids[chunk_ids])   # chunk_ids [B, L]: the input's chunks
>>> logits = model(tokens, nb, mask)                            # tokens [B, L * 64]
>>> out = generate(model, prompt, 200, DatabaseRetriever(db, k=2))

Retrofit a decoder trained without retrieval: ``RetroTransformer(..., retrieval=False)``,
train it, then ``new_params = model.add_retrieval()`` (base frozen) and train those.
"""

from .chunked_attention import ChunkedCrossAttention, attending_chunk, first_reader
from .cross_attention import CrossAttention
from .encoder import NeighbourEncoder
from .model import RetroTransformer, default_retro_layers
from .retrieval import DatabaseRetriever, generate, precomputed_neighbours

__all__ = ["ChunkedCrossAttention", "attending_chunk", "first_reader", "CrossAttention", "NeighbourEncoder",
           "RetroTransformer", "default_retro_layers", "DatabaseRetriever", "generate", "precomputed_neighbours"]
