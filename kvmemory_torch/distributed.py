"""Multi-process training with torch.distributed: memories stay on the rank that owns their batch rows.

Data parallelism splits the global batch into ``world_size`` contiguous
blocks of rows; rank r trains on block r. A KNNAttention memory belongs to
batch rows (row i of the memory holds row i's past), so each rank's layer
holds the memory of its own rows only, as the paper's JAX code keeps memory
local per device. ``DistributedDataParallel`` all-reduces the gradients and
nothing else: a memory is neither a parameter nor a buffer of the module
(it is a plain attribute, as are the XL caches), so DDP never broadcasts or
averages it, and no wrapping is needed: build the model the same way on
every rank (a memory given as a dict takes its batch_size from the first,
local, batch), wrap it in ``DistributedDataParallel`` as usual and feed each
rank ``local_rows(batch)``. Every parameter, the memory gate included, is
used by every forward, so ``find_unused_parameters`` is not needed.

Averaging over ranks equals the single-process mean over the global batch
when every rank holds the same number of rows (the loss is a per-token
mean), which :func:`rank_rows` enforces.

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) are one
directory: ``model.pt`` (model and optimizer state, identical on every rank,
written by rank 0) and ``rank<r>/`` per rank: ``memory<i>.npz`` for the i-th
KNNAttention (``Memory.save``) and ``state.pt`` with the layers' XL caches.
A checkpoint loads only into the same world size: rank r's memories hold
the rows of block r.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from kvmemory import Memory

from .attention import KNNAttention
from .local_attention import LocalAttention

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the arguments, else the initialised process group's, else (0, 1)."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    return rank, world_size


def rank_rows(global_batch: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """The global batch rows rank ``rank`` owns: block ``rank`` of ``world_size`` equal contiguous blocks.

    ``rank`` and ``world_size`` default to the process group's (0 and 1
    without one). ``global_batch`` must be divisible by ``world_size``, so
    every rank has the same rows per step and the mean of the ranks' losses
    is the global batch's loss.
    """
    rank, world_size = _world(rank, world_size)
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch must be a positive int, got {global_batch!r}")
    if global_batch % world_size:
        raise ValueError(f"global_batch={global_batch} must be divisible by world_size={world_size} "
                         f"(every rank owns the same number of memory rows)")
    per = global_batch // world_size
    return slice(rank * per, (rank + 1) * per)


def local_rows(batch: torch.Tensor, rank: int | None = None, world_size: int | None = None) -> torch.Tensor:
    """This rank's rows of a global batch tensor [global_batch, ...] (see :func:`rank_rows`)."""
    return batch[rank_rows(batch.shape[0], rank, world_size)]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper; the model itself otherwise."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _rank_dir(directory, rank: int) -> str:
    return os.path.join(os.fspath(directory), f"rank{rank}")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(directory, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None, rank: int | None = None, world_size: int | None = None) -> None:
    """Write model (+ optimizer, ``extra``) once and this rank's memories and XL caches; call on every rank.

    Rank 0 writes ``directory/model.pt``; every rank writes ``directory/rank<r>/``
    (see the module docstring). With a process group the call ends with a
    barrier, so the whole checkpoint exists when it returns on any rank.
    """
    rank, world_size = _world(rank, world_size)
    model = unwrap(model)
    os.makedirs(_rank_dir(directory, rank), exist_ok=True)
    if rank == 0:
        torch.save({"model": model.state_dict(),
                    "optimizer": None if optimizer is None else optimizer.state_dict(),
                    "extra": extra, "world_size": world_size},
                   os.path.join(os.fspath(directory), MODEL_FILE))
    memories, caches = [], []
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, KNNAttention)):
        if layer.memory is not None:
            layer.memory.save(os.path.join(_rank_dir(directory, rank), f"memory{i}.npz"))
        memories.append(layer.memory is not None)
    for layer in (m for m in model.modules() if isinstance(m, LocalAttention)):
        caches.append({"xl": layer._xl, "last_key": layer._last_key})
    torch.save({"rank": rank, "world_size": world_size, "memories": memories, "caches": caches},
               os.path.join(_rank_dir(directory, rank), STATE_FILE))
    _barrier()


def load_checkpoint(directory, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    rank: int | None = None, world_size: int | None = None, map_location="cpu",
                    **memory_overrides):
    """Restore what :func:`save_checkpoint` wrote into ``model`` (and ``optimizer``); returns its ``extra``.

    Every rank reads ``model.pt`` and its own ``rank<r>/``; the KNNAttention
    layers get the loaded memories (``Memory.load(path, **memory_overrides)``,
    e.g. ``device="cuda:1"`` for a torch-backend memory moving GPU) and every
    attention layer its XL cache, moved by ``map_location``. The model must
    have the checkpoint's architecture and the run the checkpoint's world size. Files are read with
    ``torch.load(weights_only=True)``: ``extra`` may hold tensors, numbers, strings, lists and dicts.
    """
    rank, world_size = _world(rank, world_size)
    model = unwrap(model)
    saved = torch.load(os.path.join(os.fspath(directory), MODEL_FILE), map_location=map_location,
                       weights_only=True)
    if saved["world_size"] != world_size:
        raise ValueError(f"checkpoint {os.fspath(directory)!r} was written by {saved['world_size']} ranks, "
                         f"this run has world_size={world_size}: each rank's memories hold its own rows")
    state_path = os.path.join(_rank_dir(directory, rank), STATE_FILE)
    if not os.path.exists(state_path):
        raise FileNotFoundError(f"checkpoint {os.fspath(directory)!r} has no state for rank {rank} ({state_path})")
    state = torch.load(state_path, map_location=map_location, weights_only=True)
    knn = [m for m in model.modules() if isinstance(m, KNNAttention)]
    local = [m for m in model.modules() if isinstance(m, LocalAttention)]
    if len(knn) != len(state["memories"]) or len(local) != len(state["caches"]):
        raise ValueError(f"checkpoint has {len(state['memories'])} memory layers and {len(state['caches'])} "
                         f"attention layers, the model {len(knn)} and {len(local)}")
    model.load_state_dict(saved["model"])
    if optimizer is not None:
        if saved["optimizer"] is None:
            raise ValueError(f"checkpoint {os.fspath(directory)!r} holds no optimizer state")
        optimizer.load_state_dict(saved["optimizer"])
    for i, (layer, has_memory) in enumerate(zip(knn, state["memories"])):
        if has_memory:
            layer.memory = Memory.load(os.path.join(_rank_dir(directory, rank), f"memory{i}.npz"),
                                       **memory_overrides)
        elif layer.memory is not None:
            layer.memory.clear()
    for layer, cache in zip(local, state["caches"]):
        layer._xl, layer._last_key = cache["xl"], cache["last_key"]
    return saved["extra"]
