"""Training-step time of the experiment's model with and without memory, per backend, memories full.

    python -m benchmarks.lm_memory.step_time            # default preset's model, sizes 4k, 16k, 64k
    python -m benchmarks.lm_memory.step_time --quick    # tiny, seconds

The paper's other headline: a step took 0.2 s without memory and 0.6 s with
65k tokens of memory on a TPU. Here: one training step (forward, backward,
AdamW) of the preset's model on the same batch, for no memory, XL only, and
kNN memory + XL at each size with each installed backend. Every memory is
first filled to capacity with unit-norm random keys (the model's keys are
unit vectors), so each search scans a full memory: the worst case, reached
once a document is longer than the memory. Steps are timed in interleaved
rounds (every configuration once per round, rotating order) after one
untimed round; reported: median seconds per step and the ratio to no memory.
Writes results/lm_memory_step.json (``--quick``: lm_memory_step_quick.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np
import torch

import kvmemory

from ..common import environment, log, print_table, result_path, summary, time_interleaved, write_json
from .corpus import code_documents
from .presets import PRESETS
from .stream import TrainStream
from .train import RunSpec, _optimizer, build_model, token_bits

BACKENDS = ("exact", "torch", "faiss", "scann", "hnsw")


def fill(memory: kvmemory.Memory, seed: int = 0, chunk: int = 4096) -> None:
    """Add ``capacity`` entries of unit-norm random keys and random values to every row."""
    rng = np.random.default_rng(seed)
    c = memory.config
    for start in range(0, c.capacity, chunk):
        n = min(chunk, c.capacity - start)
        keys = rng.standard_normal((c.batch_size, n, c.num_heads, c.key_dim)).astype(np.float32)
        keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
        values = rng.standard_normal((c.batch_size, n, c.num_heads, c.value_dim)).astype(np.float32)
        memory.add(keys, values)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_memory.step_time", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", default=None, help="comma-separated memory sizes (default 4096,16384,65536)")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "default"]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([256, 1024] if args.quick else [4096, 16384, 65536])
    available = kvmemory.available_backends()
    backends = [b for b in args.backends.split(",") if available.get(b)]
    torch.set_flush_denormal(True)

    docs = code_documents()[:64]
    batch = TrainStream(docs, preset.batch, preset.seg_len, seed=0).next()
    configs = {"none": RunSpec("t/none", "code"), "xl": RunSpec("t/xl", "code", xl=True)}
    configs.update({f"mem-{size}-{b}": RunSpec(f"t/mem-{size}-{b}", "code", memory=size, backend=b, xl=True)
                    for size in sizes for b in backends})
    steps = {}
    for name, spec in configs.items():
        model = build_model(dataclasses.replace(preset, device="cpu"), spec)
        if spec.memory:
            log(f"[step_time] filling {name}")
            fill(model.knn_attention.memory.memory)
        optimizer = _optimizer(model, preset)

        def step(model=model, optimizer=optimizer):
            bits, valid = token_bits(model, batch, "cpu")
            optimizer.zero_grad(set_to_none=True)
            (bits.sum() / valid.sum()).backward()
            optimizer.step()
        steps[name] = step
    times = time_interleaved(steps, repeats=args.repeats, warmup=1)
    base = statistics.median(times["none"])
    rows, out = [], {}
    for name, spec in configs.items():
        med = statistics.median(times[name])
        out[name] = {**summary(times[name]), "memory": spec.memory, "backend": spec.backend if spec.memory else None,
                     "xl": spec.xl, "ratio_to_none": med / base}
        rows.append([name, spec.memory or "-", spec.backend if spec.memory else "-", med, med / base])
    print_table(f"training step, {preset.name} preset's model (batch {preset.batch} x {preset.seg_len} bytes), memories full",
                ["configuration", "memory", "backend", "s/step (median)", "x no memory"], rows)
    payload = {"preset": dataclasses.asdict(preset), "environment": environment(), "steps": out,
               "torch_threads": torch.get_num_threads()}
    path = write_json(result_path(f"lm_memory_step{'_quick' if args.quick else ''}.json", args.out_dir), payload)
    log(f"[step_time] wrote {path}")
    return payload


if __name__ == "__main__":
    main()
