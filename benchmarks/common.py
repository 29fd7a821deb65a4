"""Shared benchmark helpers: timing, environment record, JSON/PNG output, tables, progress."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable

import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# -- timing ---------------------------------------------------------------------------


def time_call(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_interleaved(fns: dict, repeats: int = 5, warmup: int = 1,
                     setup: dict | None = None) -> dict:
    """Seconds per call of each of ``fns`` {name: fn}, measured in interleaved rounds.

    Each round calls every function once, in an order rotated from round to
    round, so a burst of machine noise hits all of them alike. ``setup``
    {name: fn} is called, untimed, right before each timed call (e.g. to
    build a fresh empty memory). Returns {name: [seconds, ...]} (warm-up
    rounds excluded); summarise with :func:`summary`.
    """
    names = list(fns)
    times = {n: [] for n in names}
    setup = setup or {}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if name in setup:
                setup[name]()
            t = time_call(fns[name])
            if r >= warmup:
                times[name].append(t)
    return times


def summary(seconds: list) -> dict:
    """Median / min / max / count of a list of seconds."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "repeats": len(seconds)}


# -- environment ------------------------------------------------------------------------


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What the numbers were measured on."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(RESULTS_DIR), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    libs = {d: _version(d) for d in ("numpy", "faiss-cpu", "scann", "hnswlib", "torch")}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "git_commit": commit, "libraries": {k: v for k, v in libs.items() if v},
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


# -- output -------------------------------------------------------------------------------


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def write_json(path: str, payload: dict) -> str:
    """Write ``payload`` (numpy values allowed) as indented JSON; creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2)
        f.write("\n")
    return path


def result_path(name: str, out_dir: str | None = None) -> str:
    return os.path.join(out_dir or RESULTS_DIR, name)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# -- console ---------------------------------------------------------------------------------


def print_table(title: str, columns: list, rows: list) -> None:
    """A table on the console: rich if installed, plain text otherwise."""
    rows = [[_fmt(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)), *(len(r[i]) for r in rows)) if rows else len(str(c))
                  for i, c in enumerate(columns)]
        print(f"\n{title}")
        print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        return
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(str(c), justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v == 0 or not np.isfinite(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def log(msg: str) -> None:
    try:
        from rich.console import Console
        Console(stderr=True).print(msg, highlight=False)
    except ImportError:
        print(msg, file=sys.stderr)


def progress(iterable: Iterable, description: str, total: int | None = None):
    """Iterate with a progress bar (rich) on stderr; plain iteration if rich is missing."""
    try:
        from rich.progress import Progress
    except ImportError:
        yield from iterable
        return
    from rich.console import Console
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total if total is not None else _len(iterable))
        for item in iterable:
            yield item
            bar.advance(task)


def _len(x):
    try:
        return len(x)
    except TypeError:
        return None


def ratio(a, b):
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b
