"""A tiny pure-Python model of what a Memory must hold and return."""

import numpy as np


def true_scores(metric, q, keys):
    """Scores of one query q [D] against keys [n, D], in float64."""
    q = np.asarray(q, np.float64)
    keys = np.asarray(keys, np.float64).reshape(-1, q.shape[0])
    if metric == "ip":
        return keys @ q
    if metric == "l2":
        return -((keys - q) ** 2).sum(1)
    denom = np.linalg.norm(keys, axis=1) * np.linalg.norm(q)
    return np.divide(keys @ q, denom, out=np.zeros(len(keys)), where=denom > 0)


class ReferenceMemory:
    """Per row: a list of (id, keys [H, Dk], values [H, Dv]), the last ``capacity`` added since the last clear."""

    def __init__(self, batch_size, capacity, metric):
        self.capacity, self.metric = capacity, metric
        self.rows = [[] for _ in range(batch_size)]
        self.next_id = [0] * batch_size

    def add(self, keys, values):
        for b, row in enumerate(self.rows):
            for t in range(keys.shape[1]):
                row.append((self.next_id[b], keys[b, t].copy(), values[b, t].copy()))
                self.next_id[b] += 1
            del row[:-self.capacity]

    def clear(self, rows):
        for b in rows:
            self.rows[b] = []
            self.next_id[b] = 0

    def size(self):
        return np.array([len(r) for r in self.rows], np.int64)

    def live(self, b):
        """{id: (keys [H, Dk], values [H, Dv])} of row b."""
        return {i: (k, v) for i, k, v in self.rows[b]}

    def scores(self, b, h, q):
        """(ids [n], scores [n]) of every live entry of (b, h) for query q."""
        row = self.rows[b]
        if not row:
            return np.zeros(0, np.int64), np.zeros(0)
        ids = np.array([i for i, _, _ in row])
        return ids, true_scores(self.metric, q, np.stack([k[h] for _, k, _ in row]))
