"""Does CCA read its neighbours at all? RETRO trained and evaluated with *oracle* neighbours.

``python -m benchmarks.retro_lm.oracle [--steps N] [--set FIELD=VALUE ...]``: the neighbour of chunk u is
chunk u itself with its continuation (chunk u + 1, the bytes that chunk u + 1's tokens predict), so a
model that learns to copy through CCA can push bits/byte towards 0. Evaluated on the held-out windows
with the oracle neighbours and with every neighbour masked (retrieval off). A large gap says the model
side works and that the real neighbours, not the machinery, limit what retrieval buys.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np
import torch

from kvmemory import retro

from ..common import environment, log, print_table, result_path, write_json
from ..lm_memory.corpus import documents, split, take_bytes
from . import data, run
from .cli import with_overrides
from .presets import PRESETS


def oracle_eval_set(preset, docs) -> data.EvalSet:
    """Held-out windows whose neighbour tokens are their own chunks and continuations (ids unused)."""
    w, _ = data.windows(preset, docs)
    return data.EvalSet(w[:, :-1], w[:, 1:], None, None)


def oracle_neighbours(preset, inputs: np.ndarray, device) -> tuple:
    """[W, L, 1, 2m] tokens: chunk u and chunk u + 1 of the window (the last chunk's continuation masked)."""
    m, L = preset.chunk_len, preset.seq_chunks
    W = len(inputs)
    padded = np.concatenate([inputs, np.zeros((W, m), inputs.dtype)], 1)
    nb = np.stack([padded[:, u * m:u * m + 2 * m] for u in range(L)], 1)[:, :, None]
    mask = np.ones(nb.shape, bool)
    mask[:, L - 1, :, m:] = False
    return (torch.as_tensor(nb.astype(np.int64), device=device), torch.as_tensor(mask, device=device))


@torch.no_grad()
def oracle_bits(preset, model, ev, retrieval: bool) -> float:
    model.eval()
    total = 0.0
    for a in range(0, len(ev), preset.eval_batch):
        x = ev.inputs[a:a + preset.eval_batch]
        nb, mask = oracle_neighbours(preset, x, preset.device)
        logits = model(torch.as_tensor(x.astype(np.int64), device=preset.device), nb,
                       mask if retrieval else torch.zeros_like(mask))
        y = torch.as_tensor(ev.targets[a:a + preset.eval_batch].astype(np.int64), device=preset.device)
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, run.VOCAB).float(), y.reshape(-1),
                                                   reduction="sum").item() / run.LN2
    return total / ev.inputs.size


class OracleBatches(data.TrainBatches):
    def next(self):
        inputs, targets, _, _ = super().next()
        nb, mask = oracle_neighbours(self.preset, inputs.cpu().numpy(), self.preset.device)
        return inputs, targets, nb, mask


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retro_lm.oracle", description=__doc__)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--work-dir")
    p.add_argument("--out-dir")
    args = p.parse_args(argv)
    preset = with_overrides(dataclasses.replace(PRESETS["default"], embedder="ngram-hash", name="oracle"), args.set)
    work = args.work_dir or os.path.join(tempfile.gettempdir(), "kvmemory-retro-lm-oracle")
    t0 = time.perf_counter()
    train_docs, held = split(documents("code", preset.min_doc_bytes), preset.held_out_fraction, preset.seed)
    train_docs = take_bytes(train_docs, preset.db_bytes, preset.train_max_doc_bytes)
    eval_docs = take_bytes(held, preset.eval_bytes, preset.eval_max_doc_bytes)
    db, _ = data.build_database(preset, train_docs, data.store_path(work, preset, train_docs))
    pre = retro.precompute_neighbours(db, "train", k=preset.k)
    ev = oracle_eval_set(preset, eval_docs)
    model = run.build_model(preset, retrieval=True)
    summary = run.train(preset, model, OracleBatches(preset, db, train_docs, pre, 1), preset.steps, name="oracle")
    on, off = oracle_bits(preset, model, ev, True), oracle_bits(preset, model, ev, False)
    results = {"preset": preset.key(), "environment": environment(), "wall_s": time.perf_counter() - t0,
               "train": summary, "eval_windows": len(ev), "bits_per_byte_oracle": on,
               "bits_per_byte_retrieval_off": off}
    print_table(f"retro_lm oracle ({preset.steps} steps, dim {preset.dim}): held-out bits/byte",
                ["neighbours", "bits/byte"], [["own chunk + continuation", on], ["none (masked)", off]])
    path = write_json(result_path("retro_lm_oracle.json", args.out_dir), results)
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
