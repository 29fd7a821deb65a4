"""``python -m benchmarks.retro_lm``: train the rows, evaluate, report (table, JSON, PNG)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import tempfile
import time

import numpy as np
import torch

from kvmemory import retro

from ..common import environment, log, print_table, pyplot, result_path, write_json
from ..lm_memory.corpus import documents, fingerprint, split, take_bytes
from . import data, run
from .presets import PRESETS, Preset


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.retro_lm", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI smoke test, about a minute")
    size.add_argument("--gpu", action="store_true", help="the GPU preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a preset field (e.g. --set steps=100 --set embedder=ngram-hash)")
    p.add_argument("--work-dir", help="databases and checkpoints (default: a folder in the temp dir)")
    p.add_argument("--out-dir", help="where the JSON and PNG go (default: benchmarks/results)")
    return p.parse_args(argv)


def with_overrides(preset: Preset, assignments: list) -> Preset:
    fields = {f.name: f for f in dataclasses.fields(Preset)}
    changes = {}
    for a in assignments:
        name, sep, value = a.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set needs FIELD=VALUE with a Preset field, got {a!r}")
        current = getattr(preset, name)
        if isinstance(current, bool):
            changes[name] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, int) or (current is None and value.isdigit()):
            changes[name] = int(value)
        elif isinstance(current, float):
            changes[name] = float(value)
        elif value.lower() == "none":
            changes[name] = None
        else:
            changes[name] = value
    return dataclasses.replace(preset, **changes, name=preset.name + ("+set" if changes else ""))


def leakage(preset: Preset, ev) -> tuple:
    """(overlap [W, L], near-duplicate flags [W, L], summary dict)."""
    overlap = data.chunk_overlap(preset, ev)
    reads = np.zeros_like(overlap, bool)
    reads[:, 1:] = True                              # chunk 0 of a window reads nothing
    dup = overlap >= preset.near_dup_fraction
    return overlap, dup, {
        "ngram": preset.near_dup_ngram, "threshold": preset.near_dup_fraction,
        "chunks_reading_neighbours": int(reads.sum()),
        "near_duplicate_fraction": float(dup[reads].mean()) if reads.any() else None,
        "mean_overlap": float(overlap[reads].mean()) if reads.any() else None,
        "fraction_any_overlap": float((overlap[reads] > 0).mean()) if reads.any() else None,
    }


def train_windows(preset: Preset, db, docs, pre, limit: int = 400) -> data.EvalSet:
    """Up to ``limit`` training windows with their precomputed neighbours (own document excluded): what the
    model reads while it trains, for the leakage of training chunks."""
    m, n, L = preset.chunk_len, preset.seq_len, preset.seq_chunks
    rows, ids = [], []
    for i, d in enumerate(docs):
        chunks = db.doc_chunks(i)
        for s in range(0, len(d) - n, n):
            rows.append(d.data[s:s + n + 1])
            ids.append(np.asarray(pre.ids)[chunks[s // m:s // m + L]])
    pick = np.random.default_rng(preset.seed).permutation(len(rows))[:limit]
    w = np.stack([rows[i] for i in pick])
    return data.EvalSet(w[:, :-1], w[:, 1:], np.stack([ids[i] for i in pick]), db)


def main(argv=None) -> dict:
    args = parse(argv)
    preset = PRESETS["quick" if args.quick else "gpu" if args.gpu else "default"]
    preset = with_overrides(preset, args.set)
    if preset.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("the gpu preset needs CUDA")
    work = args.work_dir or os.path.join(tempfile.gettempdir(), f"kvmemory-retro-lm-{preset.name}")
    os.makedirs(work, exist_ok=True)
    t_start = time.perf_counter()

    # data: the memory experiment's split; the database holds the training files
    train_docs, held = split(documents("code", preset.min_doc_bytes), preset.held_out_fraction, preset.seed)
    train_docs = take_bytes(train_docs, preset.db_bytes, preset.train_max_doc_bytes)
    eval_docs = take_bytes(held, preset.eval_bytes, preset.eval_max_doc_bytes)
    path = data.store_path(work, preset, train_docs)
    log(f"database: {len(train_docs)} files, {sum(map(len, train_docs)):,} bytes, embedder {preset.embedder}")
    db, build_s = data.build_database(preset, train_docs, path)
    t = time.perf_counter()
    pre = retro.precompute_neighbours(db, "train", k=preset.k)
    precompute_s = time.perf_counter() - t
    t = time.perf_counter()
    ev = data.eval_set(preset, db, eval_docs)
    eval_search_s = time.perf_counter() - t
    overlap, dup, leak = leakage(preset, ev)
    _, _, leak_train = leakage(preset, train_windows(preset, db, train_docs, pre))
    keep = ~dup
    log(f"database {db.num_chunks} chunks (built in {build_s:.0f} s); {len(ev)} evaluation windows; "
        f"near-duplicate chunks {leak['near_duplicate_fraction']:.3f}")

    # knowledge update: the held-out files' first halves join the database
    halves = data.first_halves(preset, eval_docs)
    db_up, update_s = data.build_database(preset, train_docs, path, append_docs=halves)
    second = data.eval_set(preset, db, eval_docs, start_fraction=0.5)
    second_up = data.eval_set(preset, db_up, eval_docs, start_fraction=0.5)
    _, dup_up, leak_up = leakage(preset, second_up)
    _, _, leak_second = leakage(preset, second)

    batches = lambda seed: data.TrainBatches(preset, db, train_docs, pre, seed)   # noqa: E731
    ckpt = lambda name: os.path.join(work, preset.name, f"{name}.pt")           # noqa: E731
    models, summaries = {}, {}
    models["none"] = run.build_model(preset, retrieval=False)
    summaries["none"] = run.train(preset, models["none"], batches(1), preset.steps, name="none", ckpt=ckpt("none"))
    models["retro"] = run.build_model(preset, retrieval=True)
    summaries["retro"] = run.train(preset, models["retro"], batches(1), preset.steps, name="retro",
                                   ckpt=ckpt("retro"))
    models["none+ft"] = copy.deepcopy(models["none"])
    summaries["none+ft"] = run.train(preset, models["none+ft"], batches(2), preset.retrofit_steps, name="none+ft",
                                     ckpt=ckpt("none+ft"))
    models["retrofit"] = copy.deepcopy(models["none"])
    new = run.retrofit(preset, models["retrofit"])
    summaries["retrofit"] = run.train(preset, models["retrofit"], batches(2), preset.retrofit_steps, new,
                                      name="retrofit", ckpt=ckpt("retrofit"))

    rows = []
    for name, model in models.items():
        bits = run.chunk_bits(preset, model, ev)
        s2 = run.chunk_bits(preset, model, second)
        s2_up = run.chunk_bits(preset, model, second_up)
        row = {"name": name, **summaries[name],
               "total_steps": preset.steps + (preset.retrofit_steps if name in ("none+ft", "retrofit") else 0),
               "bits_per_byte": run.bits_per_byte(preset, bits),
               "bits_per_byte_no_near_dups": run.bits_per_byte(preset, bits, keep),
               "bits_per_byte_near_dups_only": run.bits_per_byte(preset, bits, dup),
               "bits_per_byte_chunks_1_on": run.bits_per_byte(preset, bits[:, 1:]),
               "second_half": run.bits_per_byte(preset, s2),
               "second_half_updated_db": run.bits_per_byte(preset, s2_up),
               "second_half_updated_db_no_near_dups": run.bits_per_byte(preset, s2_up, ~dup_up),
               "second_half_updated_db_near_dups_only": run.bits_per_byte(preset, s2_up, dup_up),
               "second_half_near_dups_of_updated_db": run.bits_per_byte(preset, s2, dup_up)}
        if model.has_retrieval:
            off = run.chunk_bits(preset, model, ev, retrieval=False)
            row["bits_per_byte_retrieval_off"] = run.bits_per_byte(preset, off)
            row["bits_per_byte_retrieval_off_chunks_1_on"] = run.bits_per_byte(preset, off[:, 1:])
            row["bits_per_byte_retrieval_off_near_dups_only"] = run.bits_per_byte(preset, off, dup)
        rows.append(row)

    results = {
        "preset": preset.key(), "environment": environment(), "wall_s": time.perf_counter() - t_start,
        "data": {"train_files": len(train_docs), "train_bytes": sum(map(len, train_docs)),
                 "train_fingerprint": fingerprint(train_docs), "eval_files": len(eval_docs),
                 "eval_bytes": sum(map(len, eval_docs)), "eval_fingerprint": fingerprint(eval_docs),
                 "eval_windows": len(ev), "second_half_windows": len(second)},
        "database": {"chunks": db.num_chunks, "embedder": preset.embedder, "build_s": build_s,
                     "chunks_per_s": db.num_chunks / build_s if build_s > 1 else None,
                     "precompute_s": precompute_s, "eval_search_s": eval_search_s,
                     "updated_chunks": db_up.num_chunks, "update_build_s": update_s},
        "leakage": leak, "leakage_train": leak_train, "leakage_second_half": leak_second, "leakage_second_half_updated": leak_up,
        "rows": rows,
    }
    report(results, preset, args.out_dir)
    return results


def report(results: dict, preset: Preset, out_dir: str | None = None) -> list:
    rows = results["rows"]
    cols = ["row", "steps (total)", "trained params", "bits/byte", "no near-dups", "near-dups only",
            "near-dups, retrieval off", "chunks 1+", "retrieval off (1+)", "2nd halves", "2nd halves, db + 1st halves"]
    print_table(f"retro_lm ({preset.name}): held-out bits/byte, {preset.embedder} database of "
                f"{results['database']['chunks']:,} chunks of {preset.chunk_len} bytes",
                cols, [[r["name"], f"{r['steps']} ({r['total_steps']})", r["trainable_params"], r["bits_per_byte"],
                        r["bits_per_byte_no_near_dups"], r["bits_per_byte_near_dups_only"],
                        r.get("bits_per_byte_retrieval_off_near_dups_only"), r["bits_per_byte_chunks_1_on"],
                        r.get("bits_per_byte_retrieval_off_chunks_1_on"), r["second_half"],
                        r["second_half_updated_db"]] for r in rows])
    lt = results["leakage_train"]
    lk, ls, lu = results["leakage"], results["leakage_second_half"], results["leakage_second_half_updated"]
    print_table("leakage (share of a chunk's byte 8-grams in the neighbours it reads)",
                ["evaluation", "chunks", f"near-dup (>= {lk['threshold']})", "mean overlap", "any overlap"],
                [["training windows (own file excluded)", lt["chunks_reading_neighbours"],
                  lt["near_duplicate_fraction"], lt["mean_overlap"], lt["fraction_any_overlap"]],
                 ["held-out, training db", lk["chunks_reading_neighbours"], lk["near_duplicate_fraction"],
                  lk["mean_overlap"], lk["fraction_any_overlap"]],
                 ["2nd halves, training db", ls["chunks_reading_neighbours"], ls["near_duplicate_fraction"],
                  ls["mean_overlap"], ls["fraction_any_overlap"]],
                 ["2nd halves, db + 1st halves", lu["chunks_reading_neighbours"], lu["near_duplicate_fraction"],
                  lu["mean_overlap"], lu["fraction_any_overlap"]]])
    suffix = "" if preset.name == "default" else "_" + preset.name.replace("+", "_")
    paths = [write_json(result_path(f"retro_lm{suffix}.json", out_dir), results)]
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        names = [r["name"] for r in rows]
        x = np.arange(len(rows))
        for off, key, label in ((-0.2, "bits_per_byte", "all chunks"),
                                (0.2, "bits_per_byte_no_near_dups", "near-duplicate chunks excluded")):
            axes[0].bar(x + off, [r[key] for r in rows], 0.4, label=label)
        axes[0].set_xticks(x, names)
        axes[0].set_ylabel("held-out bits/byte")
        axes[0].set_title("neighbours from the training files")
        axes[0].legend(fontsize=8)
        for off, key, label in ((-0.2, "second_half", "training db"),
                                (0.2, "second_half_updated_db", "db + held-out first halves")):
            axes[1].bar(x + off, [r[key] for r in rows], 0.4, label=label)
        axes[1].set_xticks(x, names)
        axes[1].set_title("knowledge update: bits/byte on second halves")
        axes[1].legend(fontsize=8)
        for ax in axes:
            lo = min(min(r[k] for r in rows) for k in ("bits_per_byte", "second_half_updated_db"))
            ax.set_ylim(max(0, lo - 0.3), None)
        fig.suptitle(f"retro_lm ({preset.name}): {results['database']['chunks']:,} chunks, {preset.embedder}")
        fig.tight_layout()
        png = result_path(f"retro_lm{suffix}.png", out_dir)
        fig.savefig(png, dpi=110)
        plt.close(fig)
        paths.append(png)
    log("wrote " + ", ".join(paths))
    return paths
