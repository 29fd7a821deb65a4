"""End to end: a small decoder learns to retrieve from its kNN memory what lies beyond its context.

The copy task (benchmarks/lm_memory/copy_task.py) at a tiny scale: random
bytes in which 16-byte passages recur either near (inside the segment and
its XL cache) or far (96-192 bytes back, beyond both). The same one-layer
model, trained the same way, with and without a memory: only the memory can
predict the far copies, so only the model with one may beat ~8 bits/byte on
them. This is the torch adapter's strongest test: it fails if search, write
order, masks, gate or gradients through the retrieved scores are wrong.
The model has Primer's depthwise q/k/v convolution (``dconv=3``), so the
memory can match a three-byte context; the last test shows why that matters
once one byte is ambiguous in the memory.
"""

import math

import pytest

torch = pytest.importorskip("torch")

from benchmarks.lm_memory.copy_task import copy_documents  # noqa: E402
from benchmarks.lm_memory.evaluate import evaluate  # noqa: E402
from benchmarks.lm_memory.stream import TrainStream  # noqa: E402
from benchmarks.lm_memory.train import token_bits  # noqa: E402
from kvmemory_torch import MemorizingTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

B, T, STEPS, LENGTH = 8, 32, 400, 1024
TASK = dict(passage=16, gap=(96, 192), near_gap=(16, 48), far=0.4, near=0.3)


def train_and_evaluate(memory: dict | None) -> dict:
    train = copy_documents(STEPS * B * T // LENGTH + B, LENGTH, seed=0, **TASK)    # every byte read once
    held_out = copy_documents(8, LENGTH, seed=1, **TASK)
    torch.manual_seed(0)
    model = MemorizingTransformer(256, dim=64, depth=1, num_heads=2, memory=memory, k=8, knn_layer=0,
                                  xl_cache=True, smear_keys=True, dconv=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = TrainStream(train, B, T, seed=0)
    for _ in range(STEPS):
        bits, valid = token_bits(model, stream.next(), "cpu")
        optimizer.zero_grad()
        (bits.sum() / valid.sum() * math.log(2)).backward()
        optimizer.step()
    return evaluate(model, held_out, B, T, "cpu")


@pytest.fixture(scope="module")
def without_memory():
    return train_and_evaluate(None)


@pytest.mark.parametrize("backend", ["torch", "exact"])
def test_memory_predicts_the_passages_beyond_the_context(without_memory, backend):
    options = {"device": "cpu"} if backend == "torch" else {}
    with_memory = train_and_evaluate({"capacity": 256, "batch_size": B, "backend": backend, **options})
    far, far_without = with_memory["copied_bits_per_byte"], without_memory["copied_bits_per_byte"]
    assert far_without > 6.5                  # nothing in the context predicts a far copy
    assert far < 3.5 and far < 0.45 * far_without, (far, far_without)
    assert with_memory["near_copied_bits_per_byte"] < 4.0 and without_memory["near_copied_bits_per_byte"] < 6.0


def test_a_memory_of_1024_random_bytes_needs_a_multi_byte_match():
    """Each byte value occurs ~4 times in the memory: matching one byte cannot pick the copy, three can."""
    from benchmarks.lm_memory.copy_scaling import run
    one_byte = run(capacity=1024, steps=800, memory=True, dconv=0)["far_bits_per_byte"]
    three_bytes = run(capacity=1024, steps=800, memory=True, dconv=3)["far_bits_per_byte"]
    assert three_bytes < 2.5 and three_bytes < one_byte - 1.0, (three_bytes, one_byte)
