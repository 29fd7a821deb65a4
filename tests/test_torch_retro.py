"""kvmemory_torch.retro: chunked cross-attention's causality, masks, the neighbour encoder, RETROfitting,
retrieval from a kvmemory.retro database, and bad input."""

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvmemory import retro  # noqa: E402
from kvmemory_torch import LocalAttention  # noqa: E402
from kvmemory_torch.retro import (ChunkedCrossAttention, DatabaseRetriever, NeighbourEncoder,  # noqa: E402
                                  RetroTransformer, attending_chunk, first_reader, generate,
                                  precomputed_neighbours)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DIM, ENC, H, HD = 16, 12, 2, 8
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def cca(m, retro_shift=False, seed=0):
    torch.manual_seed(seed)
    return ChunkedCrossAttention(DIM, ENC, H, HD, m, retro_shift=retro_shift).eval()


def encoded_inputs(B, n, m, k, r, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = n // m
    return (torch.randn(B, n, DIM, generator=g), torch.randn(B, L, k, r, ENC, generator=g),
            torch.ones(B, L, k, r, dtype=torch.bool))


def model(m=4, depth=3, retro_layers=(1,), seed=0, **options):
    torch.manual_seed(seed)
    return RetroTransformer(256, dim=DIM, depth=depth, num_heads=H, chunk_len=m, retro_layers=retro_layers,
                            encoder_dim=ENC, encoder_depth=2, encoder_heads=2, **options).eval()


def model_inputs(B, n, m, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (B, n), generator=g), torch.randint(0, 256, (B, n // m, k, 2 * m), generator=g),
            torch.ones(B, n // m, k, 2 * m, dtype=torch.bool))


# -- the causality rule ---------------------------------------------------------------------------
def test_attending_chunk_is_the_stated_rule():
    # default: chunk i reads chunk i - 1's neighbours; the first chunk reads none
    assert attending_chunk(12, 4).tolist() == [-1] * 4 + [0] * 4 + [1] * 4
    # the paper's m - 1 shift: a chunk's last token already reads its neighbours
    assert attending_chunk(12, 4, retro_shift=True).tolist() == [-1] * 3 + [0] * 4 + [1] * 4 + [2]
    assert first_reader(4) == 4 and first_reader(4, retro_shift=True) == 3


@FAST
@given(m=st.integers(1, 5), chunks=st.integers(1, 4), extra=st.integers(0, 4), k=st.integers(1, 3),
       shift=st.booleans(), data=st.data())
def test_cca_changing_chunk_j_neighbours_changes_nothing_before_its_readers(m, chunks, extra, k, shift, data):
    n = chunks * m + min(extra, m - 1)
    j = data.draw(st.integers(0, chunks - 1), label="j")
    layer = cca(m, shift)
    h, enc, mask = encoded_inputs(2, n, m, k, 2 * m)
    before = layer(h, enc, mask)
    enc2 = enc.clone()
    enc2[:, j] += 3 * torch.randn_like(enc2[:, j])
    after = layer(h, enc2, mask)
    readers = attending_chunk(n, m, shift) == j
    first = first_reader(m, shift) + j * m
    assert torch.equal(before[:, :first], after[:, :first])      # bit-identical, not close
    assert torch.equal(before[:, ~readers], after[:, ~readers])  # nobody but chunk j's readers
    if readers.any():
        assert not torch.allclose(before[:, readers], after[:, readers])


@FAST
@given(shift=st.booleans(), j=st.integers(0, 2), p=st.integers(0, 11))
def test_model_is_causal_in_neighbours_and_tokens(shift, j, p):
    m, n = 4, 14
    net = model(m, retro_shift=shift)
    tokens, nb, mask = model_inputs(2, n, m)
    with torch.no_grad():
        base = net(tokens, nb, mask)
        nb2 = nb.clone()
        nb2[:, j] = (nb2[:, j] + 1) % 256
        changed = net(tokens, nb2, mask)
        first = first_reader(m, shift) + j * m
        assert torch.equal(base[:, :first], changed[:, :first])
        assert not torch.allclose(base[:, first:], changed[:, first:])
        # a later token (and with it the encoder's view of its chunk) changes nothing before it
        t2 = tokens.clone()
        t2[:, p] = (t2[:, p] + 1) % 256
        later = net(t2, nb, mask)
        assert torch.equal(base[:, :p], later[:, :p])
        assert not torch.allclose(base[:, p:], later[:, p:])


@pytest.mark.parametrize("shift", [False, True])
def test_first_chunk_attends_to_nothing(shift):
    m, n = 4, 12
    layer = cca(m, shift)
    h, enc, mask = encoded_inputs(2, n, m, 2, 2 * m)
    out = layer(h, enc, mask)
    start = first_reader(m, shift)
    assert torch.equal(out[:, :start], torch.zeros_like(out[:, :start]))
    assert out[:, start:].abs().sum(-1).gt(0).all()
    # in the model: whatever the neighbours, the first chunk's logits are the same
    net = model(m, retro_shift=shift)
    tokens, nb, nmask = model_inputs(2, n, m)
    with torch.no_grad():
        a = net(tokens, nb, nmask)
        b = net(tokens, torch.randint(0, 256, nb.shape), nmask)
        c = net(tokens, nb, torch.zeros_like(nmask))
    assert torch.equal(a[:, :start], b[:, :start]) and torch.equal(a[:, :start], c[:, :start])


def test_sequence_shorter_than_a_chunk_and_trailing_partial_chunk():
    m = 4
    net = model(m)
    tokens, nb, mask = model_inputs(1, 10, m)       # 2 complete chunks and 2 tokens
    with torch.no_grad():
        assert net(tokens[:, :3], nb[:, :0], mask[:, :0]).shape == (1, 3, 256)
        full = net(tokens, nb, mask)
        other = nb.clone()
        other[:, 1] = (other[:, 1] + 7) % 256
        changed = net(tokens, other, mask)
    assert not torch.allclose(full[:, 8:], changed[:, 8:])   # the partial chunk reads chunk 1's neighbours
    assert torch.equal(full[:, :8], changed[:, :8])


# -- masks ------------------------------------------------------------------------------------------
def test_masked_neighbour_tokens_have_no_effect():
    m, n = 4, 12
    layer = cca(m)
    h, enc, mask = encoded_inputs(2, n, m, 2, 2 * m)
    mask[:, :, 1] = False                      # the second neighbour of every chunk is missing
    mask[0, 1, 0, 5:] = False                  # padding at the end of one neighbour
    out = layer(h, enc, mask)
    enc2 = enc.clone()
    enc2[~mask] = 100 * torch.randn_like(enc2[~mask])
    assert torch.allclose(out, layer(h, enc2, mask), atol=1e-6, rtol=0)
    # and in the model: the tokens under a False mask may be anything
    net = model(m)
    tokens, nb, nmask = model_inputs(2, n, m)
    nmask[:, :, 1, 3:] = False
    with torch.no_grad():
        a = net(tokens, nb, nmask)
        nb2 = nb.clone()
        nb2[~nmask] = (nb2[~nmask] + 11) % 256
        b = net(tokens, nb2, nmask)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_all_masked_chunk_contributes_zero_and_no_nan_gradients():
    m, n = 4, 12
    layer = cca(m).train()
    h, enc, mask = encoded_inputs(2, n, m, 2, 2 * m)
    mask[:, 1] = False                         # chunk 1 found nothing
    h.requires_grad_()
    out = layer(h, enc, mask)
    readers = attending_chunk(n, m) == 1
    assert torch.equal(out[:, readers], torch.zeros_like(out[:, readers]))
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert torch.isfinite(h.grad).all()
    # with no neighbours at all, the model computes what the plain decoder does
    net = model(m)
    tokens, nb, nmask = model_inputs(2, n, m)
    with torch.no_grad():
        got = net(tokens, nb, torch.zeros_like(nmask))
        x = net.embed(tokens)
        for block in net.blocks:
            x = block(x)
        want = net.head(net.norm(x))
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


# -- the neighbour encoder ----------------------------------------------------------------------------
def test_encoder_is_bidirectional_within_a_neighbour_and_ignores_padding():
    torch.manual_seed(0)
    enc = NeighbourEncoder(ENC, DIM, DIM, depth=2, num_heads=2).eval()
    g = torch.Generator().manual_seed(2)
    B, L, k, r, m = 2, 3, 2, 8, 4
    emb = torch.randn(B, L, k, r, DIM, generator=g)
    mask = torch.ones(B, L, k, r, dtype=torch.bool)
    mask[..., 6:] = False                           # padding at the end
    states = torch.randn(B, L, m, DIM, generator=g)
    with torch.no_grad():
        base = enc(emb, mask, states)
        later = emb.clone()
        later[0, 1, 0, 5] += 1.0                    # the last real token of one neighbour
        out = enc(later, mask, states)
        # every token of that neighbour sees it, the first one included; other neighbours don't
        assert (out[0, 1, 0, :6] - base[0, 1, 0, :6]).abs().amax(-1).gt(1e-6).all()
        others = torch.ones(B, L, k, dtype=torch.bool)
        others[0, 1, 0] = False
        assert torch.equal(out[others], base[others])
        padded = emb.clone()
        padded[..., 6:, :] = 50 * torch.randn_like(padded[..., 6:, :])
        assert torch.allclose(enc(padded, mask, states)[..., :6, :], base[..., :6, :], atol=1e-5, rtol=0)
        # conditioned on the states of its own chunk only
        s2 = states.clone()
        s2[:, 2] += torch.randn(s2[:, 2].shape, generator=g)    # not a constant: the encoder normalises states
        moved = enc(emb, mask, s2)
        assert torch.equal(moved[:, :2], base[:, :2]) and not torch.allclose(moved[:, 2], base[:, 2])


def test_local_attention_bidirectional_key_mask():
    torch.manual_seed(0)
    attn = LocalAttention(DIM, H, HD, causal=False, rotary=True).eval()
    x = torch.randn(2, 5, DIM)
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        a = attn(x, key_mask=keep)
        y = x.clone()
        y[:, -1] += 1.0
        b = attn(y, key_mask=keep)
    assert not torch.allclose(a[0, 0], b[0, 0])        # the first token sees the last
    assert torch.allclose(a[1, :3], b[1, :3], atol=1e-6, rtol=0)   # unless it is padding


# -- RETROfitting ---------------------------------------------------------------------------------
def test_retrofit_freezes_the_base_and_starts_from_its_outputs():
    m, n = 4, 12
    torch.manual_seed(0)
    net = RetroTransformer(256, dim=DIM, depth=3, num_heads=H, chunk_len=m, retrieval=False).eval()
    tokens, nb, mask = model_inputs(2, n, m)
    with torch.no_grad():
        plain = net(tokens)
    with pytest.raises(ValueError, match="neighbours"):
        net(tokens, nb, mask)
    base = {k: v.detach().clone() for k, v in net.base_parameters().items()}
    new = net.add_retrieval(retro_layers=(1, 2), encoder_dim=ENC, encoder_heads=2)
    assert net.has_retrieval and net.retro_layers == (1, 2)
    assert not any(p.requires_grad for p in net.base_parameters().values())
    assert {id(p) for p in new} == {id(p) for p in net.retrieval_parameters().values()}
    assert all(p.requires_grad for p in new)
    with torch.no_grad():
        assert torch.equal(net(tokens, nb, mask), plain)        # zero-initialised CCA outputs: the base's logits
    net.train()
    opt = torch.optim.SGD(new, lr=0.5)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(net(tokens, nb, mask)[:, :-1].reshape(-1, 256),
                                                 tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(base[k], v) for k, v in net.base_parameters().items())
    with torch.no_grad():
        assert not torch.allclose(net.eval()(tokens, nb, mask)[:, 4:], plain[:, 4:])   # the new parts learned
    with pytest.raises(ValueError, match="retrieval already"):
        net.add_retrieval()


def test_retrofit_without_freezing_or_zero_init():
    torch.manual_seed(0)
    net = RetroTransformer(256, dim=DIM, depth=2, num_heads=H, chunk_len=4, retrieval=False).eval()
    tokens, nb, mask = model_inputs(1, 8, 4)
    with torch.no_grad():
        plain = net(tokens)
    net.add_retrieval(freeze_base=False, zero_init=False)
    assert all(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        out = net(tokens, nb, mask)
    assert torch.equal(out[:, :4], plain[:, :4]) and not torch.allclose(out[:, 4:], plain[:, 4:])


# -- retrieval from a database ------------------------------------------------------------------------
def _stub_embedder(dim=16):
    def embed(texts):
        return np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(dim) for t in texts]
                        ).astype(np.float32) if texts else np.zeros((0, dim), np.float32)
    return retro.CallableEmbedder(embed, dim, name="stub-random", config={"dim": dim})


@pytest.fixture
def db(tmp_path):
    rng = np.random.default_rng(5)
    words = [b"def ", b"return ", b"self.", b"x = ", b"import ", b"class ", b"\n    ", b"(a, b)", b"if ", b"None"]
    docs = [b"".join(words[i] for i in rng.integers(0, len(words), 40)) for _ in range(6)]
    retro.build(docs, tmp_path / "db", embedder=_stub_embedder(), chunk_len=8, shard_chunks=13)
    return retro.RetroDatabase(tmp_path / "db", embedder=_stub_embedder())


def test_precomputed_neighbours_equal_on_the_fly_retrieval(db):
    pre = retro.precompute_neighbours(db, "train", k=2)
    for doc in range(db.num_docs):
        ids = db.doc_chunks(doc)
        tokens, tmask = db.chunk_tokens(ids, continuation=False)
        full = tmask.all(-1)
        ids, tokens = ids[full], tokens[full]                 # complete chunks only
        seq = torch.as_tensor(tokens.reshape(1, -1).astype(np.int64))
        want, want_mask = precomputed_neighbours(db, pre.ids[ids][None])
        retriever = DatabaseRetriever(db, k=2, exclude_doc_ids=[doc])
        got, got_mask = retriever(seq)
        assert got.shape == want.shape == (1, len(ids), 2, 16)
        assert torch.equal(got_mask, want_mask) and torch.equal(got[got_mask], want[want_mask])
        assert retriever.searches == len(ids)
        retriever(seq)
        assert retriever.searches == len(ids)                # cached: each chunk is searched once


def test_generate_searches_once_per_completed_chunk(db):
    torch.manual_seed(0)
    net = RetroTransformer(256, dim=DIM, depth=2, num_heads=H, chunk_len=db.chunk_len, retro_layers=(1,)).eval()
    prompt = torch.as_tensor(db.chunk_tokens(db.doc_chunks(0)[:1], continuation=False)[0].astype(np.int64))
    retriever = DatabaseRetriever(db, k=2)
    out = generate(net, prompt[:, :5], 20, retriever)
    assert out.shape == (1, 25) and torch.equal(out[:, :5], prompt[:, :5])
    assert retriever.searches == 25 // db.chunk_len
    nb, mask = DatabaseRetriever(db, k=2)(out[:, :-1])
    with torch.no_grad():
        assert net(out[:, :-1], nb, mask)[0, -1].argmax() == out[0, -1]    # greedy, the model's own choice
    with pytest.raises(ValueError, match="retriever"):
        generate(net, prompt, 1)


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_raises_value_errors_naming_the_argument():
    m = 4
    net = model(m)
    tokens, nb, mask = model_inputs(2, 12, m)
    with pytest.raises(ValueError, match="tokens"):
        net(tokens.float(), nb, mask)
    with pytest.raises(ValueError, match="tokens"):
        net(tokens[0], nb, mask)
    with pytest.raises(ValueError, match="neighbours"):
        net(tokens)
    with pytest.raises(ValueError, match="neighbours"):
        net(tokens, nb[:, :2], mask[:, :2])                   # 3 complete chunks, 2 given
    with pytest.raises(ValueError, match="neighbours"):
        net(tokens, nb.float(), mask)
    with pytest.raises(ValueError, match="neighbours"):
        net(tokens, nb[..., 0], mask)
    with pytest.raises(ValueError, match="neighbour_mask"):
        net(tokens, nb, mask.long())
    with pytest.raises(ValueError, match="neighbour_mask"):
        net(tokens, nb, mask[..., :3])
    with pytest.raises(ValueError, match="neighbour_mask"):
        net(tokens, nb, mask.numpy())
    with pytest.raises(ValueError, match="neighbour token ids"):
        net(tokens, nb + 256, mask)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_len"):
            RetroTransformer(256, dim=DIM, depth=2, num_heads=H, chunk_len=bad)
    with pytest.raises(ValueError, match="retro_layers"):
        RetroTransformer(256, dim=DIM, depth=2, num_heads=H, chunk_len=4, retro_layers=(2,))
    with pytest.raises(ValueError, match="retro_layers"):
        RetroTransformer(256, dim=DIM, depth=2, num_heads=H, chunk_len=4, retro_layers=())
    layer = cca(m)
    h, enc, emask = encoded_inputs(2, 12, m, 2, 8)
    with pytest.raises(ValueError, match="encoded"):
        layer(h, enc[:, :2], emask[:, :2])
    with pytest.raises(ValueError, match="mask"):
        layer(h, enc, emask.float())
    with pytest.raises(ValueError, match="h must"):
        layer(h[..., :3], enc, emask)
    with pytest.raises(ValueError, match="key_mask"):
        LocalAttention(DIM, H, HD)(h, key_mask=torch.ones(2, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_mask"):
        LocalAttention(DIM, H, HD, causal=False)(h, key_mask=torch.ones(2, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal=False"):
        LocalAttention(DIM, H, HD, causal=False, xl_cache=True)
    with pytest.raises(ValueError, match="k must"):
        DatabaseRetriever(object.__new__(retro.RetroDatabase), k=0)
