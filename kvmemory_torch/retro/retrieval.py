"""Neighbours for RetroTransformer from a kvmemory.retro database: precomputed (training) or on the fly (generation)."""

from __future__ import annotations

import numpy as np
import torch


def _as_tensors(tokens: np.ndarray, mask: np.ndarray, device) -> tuple:
    return (torch.as_tensor(np.asarray(tokens, np.int64), device=device),
            torch.as_tensor(np.asarray(mask, bool), device=device))


def precomputed_neighbours(db, neighbour_ids, device=None) -> tuple:
    """Tokens and mask of precomputed neighbours, as the model reads them.

    neighbour_ids: [..., k] global chunk ids (-1: none), e.g. ``pre.ids[chunk_ids]``
    for the database chunks [B, L] a training sequence is made of, with ``pre``
    from :func:`kvmemory.retro.precompute_neighbours` (own document excluded).
    Returns (neighbours [..., k, 2 chunk_len] int64, mask bool) on ``device``.
    """
    tokens, mask = db.chunk_tokens(np.asarray(neighbour_ids, np.int64), continuation=True)
    return _as_tensors(tokens, mask, device)


class DatabaseRetriever:
    """On-the-fly retrieval for a growing sequence: the k neighbours (with continuations) of every complete chunk.

    ``retriever(tokens)`` with tokens [B, n] returns (neighbours [B, n // m, k,
    2 m] int64, mask bool) for the model's ``forward``; each chunk is searched
    once (results cached by row, chunk index and the chunk's tokens), so a
    generation loop calling it every step searches once per new chunk, as
    RETRO's sampling does.

    Args:
        db: a :class:`kvmemory.retro.RetroDatabase` with the bytes tokenizer (or
            another whose ``_decode`` works on token ids).
        k: neighbours per chunk.
        exclude_doc_ids: [B] or [B, j] document ids each row may not retrieve from (-1: none).
    """

    def __init__(self, db, k: int = 2, exclude_doc_ids=None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.db, self.k = db, k
        self.chunk_len = int(db.chunk_len)
        self.exclude = None if exclude_doc_ids is None else np.asarray(exclude_doc_ids, np.int64)
        self._cache: dict = {}
        self.searches = 0

    def __call__(self, tokens: torch.Tensor) -> tuple:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a tensor [batch, tokens], got {tuple(getattr(tokens, 'shape', ()))}")
        B, n = tokens.shape
        m, L = self.chunk_len, n // self.chunk_len
        if self.exclude is not None and self.exclude.shape[0] != B:
            raise ValueError(f"exclude_doc_ids has {self.exclude.shape[0]} rows, tokens {B}")
        host = tokens.detach().cpu().numpy()
        out = np.full((B, L, self.k, 2 * m), self.db.pad_id, np.int64)
        mask = np.zeros((B, L, self.k, 2 * m), bool)
        todo = []
        for b in range(B):
            for u in range(L):
                key = (b, u, host[b, u * m:(u + 1) * m].tobytes())
                if key not in self._cache:
                    todo.append(key)
        if todo:
            queries = [np.frombuffer(key[2], host.dtype) for key in todo]
            exclude = None if self.exclude is None else self.exclude[[key[0] for key in todo]]
            nb = self.db.neighbours(queries, self.k, exclude)
            self.searches += len(todo)
            for i, key in enumerate(todo):
                self._cache[key] = (nb.tokens[i], nb.token_mask[i])
        for b in range(B):
            for u in range(L):
                out[b, u], mask[b, u] = self._cache[(b, u, host[b, u * m:(u + 1) * m].tobytes())]
        return _as_tensors(out, mask, tokens.device)

    def reset(self) -> None:
        """Forget the cached searches."""
        self._cache.clear()


@torch.no_grad()
def generate(model, prompt: torch.Tensor, steps: int, retriever=None, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``prompt`` [B, n0] by ``steps`` tokens; returns [B, n0 + steps].

    The whole sequence is run again at every step (a reference, not a fast
    sampler). With retrieval the ``retriever`` (e.g. :class:`DatabaseRetriever`)
    gives the neighbours of every complete chunk, searched as each chunk
    completes. temperature 0: greedy; otherwise sampled.
    """
    if model.has_retrieval and retriever is None:
        raise ValueError("this model reads neighbours: pass a retriever (e.g. DatabaseRetriever(db))")
    tokens = prompt
    for _ in range(steps):
        neighbours, mask = retriever(tokens) if model.has_retrieval else (None, None)
        logits = model(tokens, neighbours, mask)[:, -1].float()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
    return tokens
