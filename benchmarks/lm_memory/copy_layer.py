"""Which block should hold the memory? The default preset's copy task with the memory in a chosen block.

    python -m benchmarks.lm_memory.copy_layer --knn-layer 0          # ~25 min on 2 busy cores
    python -m benchmarks.lm_memory.copy_layer --knn-layer 2 --steps 200

The default model (dim 256, 4 blocks, 4 heads, segments of 256, XL cache,
smeared keys, dconv 3, k 32, exact memory of 4,096) on the default copy
task (6,144-byte documents, 64-byte passages, far copies 1,024-3,072 bytes
back), trained with AdamW at 3e-3 (no schedule) and evaluated on held-out
copy documents. A memory is only useful if its own block's queries and keys
learn to match content, which they learn from that block's local attention:
the copying circuit forms in block 0 here, so a memory in block 2 (the
preset's default, depth - 2) goes unused. Writes
results/lm_memory_copy_layer<N>.json.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from kvmemory_torch import MemorizingTransformer

from ..common import environment, log, result_path, write_json
from .copy_task import copy_documents
from .evaluate import evaluate
from .report import after_locating
from .stream import TrainStream
from .train import token_bits

BATCH, SEGMENT, LENGTH = 8, 256, 6144
TASK = dict(passage=64, gap=(1024, 3072))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_memory.copy_layer", description=__doc__.split("\n")[0])
    p.add_argument("--knn-layer", type=int, default=0)
    p.add_argument("--steps", type=int, default=800)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    train = copy_documents(args.steps * BATCH * SEGMENT // LENGTH + BATCH, LENGTH, seed=0, **TASK)
    held_out = copy_documents(8, LENGTH, seed=1, **TASK)
    torch.manual_seed(0)
    model = MemorizingTransformer(256, dim=256, depth=4, num_heads=4, k=32, knn_layer=args.knn_layer,
                                  memory={"capacity": 4096, "batch_size": BATCH, "backend": "exact"},
                                  xl_cache=True, smear_keys=True, dconv=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = TrainStream(train, BATCH, SEGMENT, seed=0)
    start = time.perf_counter()
    for step in range(args.steps):
        bits, valid = token_bits(model, stream.next(), "cpu")
        optimizer.zero_grad()
        (bits.sum() / valid.sum() * math.log(2)).backward()
        optimizer.step()
        if step % 100 == 0:
            log(f"copy_layer: step {step}, train {float(bits.detach().sum() / valid.sum()):.2f} bits/byte")
    result = evaluate(model, held_out, BATCH, SEGMENT, "cpu")
    out = {"environment": environment(), "knn_layer": args.knn_layer, "steps": args.steps,
           "train_s": time.perf_counter() - start,
           "far_bits_per_byte": result["copied_bits_per_byte"], "far_after_locating": after_locating(result),
           "near_bits_per_byte": result["near_copied_bits_per_byte"], "fresh_bits_per_byte": result["other_bits_per_byte"],
           "far_by_offset": result["copied_by_offset"],
           "gates": torch.sigmoid(model.knn_attention.gate_bias).tolist()}
    log(f"copy_layer: memory in block {args.knn_layer}: far copies {out['far_bits_per_byte']:.2f} bits/byte "
        f"({out['far_after_locating']:.2f} from byte 4), near {out['near_bits_per_byte']:.2f}")
    write_json(result_path(f"lm_memory_copy_layer{args.knn_layer}.json"), out)
    return out


if __name__ == "__main__":
    main()
