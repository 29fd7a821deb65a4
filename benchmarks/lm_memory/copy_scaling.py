"""Why far copies are hard to learn as the memory grows: the copy task at a tiny scale, memory size swept.

    python -m benchmarks.lm_memory.copy_scaling            # capacities 256..4096, a few minutes on 2 cores
    python -m benchmarks.lm_memory.copy_scaling --quick    # two capacities, short

The copy task's first lookup is by one byte: with smeared keys the query of
byte x matches the keys of every position that followed an x. A memory of C
random bytes holds about C/256 such positions, so one byte locates a copy
only while C is small; beyond that the model needs a sharper, multi-byte
match. Primer's depthwise q/k/v convolution (``dconv=3``) lets one layer
describe the last three bytes in a query and the three before a position in
its key. Here the test suite's one-layer model (dim 64, 2 heads, segment 32,
XL cache, smeared keys, k 8, exact backend) is trained for the same number
of steps with documents of 2C bytes whose far copies come from (3C/8, 3C/4)
bytes back, and a memory of C tokens, with and without dconv, against the
same model without memory; then, at C=4096, a longer run (--long-steps) of
the one- and two-layer models (memory in the bottom block), since deeper
models sit on a plateau for longer before they start to copy. Reported per
run: held-out bits/byte on far copies, near copies and fresh bytes.
Writes results/lm_memory_copy_scaling.json and .png (``--quick``: *_quick*).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from kvmemory_torch import MemorizingTransformer

from ..common import environment, log, print_table, pyplot, result_path, write_json
from .copy_task import copy_documents
from .evaluate import evaluate
from .report import after_locating
from .stream import TrainStream
from .train import token_bits

BATCH, SEGMENT, PASSAGE = 8, 32, 16


def run(capacity: int, steps: int, memory: bool, depth: int = 1, knn_layer: int = 0, dconv: int = 0, k: int = 8,
        seed: int = 0) -> dict:
    """Train one tiny model on the copy task scaled to ``capacity`` and evaluate it on held-out documents."""
    length = 2 * capacity
    task = dict(passage=PASSAGE, gap=(3 * capacity // 8, 3 * capacity // 4), near_gap=(PASSAGE, 3 * PASSAGE),
                far=0.4, near=0.3)
    train = copy_documents(steps * BATCH * SEGMENT // length + BATCH, length, seed=seed, **task)
    held_out = copy_documents(max(4, 8192 // length), length, seed=seed + 1, **task)
    torch.manual_seed(seed)
    options = {"capacity": capacity, "batch_size": BATCH, "backend": "exact"} if memory else None
    model = MemorizingTransformer(256, dim=64, depth=depth, num_heads=2, memory=options, k=k, knn_layer=knn_layer,
                                  xl_cache=True, smear_keys=True, dconv=dconv)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = TrainStream(train, BATCH, SEGMENT, seed=seed)
    start = time.perf_counter()
    for _ in range(steps):
        bits, valid = token_bits(model, stream.next(), "cpu")
        optimizer.zero_grad()
        (bits.sum() / valid.sum() * math.log(2)).backward()
        optimizer.step()
    result = evaluate(model, held_out, BATCH, SEGMENT, "cpu")
    return {"capacity": capacity, "memory": memory, "depth": depth, "knn_layer": knn_layer, "dconv": dconv, "k": k,
            "steps": steps,
            "far_bits_per_byte": result["copied_bits_per_byte"],
            "near_bits_per_byte": result["near_copied_bits_per_byte"],
            "fresh_bits_per_byte": result["other_bits_per_byte"], "far_after_locating": after_locating(result),
            "far_by_offset": result["copied_by_offset"], "seconds": time.perf_counter() - start}


def plot(rows: list, path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = min(r["steps"] for r in rows)
    series = ((True, 3, "o-", "kNN memory of C tokens, dconv 3"), (True, 0, "s-", "kNN memory of C tokens, no dconv"),
              (False, 3, "x--", "no memory, dconv 3"))
    for memory, dconv, style, label in series:
        points = [(r["capacity"], r["far_bits_per_byte"]) for r in rows
                  if r["memory"] == memory and r["dconv"] == dconv and r["depth"] == 1 and r["steps"] == steps]
        if points:
            ax.plot(*zip(*points), style, label=label)
    for r in rows:
        if r["steps"] > steps:
            ax.plot(r["capacity"], r["far_bits_per_byte"], "^" if r["depth"] == 1 else "v", ms=8,
                    label=f"memory, dconv {r['dconv']}, {r['depth']} layer(s), {r['steps']} steps")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory size C (tokens); each byte value occurs ~C/256 times in it")
    ax.set_ylabel("held-out bits/byte on far copies")
    ax.set_title(f"copy task, 1-layer model, {steps} steps unless marked")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_memory.copy_scaling", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 800; --quick 150)")
    p.add_argument("--long-steps", type=int, default=None, help="steps of the long runs at C=4096 (default 3000; "
                                                                  "--quick: none)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = args.steps or (150 if args.quick else 800)
    long_steps = args.long_steps if args.long_steps is not None else (0 if args.quick else 3000)
    capacities = (256, 1024) if args.quick else (256, 512, 1024, 2048, 4096)
    plan = [dict(capacity=c, memory=m, dconv=d) for c in capacities for m, d in ((True, 3), (True, 0), (False, 3))]
    if long_steps:
        plan += [dict(capacity=4096, memory=True, dconv=3, depth=depth, steps=long_steps) for depth in (1, 2)]
    rows = []
    for spec in plan:
        rows.append(run(**{"steps": steps, **spec}))
        log(f"copy_scaling {spec}: far {rows[-1]['far_bits_per_byte']:.2f} bits/byte")
    columns = ["capacity", "memory", "dconv", "depth", "steps", "far_bits_per_byte", "far_after_locating",
               "near_bits_per_byte",
               "fresh_bits_per_byte", "seconds"]
    print_table("copy task vs memory size (bits/byte, held out)", columns, [[r[c] for c in columns] for r in rows])
    suffix = "_quick" if args.quick else ""
    out = {"environment": environment(), "batch": BATCH, "segment": SEGMENT, "passage": PASSAGE, "runs": rows}
    write_json(result_path(f"lm_memory_copy_scaling{suffix}.json"), out)
    if pyplot() is not None:
        plot(rows, result_path(f"lm_memory_copy_scaling{suffix}.png"))
    return out


if __name__ == "__main__":
    main()
