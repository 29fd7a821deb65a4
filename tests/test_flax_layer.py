"""The Flax NNX KNNAttention layer and reference decoder: behaviour of the torch layer, gradients, jitted training."""

import importlib.util
import os

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import kvmemory_jax as kvj  # noqa: E402
from kvmemory_jax.layer import knn_layers, reset_memories  # noqa: E402

B, T, DIM, H, D = 2, 4, 8, 2, 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layer(capacity=6, **options):
    return kvj.KNNAttention(DIM, H, D, batch_size=B, capacity=capacity, k=3, rngs=nnx.Rngs(0), **options)


def segments(n, seed=1):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((B, T, DIM)), jnp.float32) for _ in range(n)]


def test_matches_the_torch_layer_through_fifo_doc_starts_and_xl_cache():
    """Same weights, same segments: outputs of kvmemory_torch.KNNAttention (exact memory) within 1e-6."""
    torch = pytest.importorskip("torch")
    import kvmemory
    import kvmemory_torch

    torch.manual_seed(0)
    for xl in (False, True):
        memory = kvmemory.Memory(D, D, 6, H, B, backend="exact")
        ours = layer(xl_len=T if xl else 0, gate_init=0.3)
        theirs = kvmemory_torch.KNNAttention(DIM, H, D, memory, k=3, xl_cache=xl, gate_init=0.3)
        for name in ("to_q", "to_k", "to_v", "to_out"):
            getattr(ours, name).kernel[...] = jnp.asarray(getattr(theirs, name).weight.detach().numpy().T)
        with torch.no_grad():
            theirs.log_scale += 0.25
        ours.log_scale[...] = jnp.asarray(theirs.log_scale.detach().numpy())
        for i, x in enumerate(segments(5)):               # capacity 6 < 2 segments: FIFO wraps
            starts = np.array([i == 3, i == 2])
            want = theirs(torch.from_numpy(np.array(x)), doc_start=torch.from_numpy(starts)).detach().numpy()
            np.testing.assert_allclose(np.asarray(ours(x, jnp.asarray(starts))), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(kvj.size(ours.memory.get_value())), memory.size)


def test_gradients_reach_queries_gate_and_scale_never_the_memory():
    model = layer(capacity=16)
    first, x = segments(2)
    model(first)
    model.memory.set_value(kvj.clear(model.memory.get_value(), jnp.array([False, True])))  # row 1: empty memory
    memory_before = jax.tree.map(np.asarray, model.memory.get_value())

    def loss(model, x):
        return (model(x, update_memory=False) ** 2).sum()

    grads = nnx.grad(loss)(model, x)
    for g in (grads["gate_bias"], grads["log_scale"], grads["to_q"]["kernel"]):
        assert np.abs(np.asarray(g[...])).sum() > 0
    assert "memory" not in grads                                                    # not a parameter
    for a, b in zip(jax.tree.leaves(model.memory.get_value()), jax.tree.leaves(memory_before)):
        np.testing.assert_array_equal(np.asarray(a), b)                              # read only
    # row 1 sees no memory whatever the gate: its output does not move with gate_bias
    g_rows = jax.grad(lambda b: layer_out(model, x, b)[1].sum())(model.gate_bias[...])
    assert not np.asarray(g_rows).any()
    assert np.asarray(jax.grad(lambda b: layer_out(model, x, b)[0].sum())(model.gate_bias[...])).any()


def layer_out(model, x, gate_bias):
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state, copy=True)
    clone.gate_bias[...] = gate_bias
    return clone(x, update_memory=False)


def test_update_memory_reset_and_bad_input():
    model = layer(xl_len=2)
    x = segments(1)[0]
    model(x, update_memory=False)
    assert np.asarray(kvj.size(model.memory.get_value())).tolist() == [0, 0]
    model(x)
    assert np.asarray(kvj.size(model.memory.get_value())).tolist() == [T, T]
    assert np.asarray(model.xl.get_value()[2]).all()
    reset_memories(model)
    assert np.asarray(kvj.size(model.memory.get_value())).tolist() == [0, 0] and not model.xl.get_value()[2].any()
    assert knn_layers(model) == [model]
    with pytest.raises(ValueError, match=r"x must be \[batch=2, tokens, dim=8\], got shape \(3, 4, 8\)"):
        model(jnp.ones((3, T, DIM)))
    with pytest.raises(ValueError, match=r"mask must be a bool array \[batch=2\], got int32"):
        model(x, jnp.array([1, 0]))
    with pytest.raises(ValueError, match="method must be one of"):
        layer(method="ivf")
    with pytest.raises(ValueError, match="xl_len must be an int >= 0"):
        layer(xl_len=-1)


def load_example():
    spec = importlib.util.spec_from_file_location("train_flax_memory", os.path.join(ROOT, "examples", "train_flax_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--steps", "4", "--scan", "4", "--batch", "2", "--tokens", "8", "--vocab", "16", "--dim", "16",
        "--depth", "1", "--heads", "2", "--capacity", "12", "--k", "4", "--xl"]


def test_scanned_train_step_equals_the_jitted_loop():
    """The example's pure train step: lax.scan over 4 segments == 4 jitted calls (losses, parameters, memory)."""
    example = load_example()
    scanned = example.train(example.parse(TINY + ["--mode", "scan"]), log=lambda *_: None)
    looped = example.train(example.parse(TINY + ["--mode", "loop"]), log=lambda *_: None)
    np.testing.assert_allclose(scanned["losses"], looped["losses"], rtol=2e-5)
    for a, b in zip(jax.tree.leaves(scanned["carry"]), jax.tree.leaves(looped["carry"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    (state,) = [m for m in jax.tree.leaves(scanned["carry"][1], is_leaf=lambda x: isinstance(x, kvj.MemoryState))
                if isinstance(m, kvj.MemoryState)]
    _, starts = example.documents(4, 2, 8, 16, 0)
    last_start = [max(i for i in range(4) if starts[i, b]) for b in range(2)]
    assert np.asarray(kvj.size(state)).tolist() == [min(12, 8 * (4 - s)) for s in last_start]  # cleared at doc starts


def test_nnx_jit_train_step_carries_the_memory():
    """The stateful NNX style: nnx.jit + nnx.Optimizer; the memory fills across steps, parameters move."""
    model = kvj.MemorizingTransformer(16, dim=16, depth=1, num_heads=2, batch_size=B, capacity=12, k=4, max_len=T,
                                      rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens, doc_start):
        def loss_fn(model):
            logits = model(tokens[:, :-1], doc_start)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (3, B, T + 1)), jnp.int32)
    gate = np.asarray(model.knn_attention.gate_bias[...])
    for i in range(3):
        step(model, optimizer, tokens[i], jnp.array([i == 2, False]))
    assert np.asarray(kvj.size(model.knn_attention.memory.get_value())).tolist() == [T, 3 * T]
    assert not np.allclose(np.asarray(model.knn_attention.gate_bias[...]), gate)
