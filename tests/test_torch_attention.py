"""KNNAttention, the bridge to host backends, and the reference model."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvmemory  # noqa: E402
from kvmemory_torch import (KNNAttention, MemorizingTransformer, frozen_memories,  # noqa: E402
                            reset_memories)
from kvmemory_torch import bridge  # noqa: E402

B, T, DIM, H, D = 2, 4, 8, 2, 4


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def layer(backend="torch", capacity=16, k=3, batch_size=B, **options):
    torch.manual_seed(0)
    memory = kvmemory.Memory(D, D, capacity, H, batch_size, backend=backend,
                             **({"device": "cpu"} if backend == "torch" else {}))
    return KNNAttention(DIM, H, D, memory, k=k, **options)


def segments(n, batch=B, tokens=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, DIM, generator=g) for _ in range(n)]


def test_gradcheck_through_memory_path():
    attn = layer(capacity=8).double()
    for x in segments(3):
        attn(x.double())
    attn.memory.clear(1)  # row 1: empty memory, local-only fallback must be differentiable too
    x = segments(1, seed=5)[0].double().requires_grad_()
    names = ["gate_bias", "log_scale", "to_q.weight"]
    params = {n: p.detach().clone().requires_grad_() for n, p in attn.named_parameters() if n in names}

    def f(x, gate_bias, log_scale, wq):
        p = {"gate_bias": gate_bias, "log_scale": log_scale, "to_q.weight": wq}
        return torch.func.functional_call(attn, p, (x,))

    with frozen_memories(attn):
        assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-5, fast_mode=True)
        out = f(x, *params.values())
    out.sum().backward()
    assert params["gate_bias"].grad.abs().sum() > 0  # the memory path is live, not gated away
    assert attn.memory.size.tolist() == [8, 0]


def test_no_gradient_reaches_stored_entries():
    attn = layer()
    for x in segments(2):
        attn(x.requires_grad_()).sum().backward()
    store = attn.memory.backend
    assert not store.keys.requires_grad and not store.values.requires_grad
    assert store.keys.grad is None and store.values.grad is None and store.keys.grad_fn is None
    res = bridge.search(attn.memory, torch.randn(B, 1, H, D, requires_grad=True), 3)
    assert not res.keys.requires_grad and not res.values.requires_grad


def test_memory_changes_the_output_and_empty_memory_ignores_the_gate():
    x, y = segments(2)
    a, b = layer(gate_init=2.0), layer(gate_init=-2.0)
    b.load_state_dict({**a.state_dict(), "gate_bias": torch.full((H,), -2.0)})
    assert torch.allclose(a(x), b(x))  # empty memory: local attention only, whatever the gate
    assert not torch.allclose(a(y), b(y), atol=1e-4)  # with memory, the gate mixes it in


def test_doc_start_clears_exactly_the_flagged_rows():
    attn = layer()
    first, second = segments(2)
    attn(first)
    fresh = copy.deepcopy(attn)
    fresh.reset_memory()
    assert fresh.memory.size.tolist() == [0, 0]
    out = attn(second, doc_start=torch.tensor([True, False]))
    assert attn.memory.size.tolist() == [T, 2 * T]
    ref = fresh(second)
    assert torch.allclose(out[0], ref[0], atol=1e-6)        # row 0 saw no memory
    assert not torch.allclose(out[1], ref[1], atol=1e-4)    # row 1 kept its past


def test_host_backend_through_bridge_matches_torch_backend():
    a, b = layer("torch"), layer("exact")
    b.load_state_dict(a.state_dict())
    for i, x in enumerate(segments(5)):
        start = torch.tensor([i == 3, False])
        assert torch.allclose(a(x, doc_start=start), b(x, doc_start=start), atol=1e-5)
    np.testing.assert_array_equal(a.memory.size, b.memory.size)


def test_result_to_device_keeps_values_and_dtypes():
    mem = kvmemory.Memory(D, 3, 8, H, B)
    mem.add(np.random.rand(B, 5, H, D).astype(np.float32), np.random.rand(B, 5, H, 3).astype(np.float32))
    res = mem.search(np.random.rand(B, 2, H, D).astype(np.float32), 7)
    moved = bridge.result_to_device(res, torch.device("cpu"))
    for name in ("keys", "values", "scores", "ids", "mask"):
        np.testing.assert_array_equal(getattr(moved, name).numpy(), getattr(res, name))
    assert moved.ids.dtype == torch.int64 and moved.mask.dtype == torch.bool


def test_xl_cache_attends_to_the_previous_segment():
    attn = layer(xl_cache=True, gate_init=-40.0)  # gate ~ 0: local attention only
    plain = layer(gate_init=-40.0)
    plain.load_state_dict(attn.state_dict())
    first, second = segments(2)
    attn(first)
    out = attn(second, doc_start=torch.tensor([False, True]))
    whole = plain(torch.cat([first, second], 1))[:, T:]
    assert torch.allclose(out[0], whole[0], atol=1e-5)   # row 0 attends over both segments
    plain.reset_memory()
    assert torch.allclose(out[1], plain(second)[1], atol=1e-5)  # row 1's document restarted


def test_memory_from_dict_is_built_at_first_forward():
    attn = KNNAttention(DIM, H, D, {"capacity": 32, "backend": "torch"}, k=2)
    assert attn.memory is None
    attn(segments(1, batch=3)[0])
    mem = attn.memory
    assert (mem.batch_size, mem.key_dim, mem.value_dim, mem.num_heads, mem.metric) == (3, D, D, H, "ip")
    assert mem.options["device"] == "cpu" and mem.size.tolist() == [T] * 3
    with pytest.raises(ValueError, match="key_dim=5 does not match"):
        KNNAttention(DIM, H, D, {"capacity": 32, "key_dim": 5})


def test_clear_errors():
    attn = layer()
    with pytest.raises(ValueError, match="batch is 3 but the memory has batch_size=2"):
        attn(torch.randn(3, T, DIM))
    with pytest.raises(ValueError, match=r"x must be \[batch, tokens, dim=8\]"):
        attn(torch.randn(B, T, DIM + 1))
    with pytest.raises(ValueError, match="x must be"):
        attn(torch.randn(T, DIM))
    with pytest.raises(ValueError, match="input is on meta but the memory lives on cpu"):
        attn(torch.randn(B, T, DIM, device="meta"))
    with pytest.raises(ValueError, match="doc_start must be a bool tensor"):
        attn(torch.randn(B, T, DIM), doc_start=torch.tensor([True]))
    with pytest.raises(ValueError, match="num_heads=3, the layer needs 2"):
        KNNAttention(DIM, H, D, kvmemory.Memory(D, num_heads=3))
    with pytest.raises(TypeError, match="memory must be"):
        KNNAttention(DIM, H, D, memory=None)
    assert attn.memory.size.tolist() == [0, 0]


def test_reset_and_frozen_memories():
    model = MemorizingTransformer(11, dim=DIM, depth=2, num_heads=H, memory={"capacity": 16}, k=2)
    tokens = torch.randint(0, 11, (B, 5))
    model(tokens)
    mem = model.knn_attention.memory
    assert mem.backend_name == "exact" and mem.size.tolist() == [5, 5]
    with frozen_memories(model):
        model(tokens)
    assert mem.size.tolist() == [5, 5] and model.knn_attention.update_memory
    reset_memories(model)
    assert mem.size.tolist() == [0, 0]


@pytest.mark.parametrize("backend", ["torch", "exact"])
def test_tiny_model_learns_a_repetitive_sequence(backend):
    torch.manual_seed(0)
    vocab, seg = 12, 12
    model = MemorizingTransformer(vocab, dim=32, depth=2, num_heads=2, k=4, knn_layer=1,
                                  memory={"capacity": 64, "backend": backend}, xl_cache=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stream = torch.randint(0, vocab, (B, 9)).repeat(1, 6)           # period 9, 54 tokens per row
    losses = []
    for _ in range(12):
        reset_memories(model)
        total = 0.0
        for s in range(0, stream.shape[1] - seg, seg):
            inp, target = stream[:, s:s + seg], stream[:, s + 1:s + seg + 1]
            logits = model(inp, doc_start=torch.full((B,), s == 0))
            total = total + torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    reset_memories(model)
    with torch.no_grad():
        logits = model(stream[:, :seg], doc_start=torch.ones(B, dtype=torch.bool))
    assert logits.shape == (B, seg, vocab) and torch.isfinite(logits).all()
