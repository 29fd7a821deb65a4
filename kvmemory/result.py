"""What a search returns."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The top-k entries found for every query, best first.

    Arrays are of the backend's kind (numpy for host backends, torch tensors
    for ``backend="torch"``); B = batch, T = query tokens, H = heads.

    keys:   [B, T, H, k, key_dim]   stored keys of the neighbours (None if searched
            with ``with_entries=False``)
    values: [B, T, H, k, value_dim] stored values of the neighbours (likewise)
    scores: [B, T, H, k] float32, higher is closer: q.k (ip), cosine (cosine),
            -||q - k||^2 (l2); sorted best first
    ids:    [B, T, H, k] int64, the entry's position in its row's stream since
            that row's last clear (0, 1, 2, ...); -1 in masked slots
    mask:   [B, T, H, k] bool, False for slots beyond what the row holds
            (keys, values and scores are zero there)
    """

    keys: Any
    values: Any
    scores: Any
    ids: Any
    mask: Any

    def __iter__(self):
        return iter((self.keys, self.values, self.scores, self.ids, self.mask))
