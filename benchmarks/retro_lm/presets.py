"""Sizes: ``quick`` (CI smoke test, about a minute), ``default`` (2 CPU cores, <= 60 min), ``gpu`` (one GPU).

The gpu preset is sized from the default's step times and has not run on a GPU yet.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    # model
    dim: int
    depth: int
    heads: int
    chunk_len: int                 # m: the database's chunk length, bytes
    seq_chunks: int                # chunks per training / evaluation window (n = seq_chunks * m)
    batch: int
    k: int = 2                     # neighbours per chunk
    encoder_dim: int = 128
    encoder_depth: int = 1
    retro_layers: tuple | None = None   # None: kvmemory_torch.retro.default_retro_layers(depth)
    # training (the same budget for every row)
    steps: int = 400
    retrofit_steps: int = 150
    lr: float = 2e-3
    warmup: int = 50
    # data and database
    embedder: str = "minilm"       # or "ngram-hash" (numpy, lexical)
    min_doc_bytes: int = 20_000
    held_out_fraction: float = 0.1     # the lm_memory experiment's split (same seed)
    db_bytes: int = 600_000            # training files in the database (and trained on)
    train_max_doc_bytes: int | None = None
    eval_bytes: int = 120_000
    eval_max_doc_bytes: int | None = 30_000
    near_dup_ngram: int = 8
    near_dup_fraction: float = 0.5     # a chunk "leaks" when this share of its 8-grams is in its neighbours
    eval_batch: int = 16
    device: str = "cpu"
    seed: int = 0

    @property
    def seq_len(self) -> int:
        return self.chunk_len * self.seq_chunks

    def key(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "quick": Preset(name="quick", dim=32, depth=2, heads=2, chunk_len=16, seq_chunks=4, batch=8, encoder_dim=32,
                    steps=24, retrofit_steps=8, warmup=4, embedder="ngram-hash", db_bytes=40_000,
                    train_max_doc_bytes=5_000, eval_bytes=8_000, eval_max_doc_bytes=2_000),
    "default": Preset(name="default", dim=128, depth=4, heads=4, chunk_len=64, seq_chunks=4, batch=8,
                      encoder_dim=64, steps=600, retrofit_steps=240, lr=2e-3, warmup=50, db_bytes=400_000,
                      train_max_doc_bytes=16_000, eval_bytes=80_000, eval_max_doc_bytes=10_000),
    "gpu": Preset(name="gpu", dim=512, depth=12, heads=8, chunk_len=64, seq_chunks=8, batch=32, encoder_dim=256,
                  encoder_depth=2, steps=3000, retrofit_steps=1000, lr=1e-3, warmup=200, db_bytes=24_000_000,
                  eval_bytes=1_000_000, eval_max_doc_bytes=None, eval_batch=64, device="cuda"),
}
