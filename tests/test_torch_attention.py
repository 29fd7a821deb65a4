"""KNNAttention, the bridge to host backends, and the reference model."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvmemory  # noqa: E402
from kvmemory_torch import (KNNAttention, LocalAttention, MemorizingTransformer,  # noqa: E402
                            frozen_memories, knn_layers, reset_memories)
from kvmemory_torch import bridge, rotary  # noqa: E402

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


def test_rotary_scores_depend_on_the_offset_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 2, 8, generator=g), torch.randn(1, 1, 2, 8, generator=g)
    score = lambda qpos, kpos: (rotary.rotate(q, qpos) * rotary.rotate(k, kpos)).sum(-1)  # noqa: E731
    assert torch.allclose(score(7, 3), score(104, 100), atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4), atol=1e-3)
    assert torch.allclose(rotary.rotate(q, 5).norm(dim=-1), q.norm(dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="even head_dim"):
        LocalAttention(DIM, H, 3, rotary=True)


@pytest.mark.parametrize("rotary_positions", [False, True])
def test_plain_layer_xl_cache_equals_attention_over_both_segments(rotary_positions):
    torch.manual_seed(0)
    xl = LocalAttention(DIM, H, D, xl_cache=True, rotary=rotary_positions)
    plain = LocalAttention(DIM, H, D, rotary=rotary_positions)
    plain.load_state_dict(xl.state_dict())
    first, second = segments(2)
    xl(first)
    out = xl(second, doc_start=torch.tensor([False, True]))
    whole = plain(torch.cat([first, second], 1))[:, T:]
    assert torch.allclose(out[0], whole[0], atol=1e-5)          # row 0 attends over both segments
    assert torch.allclose(out[1], plain(second)[1], atol=1e-5)  # row 1's document restarted: no cache
    assert not torch.allclose(out[0], plain(second)[0], atol=1e-4)
    xl.reset_cache()
    assert torch.allclose(xl(second), plain(second), atol=1e-6)


def test_model_without_memory_is_the_baseline_and_add_memory_keeps_its_function():
    torch.manual_seed(0)
    base = MemorizingTransformer(11, dim=DIM, depth=2, num_heads=H, xl_cache=True)
    assert base.knn_attention is None and not knn_layers(base)
    tokens = torch.randint(0, 11, (B, 2, 5))
    ref = [base(tokens[:, i], doc_start=torch.full((B,), i == 0)) for i in range(2)]
    retro = copy.deepcopy(base)
    reset_memories(retro)
    layer = retro.add_memory({"capacity": 16}, k=2, gate_init=-40.0)      # gate ~ 0: memory mixed in at ~1e-18
    assert retro.knn_attention is layer and isinstance(layer, KNNAttention)
    old = base.blocks[base.knn_layer].attention.state_dict()
    assert all(torch.equal(layer.state_dict()[name], value) for name, value in old.items())
    out = [retro(tokens[:, i], doc_start=torch.full((B,), i == 0)) for i in range(2)]
    assert layer.memory.size.tolist() == [10, 10]
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="has a memory already"):
        retro.add_memory({"capacity": 16})


def test_reset_memories_clears_every_xl_cache():
    model = MemorizingTransformer(11, dim=DIM, depth=2, num_heads=H, memory={"capacity": 16}, k=2, xl_cache=True)
    tokens = torch.randint(0, 11, (B, 5))
    first = model(tokens)
    assert not torch.allclose(model(tokens), first, atol=1e-5)     # the caches and the memory are used
    reset_memories(model)
    assert torch.allclose(model(tokens), first, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "exact"])
def test_no_output_depends_on_a_later_token(backend):
    """Causality through every path: segment, XL cache, dconv, smeared keys and memory (searched before it is written)."""
    torch.manual_seed(0)
    options = {"device": "cpu"} if backend == "torch" else {}
    model = MemorizingTransformer(11, dim=DIM, depth=2, num_heads=H, memory={"capacity": 64, "backend": backend,
                                  **options}, k=4, xl_cache=True, smear_keys=True, dconv=3)
    for name, weight in model.named_parameters():  # dconv starts as the identity: give every tap a weight
        if name.endswith("dconv_weight"):
            weight.data.normal_()
    first, second = torch.randint(0, 11, (2, B, 6))
    changed = second.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 11
    outs = []
    for seg in (second, changed):
        reset_memories(model)
        model(first, doc_start=torch.ones(B, dtype=torch.bool))
        outs.append(model(seg))
    assert torch.allclose(outs[0][:, :4], outs[1][:, :4], atol=1e-6)
    assert not torch.allclose(outs[0][:, 4:], outs[1][:, 4:], atol=1e-3)


def test_dconv_streams_across_segments_and_restarts_at_a_document_start():
    torch.manual_seed(0)
    attn = LocalAttention(DIM, H, D, dconv=3)
    attn.dconv_weight.data.normal_()
    qkv = torch.randn(B, 7, 3, H, D)
    whole = attn._convolve(qkv)
    attn.reset_cache()
    parts = [attn._convolve(qkv[:, :1]), attn._convolve(qkv[:, 1:5]), attn._convolve(qkv[:, 5:])]
    assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-6)
    # by hand: position t mixes t, t-1, t-2 (nothing before the start)
    w = attn.dconv_weight
    assert torch.allclose(whole[:, 3], w[0] * qkv[:, 3] + w[1] * qkv[:, 2] + w[2] * qkv[:, 1], atol=1e-6)
    assert torch.allclose(whole[:, 0], w[0] * qkv[:, 0], atol=1e-6)
    # a document start in row 1 forgets that row's history only
    attn._convolve(qkv[:, :4])
    attn._start_documents(torch.tensor([False, True]))
    after = attn._convolve(qkv[:, 4:])
    assert torch.allclose(after[0], whole[0, 4:], atol=1e-6)
    attn.reset_cache()
    assert torch.allclose(after[1], attn._convolve(qkv[:, 4:])[1], atol=1e-6)


def test_dconv_starts_as_the_plain_layer_and_checks_its_width():
    torch.manual_seed(0)
    plain = LocalAttention(DIM, H, D, xl_cache=True, smear_keys=True)
    conv = LocalAttention(DIM, H, D, xl_cache=True, smear_keys=True, dconv=4)
    conv.load_state_dict(plain.state_dict(), strict=False)
    for x in segments(2):
        assert torch.allclose(plain(x), conv(x), atol=1e-6)
    assert not hasattr(LocalAttention(DIM, H, D, dconv=1), "dconv_weight")
    with pytest.raises(ValueError, match="dconv must be an int >= 0, got -1"):
        LocalAttention(DIM, H, D, dconv=-1)
