"""A progress bar per run (rich), or a line every 10% where rich is missing or output is not a terminal."""

from __future__ import annotations

import sys


class RunProgress:
    """Steps done of a run, with its latest training bits/byte and step time."""

    def __init__(self, name: str, total: int, done: int = 0, enabled: bool = True):
        self.name, self.total, self.enabled = name, total, enabled
        self._bar = self._task = None
        self._next_line = done + max(1, total // 10)
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:
            return
        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                             transient=True)
        self._bar.start()
        self._task = self._bar.add_task(name, total=total, completed=done, info="")

    def update(self, done: int, bits: float, step_s: float) -> None:
        if not self.enabled:
            return
        info = f"{bits:.3f} bits/byte  {step_s:.2f} s/step"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=info)
        elif done >= self._next_line or done == self.total:
            print(f"[{self.name}] step {done}/{self.total}  {info}", file=sys.stderr, flush=True)
            self._next_line = done + max(1, self.total // 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
