"""Progress bars for long runs: tqdm when it is installed and wanted, else nothing."""

from __future__ import annotations

import importlib.util


def progress(iterable, total=None, desc: str = "", enabled: bool = True, unit: str = "it"):
    """``iterable`` wrapped in a tqdm bar (on stderr) when enabled and tqdm is installed."""
    if not enabled or importlib.util.find_spec("tqdm") is None:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


class Bar:
    """A manual bar (``update(n)``, ``close()``) that does nothing when disabled or without tqdm."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, unit: str = "it"):
        self.bar = None
        if enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
