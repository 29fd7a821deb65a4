"""kvmemory for PyTorch: a device-resident backend, a bridge for host backends, and the Memorizing Transformer layer.

>>> import kvmemory, kvmemory_torch
>>> mem = kvmemory.Memory(key_dim=64, capacity=65536, num_heads=8, batch_size=4,
...                       backend="torch", device="cuda", score_dtype="bfloat16")
>>> layer = kvmemory_torch.KNNAttention(dim=512, num_heads=8, head_dim=64, memory=mem, k=32)
>>> y = layer(x, doc_start=starts)        # x [4, T, 512], starts [4] bool
"""

from .backend import TorchBackend
from .local_attention import LocalAttention
from .attention import KNNAttention, frozen_memories, knn_layers, reset_memories
from .model import MemorizingTransformer

__all__ = ["TorchBackend", "LocalAttention", "KNNAttention", "MemorizingTransformer", "reset_memories",
           "frozen_memories", "knn_layers"]

