"""Built-in backends, registered by name and imported only when first used."""

from ..registry import register_backend

register_backend("exact", "kvmemory.backends.exact:ExactBackend")
register_backend("faiss", "kvmemory.backends.faiss:FaissBackend", requires=("faiss",), extra="faiss")
register_backend("scann", "kvmemory.backends.scann:ScannBackend", requires=("scann",), extra="scann")
register_backend("hnsw", "kvmemory.backends.hnsw:HnswBackend", requires=("hnswlib",), extra="hnsw")
register_backend("torch", "kvmemory_torch.backend:TorchBackend", requires=("torch", "kvmemory_torch"), extra="torch")
register_backend("jax", "kvmemory_jax.backend:JaxBackend", requires=("jax", "kvmemory_jax"), extra="jax")
