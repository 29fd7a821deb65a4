"""Sharding checks for test_jax_sharding.py, run in a subprocess with 4 host devices (the flag must precede jax).

Prints one JSON object: for each check, what was compared or which collectives were found.
"""

import functools
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import kvmemory_jax as kvj  # noqa: E402
from kvmemory_jax.sharding import batch_sharding, per_shard, shard  # noqa: E402

COLLECTIVES = r"all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter|all_gather|all_to_all|" \
              r"collective_permute|all_reduce|reduce_scatter"
B, H, C, DK, DV, T = 8, 2, 16, 8, 4, 5


def collectives(jitted, *args) -> dict:
    """Collectives named in the lowered (StableHLO) and the compiled (partitioned HLO) text."""
    lowered = jitted.lower(*args)
    return {"lowered": sorted(set(re.findall(COLLECTIVES, lowered.as_text()))),
            "compiled": sorted(set(re.findall(COLLECTIVES, lowered.compile().as_text())))}


def same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def functional() -> dict:
    """add / search / clear per device vs on one device: equal results, rows stay put, no collective.

    jax.make_mesh's default (explicit) axes here; the training check below runs on an Auto mesh.
    """
    mesh = jax.make_mesh((4,), ("batch",))
    rng = np.random.default_rng(0)
    k1, v1, k2, v2 = (rng.standard_normal((B, T, H, d)).astype(np.float32) for d in (DK, DV, DK, DV))
    q = rng.standard_normal((B, 3, H, DK)).astype(np.float32)
    mask = np.arange(B) % 3 == 0
    ops = {"add": kvj.add, "clear": kvj.clear,
           "search": functools.partial(kvj.search, k=6),
           "search_tiled": functools.partial(kvj.search, k=6, block_bytes=4 * 2 * 3 * 4 * 8),
           "search_bins": functools.partial(kvj.search, k=6, method="bins", recall_target=0.5)}
    out = {}
    for metric in ("l2",):   # the metric changes nothing about sharding; l2 has the most state (squared norms)
        one = kvj.init(B, H, C, DK, DV, metric=metric)
        many = kvj.init(B, H, C, DK, DV, metric=metric, device=batch_sharding(mesh))
        sharded = {name: per_shard(op, mesh) for name, op in ops.items()}
        one = kvj.clear(kvj.add(kvj.add(one, k1, v1), k2, v2), mask)
        args = shard((k1, v1, k2, v2, q, mask), mesh)
        many = sharded["clear"](sharded["add"](sharded["add"](many, *args[:2]), *args[2:4]), args[5])
        one = kvj.add(one, k1, v1)
        many = sharded["add"](many, *args[:2])
        out[f"{metric}/state_equal"] = same(one, many)
        out[f"{metric}/state_sharded"] = all(x.sharding.spec[:1] == ("batch",) and len(x.sharding.device_set) == 4
                                             for x in jax.tree.leaves(many))
        for name in ("search", "search_tiled", "search_bins"):
            got, want = sharded[name](many, args[4]), ops[name](one, q)
            out[f"{metric}/{name}_equal"] = same(got, want)
            out[f"{metric}/{name}_out_sharded"] = got.ids.sharding.spec[:1] == ("batch",)
        for name in ops:
            call = (many, args[4]) if name.startswith("search") else (many, *args[:2]) if name == "add" \
                else (many, args[5])
            out[f"collectives/{name}"] = collectives(sharded[name], *call)
    return out


def train() -> dict:
    """The example's scanned train step, batch and memory sharded over 4 devices, vs one device."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_flax_memory as example

    tiny = ["--steps", "4", "--scan", "4", "--batch", "4", "--tokens", "8", "--vocab", "16", "--dim", "16",
            "--depth", "1", "--heads", "2", "--capacity", "12", "--k", "4", "--xl", "--mode", "scan"]
    many = example.train(example.parse(tiny + ["--devices", "4"]), log=lambda *_: None)
    one = example.train(example.parse(tiny), log=lambda *_: None)
    # one compiled step per segment: its carry must come out sharded as it went in (else the 2nd call fails)
    looped = example.train(example.parse(tiny + ["--devices", "4", "--mode", "loop"]),
                           log=lambda *_: None)
    (state,) = [m for m in jax.tree.leaves(many["carry"][1], is_leaf=lambda x: isinstance(x, kvj.MemoryState))
                if isinstance(m, kvj.MemoryState)]
    hlo = many["compiled"].as_text()
    memory_shapes = ("f32[1,2,12,8]", "f32[4,2,12,8]")     # a device's rows of the memory keys, and all of them
    memory_collectives = [line.strip()[:160] for line in hlo.splitlines()
                          if re.search(COLLECTIVES, line) and any(s in line for s in memory_shapes)]
    return {"train/losses_sharded": many["losses"], "train/losses_one_device": one["losses"],
            "train/losses_sharded_loop": looped["losses"],
            "train/memory_sharded": all(len(x.sharding.device_set) == 4 and x.sharding.spec[:1] == ("batch",)
                                        for x in jax.tree.leaves(state)),
            "train/collectives": sorted(set(re.findall(COLLECTIVES, hlo))),
            "train/memory_collectives": memory_collectives}


if __name__ == "__main__":
    assert len(jax.devices()) == 4, jax.devices()
    result = {"devices": len(jax.devices()), **functional(), **train()}
    print(json.dumps(result))
