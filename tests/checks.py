"""Assertions every backend's search results must satisfy, against the reference model."""

import json
import zipfile

import numpy as np

from reference import true_scores

# backends whose results must equal the exact top-k (ties aside)
EXACT_BACKENDS = {"exact", "torch", "jax", "test-segmented"}
# ids are int64 but for jax, whose ids are int32 (stream positions modulo 2**31) so that x64 can stay off
ID_DTYPES = {"jax": np.int32}


def to_numpy(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
    return np.asarray(x)


def check_result(res, ref, queries, k, exact, atol=1e-4, id_dtype=np.int64):
    """Check a SearchResult against ReferenceMemory ``ref`` for queries [B, T, H, D]."""
    keys, values, scores, ids, mask = (to_numpy(a) for a in res)
    B, T, H, D = queries.shape
    assert ids.shape == (B, T, H, k) and ids.dtype == id_dtype
    assert mask.shape == (B, T, H, k) and mask.dtype == bool
    assert scores.shape == (B, T, H, k) and scores.dtype == np.float32
    assert keys.shape == (B, T, H, k, D)
    assert values.shape[:4] == (B, T, H, k)
    sizes = ref.size()
    for b in range(B):
        live = ref.live(b)
        for t in range(T):
            for h in range(H):
                m, i = mask[b, t, h], ids[b, t, h]
                n = int(m.sum())
                # valid slots first, then masked slots with ids -1 and zeros
                assert m[:n].all() and not m[n:].any(), m
                assert (i[n:] == -1).all() and (scores[b, t, h, n:] == 0).all()
                assert not keys[b, t, h, n:].any() and not values[b, t, h, n:].any()
                assert n <= min(k, sizes[b])
                got = i[:n]
                assert len(set(got.tolist())) == n, f"duplicate ids {got}"
                for j, entry_id in enumerate(got):
                    assert entry_id in live, f"row {b} returned id {entry_id}, not live ({sorted(live)})"
                    k_ref, v_ref = live[entry_id]
                    np.testing.assert_allclose(keys[b, t, h, j], k_ref[h], rtol=1e-6, atol=1e-6)
                    np.testing.assert_allclose(values[b, t, h, j], v_ref[h], rtol=1e-6, atol=1e-6)
                got_scores = scores[b, t, h, :n].astype(np.float64)
                expect = true_scores(ref.metric, queries[b, t, h], keys[b, t, h, :n]) if n else got_scores
                np.testing.assert_allclose(got_scores, expect, rtol=1e-4, atol=atol)
                assert (np.diff(got_scores) <= atol).all(), "scores not sorted best first"
                if exact:
                    assert n == min(k, sizes[b])
                    _, all_scores = ref.scores(b, h, queries[b, t, h])
                    best = np.sort(all_scores)[::-1][:n]
                    np.testing.assert_allclose(got_scores, best, rtol=1e-4, atol=atol)


def assert_matches_exact(exact, res_exact, got, tol=1e-5, id_dtype=np.int64):
    """``got`` (keys, values, scores, ids, mask as numpy) is the exact backend's top-k: masks, scores,
    ids (ties aside; ``id_dtype`` int32: the exact ids modulo 2**31), and each id's stored entry from ``exact``'s ring."""
    keys, values, scores, ids, mask = got
    assert scores.dtype == np.float32 and ids.dtype == id_dtype and mask.dtype == bool
    if id_dtype == np.int32:  # each id modulo 2**31 as the one live stream position it stands for
        last = exact.backend.counts()[:, None, None, None] - 1
        ids = np.where(mask, last - ((last - ids.astype(np.int64)) % 2**31), -1)
    np.testing.assert_array_equal(mask, res_exact.mask)
    np.testing.assert_allclose(scores, res_exact.scores, rtol=tol, atol=tol)
    differ = ids != res_exact.ids
    if differ.any():  # only where the exact list holds another entry with (nearly) the same score
        s = res_exact.scores
        tied = (np.abs(s[..., :, None] - s[..., None, :]) <= tol).sum(-1) > 1
        assert tied[differ].all(), f"ids differ without a tie at {np.argwhere(differ & ~tied)[:5]}"
    ring = exact.backend.ring
    b = np.arange(ids.shape[0])[:, None, None, None]
    h = np.arange(ids.shape[2])[None, None, :, None]
    slot = np.where(mask, ids % exact.capacity, 0)
    np.testing.assert_array_equal(keys, np.where(mask[..., None], ring.keys[b, h, slot], 0))
    np.testing.assert_array_equal(values, np.where(mask[..., None], ring.values[b, h, slot], 0))
    assert not keys[~mask].any() and not values[~mask].any() and not scores[~mask].any()
    assert (ids[~mask] == -1).all()


def replay_against_exact(exact, mem, steps, make_entries, make_queries, to_backend, check):
    """Run steps [("add", T) | ("clear", rows) | ("search", k)] on ``exact`` and ``mem`` alike.

    Entries and queries are numpy (from ``make_entries(T)`` / ``make_queries()``), passed to ``mem``
    through ``to_backend``; every search calls ``check(res_exact, res_mem)``; sizes must agree throughout.
    """
    for op, arg in steps:
        if op == "add":
            k, v = make_entries(arg)
            exact.add(k, v)
            mem.add(to_backend(k), to_backend(v))
        elif op == "clear":
            exact.clear(arg)
            mem.clear(arg)
        else:
            q = make_queries()
            check(exact.search(q, arg), mem.search(to_backend(q), arg))
        np.testing.assert_array_equal(to_numpy(mem.size), exact.size)


def saved_header(path) -> dict:
    """The JSON header of a file written by ``Memory.save``."""
    with zipfile.ZipFile(path) as z:
        return json.loads(np.load(z.open("__kvmemory__.npy")).tobytes())
