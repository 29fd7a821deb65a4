"""Sizes of the experiment: ``quick`` (CI smoke test), ``default`` (2 CPU cores, <= 60 min), ``gpu`` (one H100/H200, ~10 min).

The gpu preset is sized from FLOP counts and has not run on a GPU yet.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    # model (the same for every configuration)
    dim: int
    depth: int
    heads: int
    seg_len: int              # tokens per segment (the local context)
    batch: int                # rows, each reading its own documents
    k: int = 32               # neighbours per query
    smear_keys: bool = True   # Olsson et al.'s smeared keys in every layer (see LocalAttention): without
                              # them no copying circuit forms within these budgets (copy task, both ways)
    dconv: int = 3            # width of Primer's causal depthwise q/k/v convolution in every layer (see
                              # LocalAttention); 3 lets the memory match 3-byte contexts (copy_scaling)
    knn_layer: int | None = None  # the block that gets the memory (and has no rotary, in every configuration);
                              # None: the model's default, depth - 2 (near the top, as in the paper)
    # training (the same budget for every configuration)
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 100
    retrofit_steps: int = 250  # (e): fine-tuning steps of the retrofit, and of (a) continued
    ckpt_every: int = 100
    # configurations
    memory_sizes: tuple = (1024, 4096, 16384, 65536)
    approx_backend: str = "faiss"
    corpora: tuple = ("code",)  # "prose" runs when its package is installed and the preset lists it
    prose_memory_sizes: tuple = (16384,)   # prose runs none, xl and these memory sizes (no (d), (e))
    # data
    min_doc_bytes: int = 20_000
    held_out_fraction: float = 0.1
    eval_bytes: int = 400_000        # held-out bytes evaluated (whole documents)
    eval_max_doc_bytes: int | None = None
    train_max_doc_bytes: int | None = None
    # copy task (part 1): trained from scratch with and without memory, on fresh documents only
    # (as many as the steps read: random bytes seen twice would be memorised into the weights)
    copy_steps: int = 300
    copy_length: int = 6144
    copy_passage: int = 64
    copy_gap: tuple = (1024, 3072)
    copy_eval_docs: int = 8
    copy_memory: int = 4096
    device: str = "cpu"
    seed: int = 0

    @property
    def results_suffix(self) -> str:
        """What result file names carry after ``lm_memory``: nothing for the default, "_custom" once
        ``--set`` changed a field, "_<name>" for the other presets."""
        if self.name == "default":
            return ""
        return "_custom" if self.name.endswith("-custom") else f"_{self.name}"

    def key(self) -> dict:
        """What a checkpoint must match to be resumed (fields added later are left out at their default,
        so that earlier checkpoints stay valid)."""
        key = dataclasses.asdict(self)
        for field, default in _ADDED_LATER.items():
            if key[field] == default:
                del key[field]
        return key


_ADDED_LATER = {"knn_layer": None}


PRESETS = {
    "quick": Preset(
        name="quick", dim=64, depth=2, heads=2, seg_len=64, batch=4, k=8,
        steps=30, lr=2e-3, warmup=5, retrofit_steps=10, ckpt_every=10,
        memory_sizes=(256, 1024), prose_memory_sizes=(1024,), eval_bytes=12_000, eval_max_doc_bytes=3_000, train_max_doc_bytes=4_000,
        copy_steps=30, copy_length=1024, copy_passage=16, copy_gap=(256, 512),
        copy_eval_docs=2, copy_memory=512, corpora=("code", "prose"),
    ),
    "default": Preset(
        name="default", dim=256, depth=4, heads=4, seg_len=256, batch=8,
        steps=450, lr=3e-3, warmup=100, retrofit_steps=120, ckpt_every=50,
        memory_sizes=(1024, 4096, 16384, 65536), eval_bytes=250_000,
        copy_steps=800, corpora=("code", "prose"),
    ),
    "gpu": Preset(
        name="gpu", dim=512, depth=8, heads=8, seg_len=512, batch=16,
        steps=1200, lr=1e-3, warmup=150, retrofit_steps=300, ckpt_every=200,
        memory_sizes=(1024, 4096, 16384, 65536), approx_backend="faiss", eval_bytes=1_000_000,
        copy_steps=1500, corpora=("code", "prose"), device="cuda",
    ),
}
