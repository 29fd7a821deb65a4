"""``python -m benchmarks`` / ``kvmemory-bench``: the default, small workload of the main benchmarks.

    python -m benchmarks                         # exact_speed, ann sweep (capacity 65,536), step --quick
    python -m benchmarks --quick                 # smoke run of each: exact_speed --small, ann --small, step --quick
    python -m benchmarks step ann                # only these, in this order
    python -m benchmarks --skip ann              # all but these
    python -m benchmarks --ann-args "--backends exact,faiss" --step-args "--capacities 8192"
    python -m benchmarks --list                  # what each one is

Benchmarks (each also runs alone as ``python -m benchmarks.<name>``, with its own --help):
  exact_speed  exact search speed vs numpy / faiss / ScaNN / torch brute force, add cost, bytes held
  ann          recall vs queries/s of every installed backend (sweep mode)
  step         the Memorizing-Transformer step: search all (row, head) then add, per backend;
               here its small version (--quick) unless --step-args says otherwise

``--<name>-args "..."`` replaces that benchmark's arguments (split like a
shell line) for this run, ``--quick`` included. Each benchmark writes JSON
(and PNG) to benchmarks/results/ and prints its table. The step benchmark is
imported lazily: a checkout without benchmarks/step.py skips it with a note.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

#: name -> (arguments of the default run, arguments of --quick)
BENCHMARKS = {
    "exact_speed": ([], ["--small"]),
    "ann": ([], ["--small"]),
    "step": (["--quick"], ["--quick"]),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("names", nargs="*", metavar="BENCHMARK",
                   help=f"benchmarks to run, in order (default: all of {', '.join(BENCHMARKS)})")
    p.add_argument("--skip", default="", help="comma list of benchmarks to leave out")
    p.add_argument("--quick", action="store_true", help="smoke run of each benchmark (seconds to a minute each)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and the arguments they would get, then exit")
    for name in BENCHMARKS:
        p.add_argument(f"--{name.replace('_', '-')}-args", dest=f"{name}_args", default=None, metavar="ARGS",
                       help=f"arguments for {name} (one string, split like a shell line)")
    return p


def plan(argv=None) -> list[tuple[str, list[str]]]:
    """[(benchmark, its argv)] that ``main(argv)`` runs, in order; errors name the bad argument."""
    p = parser()
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    skip = [n.strip() for n in args.skip.split(",") if n.strip()]
    unknown += [n for n in skip if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(map(repr, unknown))}; expected any of {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    runs = []
    for name in names:
        if name in skip:
            continue
        given = getattr(args, f"{name}_args")
        default, quick = BENCHMARKS[name]
        runs.append((name, shlex.split(given) if given is not None else list(quick if args.quick else default)))
    if args.list:
        for name, bench_argv in runs:
            print(f"{name:12s} python -m benchmarks.{name} {shlex.join(bench_argv)}".rstrip())
        raise SystemExit(0)
    return runs


def load(name: str):
    """The benchmark module, or None (with a note on stderr) if this checkout does not have it."""
    try:
        return importlib.import_module(f"{__package__ or 'benchmarks'}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__ or 'benchmarks'}.{name}":
            raise
        print(f"[benchmarks] {name}: skipped, benchmarks/{name}.py is not in this checkout", file=sys.stderr)
        return None


def main(argv=None) -> int:
    runs = plan(argv)
    for name, bench_argv in runs:
        module = load(name)
        if module is None:
            continue
        print(f"[benchmarks] {name} {shlex.join(bench_argv)}".rstrip(), file=sys.stderr, flush=True)
        module.main(bench_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
