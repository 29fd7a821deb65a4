"""RETRO on Python stdlib sources: what retrieval from a chunk database buys a small byte-level LM.

``python -m benchmarks.retro_lm [--quick | --gpu]`` (see :mod:`.presets`). The
corpus and its train/held-out split are the memory experiment's
(:mod:`benchmarks.lm_memory.corpus`); the database is a
:mod:`kvmemory.retro` store of the training files' chunks, the model
:class:`kvmemory_torch.retro.RetroTransformer`. Rows, equal budgets:

* ``none``: the plain decoder (no retrieval), ``steps`` steps;
* ``retro``: RETRO trained from scratch, ``steps`` steps (neighbours
  precomputed, own document excluded);
* ``none+ft``: ``none`` continued ``retrofit_steps`` more steps;
* ``retrofit``: ``none`` with CCA and the encoder added, base frozen, the new
  parts trained ``retrofit_steps`` steps.

Held-out files are read in windows of ``seq_chunks`` chunks, neighbours from
the training database. Then the knowledge update (the held-out files' first
halves added to the database; bits/byte on their second halves, with and
without them), and leakage (evaluation chunks whose neighbours share at least
half of their byte 8-grams, and bits/byte without those chunks).
"""
