import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmemory.retro import ByteTokenizer, chunk_documents


def test_chunks_know_document_position_and_length():
    docs = [np.arange(n) % 256 for n in (0, 5, 4, 8, 9)]
    c = chunk_documents(docs, 4, first_doc_id=10, pad_id=0)
    assert c.doc_ids.tolist() == [11, 11, 12, 13, 13, 14, 14, 14]     # empty doc 10 gives none; 5 tokens give 2
    assert c.positions.tolist() == [0, 1, 0, 0, 1, 0, 1, 2]
    assert c.lengths.tolist() == [4, 1, 4, 4, 4, 4, 4, 1]
    assert c.tokens[1].tolist() == [4, 0, 0, 0]                           # short last chunk padded
    assert c.doc_table.tolist() == [[10, 0, 0, 0], [11, 0, 2, 5], [12, 2, 1, 4], [13, 3, 2, 8], [14, 5, 3, 9]]
    assert c.tokens.dtype == np.uint8


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=6), st.integers(1, 9))
def test_chunks_reassemble_their_documents(lengths, chunk_len):
    rng = np.random.default_rng(sum(lengths) + chunk_len)
    docs = [rng.integers(0, 256, n) for n in lengths]
    c = chunk_documents(docs, chunk_len)
    for j, d in enumerate(docs):
        rows = np.flatnonzero(c.doc_ids == j)
        got = np.concatenate([c.tokens[r, :c.lengths[r]] for r in rows]) if len(rows) else np.zeros(0)
        assert got.tolist() == d.tolist()
        assert c.positions[rows].tolist() == list(range(len(rows)))
    assert len(c) == sum(-(-n // chunk_len) for n in lengths)


@pytest.mark.parametrize("doc, err, match", [
    (np.zeros((2, 3), np.int64), ValueError, "1-D"),
    (np.array([1.5, 2.0]), TypeError, "integer"),
    (np.array([-1, 3]), ValueError, r"\[-1, 3\].*\[0, 256\)"),
    (np.array([0, 256]), ValueError, r"\[0, 256\)"),
])
def test_bad_documents_are_refused_by_name(doc, err, match):
    with pytest.raises(err, match=match):
        chunk_documents([np.array([1, 2]), doc], 4, names=["a.py", "b.py"])
    with pytest.raises(err, match="b.py"):
        chunk_documents([np.array([1, 2]), doc], 4, names=["a.py", "b.py"])


@pytest.mark.parametrize("kwargs, match", [({"chunk_len": 0}, "chunk_len"), ({"chunk_len": 2.0}, "chunk_len"),
                                           ({"chunk_len": 4, "pad_id": 256}, "pad_id")])
def test_bad_chunking_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        chunk_documents([np.array([1])], **kwargs)


def test_byte_tokenizer_round_trip_and_cut_characters():
    tok = ByteTokenizer()
    ids = tok.encode("é = 1")
    assert ids.tolist()[:2] == [0xC3, 0xA9] and tok.decode(ids) == "é = 1"
    assert tok.decode(ids[1:]) == "\ufffd = 1"          # a chunk boundary inside a character
