"""The shape of a memory: what every backend is built from."""

from __future__ import annotations

import dataclasses
import numbers

METRICS = ("ip", "cosine", "l2")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Sizes and metric of a memory.

    A memory holds ``batch_size`` independent rows; each row has ``num_heads``
    heads, and each (row, head) keeps up to ``capacity`` entries of a
    ``key_dim`` key and a ``value_dim`` value.
    """

    key_dim: int
    value_dim: int
    capacity: int
    num_heads: int = 1
    batch_size: int = 1
    metric: str = "ip"

    def __post_init__(self):
        for name in ("key_dim", "value_dim", "capacity", "num_heads", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            object.__setattr__(self, name, int(value))
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
