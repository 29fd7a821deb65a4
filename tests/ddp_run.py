"""The training run tests/test_ddp.py compares: one process on the global batch, or one DDP rank on its rows.

A tiny MemorizingTransformer (exact memory of capacity 24, XL cache) trains
STEPS segments of SGD on fixed random tokens; row 1 starts a new document at
step 2. The run saves a checkpoint after step SAVE_AT, trains on, then a
fresh model loads the checkpoint and trains the same remaining steps.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kvmemory_torch import MemorizingTransformer, knn_layers
from kvmemory_torch import distributed as kd

GLOBAL_BATCH, TOKENS, VOCAB = 4, 6, 16
STEPS, SAVE_AT = 6, 3


def data():
    """tokens [STEPS, GLOBAL_BATCH, TOKENS + 1] and doc_start [STEPS, GLOBAL_BATCH] bool."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, TOKENS + 1), generator=g)
    starts = torch.zeros(STEPS, GLOBAL_BATCH, dtype=torch.bool)
    starts[0] = True
    starts[2, 1] = True
    return tokens, starts


def build(backend="exact"):
    torch.manual_seed(0)
    memory = {"capacity": 24, "backend": backend, **({"device": "cpu"} if backend == "torch" else {})}
    model = MemorizingTransformer(VOCAB, dim=16, depth=2, num_heads=2, memory=memory, k=4, xl_cache=True)
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def train(model, optimizer, tokens, starts, steps, rows=slice(None)):
    """Per step: the loss of these rows (mean over their tokens)."""
    losses = []
    for s in steps:
        x = tokens[s, rows]
        logits = model(x[:, :-1], starts[s, rows])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def memory_state(model) -> dict:
    """keys, values, counts of the model's memory, rows first, as tensors."""
    (layer,) = knn_layers(kd.unwrap(model))
    return {name: torch.as_tensor(arr).clone() for name, arr in layer.memory.backend.state_dict().items()}


def run(directory, rows=slice(None), rank=None, world_size=None, backend="exact", wrap=lambda m: m):
    """Train, checkpoint, train on; reload into a fresh model and train on again. Returns the record."""
    tokens, starts = data()
    model, optimizer = build(backend)
    model = wrap(model)
    before = train(model, optimizer, tokens, starts, range(SAVE_AT), rows)
    kd.save_checkpoint(directory, model, optimizer, extra={"step": SAVE_AT}, rank=rank, world_size=world_size)
    saved_memory = memory_state(model)
    after = train(model, optimizer, tokens, starts, range(SAVE_AT, STEPS), rows)
    final_memory = memory_state(model)

    fresh, fresh_optimizer = build(backend)
    fresh = wrap(fresh)
    extra = kd.load_checkpoint(directory, fresh, fresh_optimizer, rank=rank, world_size=world_size)
    loaded_memory = memory_state(fresh)
    resumed = train(fresh, fresh_optimizer, tokens, starts, range(extra["step"], STEPS), rows)
    return {"losses": before + after, "resumed": resumed, "saved_memory": saved_memory,
            "loaded_memory": loaded_memory, "final_memory": final_memory,
            "resumed_memory": memory_state(fresh),
            "params": {n: p.detach().clone() for n, p in kd.unwrap(model).named_parameters()}}


def worker(rank, world_size, directory, backends):
    """One DDP rank (gloo, CPU): per backend, trains on its rows and writes directory/<backend>/record<rank>.pt."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(directory, 'rendezvous')}",
                            rank=rank, world_size=world_size)
    try:
        for backend in backends:
            out = os.path.join(directory, backend)
            rows = kd.rank_rows(GLOBAL_BATCH)
            record = run(os.path.join(out, "checkpoint"), rows, backend=backend, wrap=DistributedDataParallel)
            losses = torch.tensor([record["losses"], record["resumed"] + [0.0] * SAVE_AT])
            dist.all_reduce(losses)     # per-token mean over the global batch (every rank has as many rows)
            record["global_losses"] = (losses[0] / world_size).tolist()
            record["global_resumed"] = (losses[1, :STEPS - SAVE_AT] / world_size).tolist()
            record["rows"] = rows
            torch.save(record, os.path.join(out, f"record{rank}.pt"))
    finally:
        dist.destroy_process_group()
