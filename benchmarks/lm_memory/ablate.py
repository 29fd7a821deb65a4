"""Does a trained model use its memory? Held-out bits/byte of each memory run with the memory kept empty.

    python -m benchmarks.lm_memory.ablate                       # the default preset's finished runs
    python -m benchmarks.lm_memory.ablate --set knn_layer=0 --set memory_sizes=4096,65536

Reads the finished runs of ``python -m benchmarks.lm_memory`` (same preset and ``--set`` overrides, same
work dir) and evaluates every memory run of the code corpus again with nothing written to its memory:
each query then finds no neighbours and its layer takes the local attention alone (the gate counts as 0,
see ``KNNAttention``), so the difference is what retrieval contributes to the trained model, overall and
by position in the document (cached per run next to its evaluation). Writes results/lm_memory_ablation[_custom].json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from kvmemory.atomic import atomic_open
from kvmemory_torch import frozen_memories

from ..common import environment, log, print_table, result_path, write_json
from .cli import corpus_split, default_work_dir, with_overrides
from .evaluate import evaluate
from .presets import PRESETS
from .train import RunSpec, build_model, final_weights, run_dir


def finished_memory_runs(work_dir: str, corpus: str) -> list:
    """(spec, cached evaluation) of every run of ``corpus`` with a memory whose evaluation is cached, by name."""
    found = []
    root = os.path.join(work_dir, corpus)
    for label in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        cached = os.path.join(root, label, "eval.json")
        if not os.path.exists(cached):
            continue
        with open(cached) as f:
            saved = json.load(f)
        spec = RunSpec(**saved["identity"]["spec"])
        if spec.memory is not None:
            found.append((spec, saved))
    return found


def memory_off(preset, spec: RunSpec, saved: dict, work_dir: str, eval_docs) -> dict:
    """The run's held-out evaluation with its memory kept empty, cached next to its evaluation."""
    cached = os.path.join(run_dir(work_dir, spec), "memory_off.json")
    if os.path.exists(cached):
        with open(cached) as f:
            previous = json.load(f)
        if previous["identity"] == saved["identity"]:
            return previous
    model = build_model(preset, spec)
    model.load_state_dict(final_weights(work_dir, spec.name))
    model.eval()
    log(f"[ablate] {spec.name}: evaluating with its memory kept empty")
    with frozen_memories(model):
        off = evaluate(model, eval_docs, preset.batch, preset.seg_len, preset.device)
    result = {"identity": saved["identity"], "eval": off,
              "gates": torch.sigmoid(model.knn_attention.gate_bias).tolist()}
    with atomic_open(cached, "w") as f:
        json.dump(result, f)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_memory.ablate", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="as for benchmarks.lm_memory")
    p.add_argument("--work-dir", help="the experiment's work dir (default: its cache folder)")
    p.add_argument("--out-dir", help="where the JSON goes (default benchmarks/results)")
    args = p.parse_args(argv)
    preset = with_overrides(PRESETS[args.preset], args.set)
    work_dir = args.work_dir or default_work_dir(preset)
    runs = finished_memory_runs(work_dir, "code")
    if not runs:
        raise SystemExit(f"no finished memory runs in {work_dir}: run python -m benchmarks.lm_memory first")
    torch.set_flush_denormal(True)
    *_, eval_docs = corpus_split(preset, "code")
    rows = []
    for spec, saved in runs:
        off = memory_off(preset, spec, saved, work_dir, eval_docs)
        rows.append({"name": spec.name, "memory": spec.memory, "backend": spec.backend, "xl": spec.xl,
                     "gates": off["gates"], "bits_per_byte": saved["run"]["eval"]["bits_per_byte"],
                     "memory_off": off["eval"]["bits_per_byte"], "by_position": saved["run"]["eval"]["by_position"],
                     "by_position_off": off["eval"]["by_position"]})
    print_table("lm_memory: held-out bits/byte with the memory and with it kept empty",
                ["run", "bits/byte", "memory empty", "retrieval's gain", "gates"],
                [[r["name"], r["bits_per_byte"], r["memory_off"], r["memory_off"] - r["bits_per_byte"],
                  " ".join(f"{g:.2f}" for g in r["gates"])] for r in rows])
    out = {"preset": preset.key(), "environment": environment(), "runs": rows}
    log(f"[ablate] wrote {write_json(result_path(f'lm_memory_ablation{preset.results_suffix}.json', args.out_dir), out)}")
    return out


if __name__ == "__main__":
    main()
