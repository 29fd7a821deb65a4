"""RetroTransformer: a small reference RETRO decoder, trained with retrieval or retrofitted with it."""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import Block, init_weights
from ..local_attention import LocalAttention
from .chunked_attention import ChunkedCrossAttention
from .encoder import NeighbourEncoder


def default_retro_layers(depth: int) -> tuple:
    """The paper's placement, every third block from the 9th (0-based 8, 11, ...); the middle block when depth <= 8."""
    return tuple(range(8, depth, 3)) if depth > 8 else (depth // 2,)


class RetroTransformer(nn.Module):
    """Token embedding, ``depth`` pre-norm decoder blocks, final norm and output head, plus RETRO retrieval.

    Every block is causal self-attention (:class:`kvmemory_torch.LocalAttention`,
    rotary positions, normalised q/k) and an MLP, as in
    :class:`kvmemory_torch.MemorizingTransformer`. In the RETRO blocks
    (``retro_layers``) a :class:`ChunkedCrossAttention` sits between the two:
    the decoder reads the encoded neighbours of its completed chunks. The
    neighbours are encoded once per forward by the :class:`NeighbourEncoder`,
    conditioned on the decoder's states at the first RETRO block (after its
    self-attention), token embeddings shared with the decoder.

    ``retrieval=False`` builds the same decoder without CCA or encoder (a
    plain language model); :meth:`add_retrieval` later adds them, keeping and
    (by default) freezing every trained weight: RETROfitting.

    Args:
        vocab_size: tokens (256: bytes). dim, depth, num_heads: decoder sizes.
        chunk_len: m, the database's chunk length.
        retro_layers: blocks with CCA (default :func:`default_retro_layers`).
        encoder_dim, encoder_depth, encoder_heads: the neighbour encoder's sizes
            (default: dim, 2, num_heads).
        retrieval: False for the plain decoder (see above).
        retro_shift: where CCA reads (see :mod:`kvmemory_torch.retro.chunked_attention`):
            False (default), chunk i reads chunk i - 1's neighbours and the first
            chunk none; True, the paper's m - 1 shift (a chunk's last token reads it too).
        init_std: GPT-2 initialisation (residual outputs get init_std / sqrt(2 depth)).
        **attention_options: LocalAttention options of the decoder's self-attention
            (normalize_qk, init_scale, rotary (default True), bias).
    """

    def __init__(self, vocab_size: int = 256, dim: int = 256, depth: int = 6, num_heads: int = 4,
                 chunk_len: int = 64, retro_layers=None, encoder_dim: int | None = None, encoder_depth: int = 2,
                 encoder_heads: int | None = None, retrieval: bool = True, mlp_ratio: int = 4,
                 tie_embeddings: bool = True, init_std: float = 0.02, retro_shift: bool = False,
                 **attention_options):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
            raise ValueError(f"chunk_len must be an int >= 1, got {chunk_len!r}")
        self.vocab_size, self.dim, self.depth, self.num_heads = vocab_size, dim, depth, num_heads
        self.head_dim, self.chunk_len, self.mlp_ratio, self.init_std = dim // num_heads, chunk_len, mlp_ratio, init_std
        self.retro_shift = bool(retro_shift)
        self.attention_options = {"rotary": True, **attention_options}
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            Block(dim, LocalAttention(dim, num_heads, self.head_dim, **self.attention_options), mlp_ratio)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        init_weights(self, init_std, depth, [out for b in self.blocks for out in (b.attention.to_out, b.mlp[2])])
        self.retro_layers: tuple = ()
        self.encoder = None
        self.cca = nn.ModuleDict()
        if retrieval:
            self._build_retrieval(retro_layers, encoder_dim, encoder_depth, encoder_heads, zero_init=False)

    # -- retrieval parts ---------------------------------------------------------------------
    def _build_retrieval(self, retro_layers, encoder_dim, encoder_depth, encoder_heads, zero_init: bool) -> list:
        layers = default_retro_layers(self.depth) if retro_layers is None else tuple(sorted(set(retro_layers)))
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.depth]
        if not layers or bad:
            raise ValueError(f"retro_layers must be a non-empty set of block indices in [0, {self.depth}), "
                             f"got {retro_layers!r}")
        enc_dim = encoder_dim or self.dim
        enc_heads = encoder_heads or self.num_heads
        self.encoder = NeighbourEncoder(enc_dim, self.dim, self.dim, encoder_depth, enc_heads, self.mlp_ratio)
        self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(self.dim, enc_dim, self.num_heads, self.head_dim,
                                                                self.chunk_len, retro_shift=self.retro_shift)
                                   for i in layers})
        self.retro_layers = layers
        new = [self.encoder, *self.cca.values()]
        init_weights(self.encoder, self.init_std, encoder_depth, self.encoder.residual_outputs())
        for c in self.cca.values():
            init_weights(c, self.init_std, self.depth, [c.attention.to_out])
        if zero_init:
            for c in self.cca.values():
                nn.init.zeros_(c.attention.to_out.weight)
        device = self.embed.weight.device
        for module in new:
            module.to(device)
        return [p for module in new for p in module.parameters()]

    @property
    def has_retrieval(self) -> bool:
        return self.encoder is not None

    def add_retrieval(self, retro_layers=None, encoder_dim: int | None = None, encoder_depth: int = 2,
                      encoder_heads: int | None = None, freeze_base: bool = True, zero_init: bool = True) -> list:
        """RETROfit a decoder trained without retrieval: add CCA at ``retro_layers`` and the encoder.

        Every existing weight is kept; with ``freeze_base`` (the paper's
        RETROfitting) they stop requiring gradients, so only the new parts
        train. With ``zero_init`` each CCA's output projection starts at zero,
        so the retrofitted model computes exactly what the base did until
        training moves it. Returns the new parameters (give them to the optimizer).
        """
        if self.has_retrieval:
            raise ValueError(f"this model has retrieval already (retro_layers={self.retro_layers})")
        if freeze_base:
            for p in self.parameters():
                p.requires_grad_(False)
        return self._build_retrieval(retro_layers, encoder_dim, encoder_depth, encoder_heads, zero_init)

    def base_parameters(self) -> dict:
        """{name: parameter} of the decoder itself (everything but the encoder and the CCA layers)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith(("encoder.", "cca."))}

    def retrieval_parameters(self) -> dict:
        """{name: parameter} of the encoder and the CCA layers."""
        return {n: p for n, p in self.named_parameters() if n.startswith(("encoder.", "cca."))}

    # -- forward -------------------------------------------------------------------------------
    def _check(self, tokens, neighbours, neighbour_mask):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an int64 tensor [batch, tokens], got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        B, n = tokens.shape
        if not self.has_retrieval:
            if neighbours is not None:
                raise ValueError("this model has no retrieval layers: neighbours must be None "
                                 "(add_retrieval() adds them)")
            return None
        L = n // self.chunk_len
        if neighbours is None:
            raise ValueError(f"this model reads neighbours: pass neighbours [batch={B}, chunks={L}, k, neighbour_len] "
                             "(an all-False neighbour_mask means none were found)")
        if not isinstance(neighbours, torch.Tensor) or neighbours.dim() != 4 \
                or tuple(neighbours.shape[:2]) != (B, L) or neighbours.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"neighbours must be int64 token ids [batch={B}, chunks={L}, k, neighbour_len]: one entry "
                             f"per complete chunk (tokens {n} // chunk_len {self.chunk_len}), got "
                             f"{getattr(neighbours, 'dtype', type(neighbours).__name__)} "
                             f"{tuple(getattr(neighbours, 'shape', ()))}")
        if neighbours.shape[2] < 1 or neighbours.shape[3] < 1:
            raise ValueError(f"neighbours must have k >= 1 and neighbour_len >= 1, got shape {tuple(neighbours.shape)}")
        if neighbour_mask is None:
            neighbour_mask = torch.ones(neighbours.shape, dtype=torch.bool, device=neighbours.device)
        elif not isinstance(neighbour_mask, torch.Tensor) or neighbour_mask.dtype != torch.bool \
                or neighbour_mask.shape != neighbours.shape:
            raise ValueError(f"neighbour_mask must be a bool tensor of the neighbours' shape "
                             f"{tuple(neighbours.shape)}, got "
                             f"{getattr(neighbour_mask, 'dtype', type(neighbour_mask).__name__)} "
                             f"{tuple(getattr(neighbour_mask, 'shape', ()))}")
        if neighbours.numel() and (int(neighbours.min()) < 0 or int(neighbours.max()) >= self.vocab_size):
            raise ValueError(f"neighbour token ids must be in [0, {self.vocab_size}), got "
                             f"[{int(neighbours.min())}, {int(neighbours.max())}]")
        return neighbour_mask

    def forward(self, tokens: torch.Tensor, neighbours: torch.Tensor | None = None,
                neighbour_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, n] int64 -> logits [B, n, vocab_size].

        neighbours [B, n // chunk_len, k, r] int64: for each complete chunk of
        ``tokens``, its k retrieved neighbours with their continuations (r =
        2 chunk_len from :class:`kvmemory.retro.RetroDatabase`); neighbour_mask
        [B, n // chunk_len, k, r] bool, True on real tokens (default all). A
        trailing incomplete chunk has no neighbours (no token may read them).
        """
        mask = self._check(tokens, neighbours, neighbour_mask)
        x = self.embed(tokens)
        encoded = None
        m = self.chunk_len
        for i, block in enumerate(self.blocks):
            x = block.attend(x)
            if i in self.retro_layers:
                if encoded is None:
                    L = x.shape[1] // m
                    states = x[:, :L * m].reshape(x.shape[0], L, m, self.dim)
                    encoded = self.encoder(self.embed(neighbours), mask, states)
                x = x + self.cca[str(i)](x, encoded, mask)
            x = block.feed_forward(x)
        return self.head(self.norm(x))
