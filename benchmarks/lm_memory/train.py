"""One configuration of the experiment: its model, its training run, checkpoints and resuming."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

import kvmemory
from kvmemory.atomic import atomic_open
from kvmemory_torch import MemorizingTransformer, reset_memories

from ..training import adamw, warmup_cosine
from .corpus import fingerprint
from .instrument import ProbedMemory
from .presets import Preset
from .progress import RunProgress
from .stream import Batch, TrainStream

VOCAB = 256
LN2 = math.log(2)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A configuration: what model, trained on what, for how long, from what."""

    name: str                      # e.g. "code/mem-4k"
    corpus: str                    # "code", "prose" or "copy"
    memory: int | None = None      # memory capacity (tokens per row and head); None: no memory
    backend: str = "exact"
    xl: bool = False               # XL cache in every layer
    steps: int = 0
    start_from: str | None = None  # a finished run whose final weights this one starts from
    warmup: int = 0

    @property
    def label(self) -> str:
        return self.name.split("/", 1)[1]


def exact_backend(preset: Preset) -> str:
    """The exact backend that suits the device: numpy's on CPU, torch's (device-resident) on GPU."""
    return "torch" if preset.device.startswith("cuda") else "exact"


def build_model(preset: Preset, spec: RunSpec, weights: dict | None = None) -> MemorizingTransformer:
    """The preset's model for ``spec``; ``weights`` (a memory-less state dict) are loaded before the memory is added."""
    torch.manual_seed(preset.seed)
    model = MemorizingTransformer(VOCAB, dim=preset.dim, depth=preset.depth, num_heads=preset.heads,
                                  xl_cache=spec.xl, smear_keys=preset.smear_keys, dconv=preset.dconv,
                                  knn_layer=preset.knn_layer)
    if weights is not None:
        model.load_state_dict(weights)
    if spec.memory is not None:
        options = {"device": preset.device} if spec.backend == "torch" else {}
        memory = kvmemory.Memory(key_dim=model.head_dim, capacity=spec.memory, num_heads=preset.heads,
                                 batch_size=preset.batch, backend=spec.backend, metric="ip", **options)
        layer = model.add_memory(memory, k=preset.k, gate_init=0.0)
        layer.memory = ProbedMemory(memory)
    return model.to(preset.device)


def probe(model) -> ProbedMemory | None:
    """The ProbedMemory of the model's memory layer, if it has one."""
    layer = model.knn_attention
    return layer.memory if layer is not None and isinstance(layer.memory, ProbedMemory) else None


def batch_tensors(batch: Batch, device: str):
    return (torch.from_numpy(batch.inputs).to(device), torch.from_numpy(batch.targets).to(device),
            torch.from_numpy(batch.valid).to(device), torch.from_numpy(batch.doc_start).to(device))


def token_bits(model, batch: Batch, device: str):
    """Forward one batch: per-target bits [B, T] (0 where not valid) and the valid mask."""
    inputs, targets, valid, doc_start = batch_tensors(batch, device)
    logits = model(inputs, doc_start=doc_start)
    nats = F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1), reduction="none")
    return nats.view(targets.shape) * valid / LN2, valid


def _save(path: str, payload: dict) -> None:
    with atomic_open(path) as f:
        torch.save(payload, f)


def run_dir(work_dir: str, spec: RunSpec) -> str:
    return os.path.join(work_dir, *spec.name.split("/"))


def final_weights(work_dir: str, spec_name: str) -> dict:
    path = os.path.join(work_dir, *spec_name.split("/"), "final.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["model"]


def train(preset: Preset, spec: RunSpec, docs, work_dir: str, base_weights: dict | None = None,
          show_progress: bool = True):
    """Train ``spec`` (resuming from its checkpoint if one matches); returns (model, train summary).

    ``base_weights``: the start_from run's final weights (retrofit / continued runs).
    """
    folder = run_dir(work_dir, spec)
    os.makedirs(folder, exist_ok=True)
    final, ckpt = os.path.join(folder, "final.pt"), os.path.join(folder, "checkpoint.pt")
    identity = {"preset": preset.key(), "spec": dataclasses.asdict(spec), "data": fingerprint(docs)}

    model = build_model(preset, spec, base_weights)
    if os.path.exists(final):
        state = torch.load(final, map_location="cpu", weights_only=False)
        if state["identity"] == identity:
            model.load_state_dict(state["model"])
            return model, state["summary"]

    optimizer = adamw(model.parameters(), preset.lr)
    scheduler = warmup_cosine(optimizer, spec.steps, spec.warmup)
    stream = TrainStream(docs, preset.batch, preset.seg_len, seed=preset.seed)
    stats = {"step_s": [], "memory_s": [], "bits": [], "wall_s": 0.0}
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["identity"] == identity:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            stream.load_state(state["stream"])
            stats, start = state["stats"], state["step"]
            _replay(model, stream, preset.device)

    mem = probe(model)
    model.train()
    bar = RunProgress(spec.name, spec.steps, start, enabled=show_progress)
    for step in range(start, spec.steps):
        t0 = time.perf_counter()
        before = sum(mem.seconds.values()) if mem is not None else 0.0
        bits, valid = token_bits(model, stream.next(), preset.device)
        loss = bits.sum() / valid.sum().clamp(min=1) * LN2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if preset.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        stats["step_s"].append(dt)
        stats["memory_s"].append((sum(mem.seconds.values()) - before) if mem is not None else 0.0)
        stats["bits"].append(loss.item() / LN2)
        stats["wall_s"] += dt
        bar.update(step + 1, stats["bits"][-1], dt)
        if (step + 1) % preset.ckpt_every == 0 and step + 1 < spec.steps:
            _save(ckpt, {"identity": identity, "model": _model_state(model), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "stream": stream.state(), "stats": stats,
                         "step": step + 1})
    bar.close()

    summary = _summary(preset, spec, stats, model)
    _save(final, {"identity": identity, "model": _model_state(model), "summary": summary})
    if os.path.exists(ckpt):
        os.remove(ckpt)
    return model, summary


def _model_state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@torch.no_grad()
def _replay(model, stream: TrainStream, device: str) -> None:
    """Rebuild memories and XL caches of the documents in progress (see TrainStream.replay_batches)."""
    reset_memories(model)
    was_training = model.training
    model.eval()
    for batch in stream.replay_batches():
        token_bits(model, batch, device)
    model.train(was_training)


def _summary(preset: Preset, spec: RunSpec, stats: dict, model) -> dict:
    steps = len(stats["step_s"])
    timed = stats["step_s"][min(5, steps - 1):] if steps else []
    mem_timed = stats["memory_s"][min(5, steps - 1):] if steps else []
    tail = stats["bits"][-max(1, steps // 10):] if steps else []
    layer = model.knn_attention
    return {
        "steps": steps, "tokens": steps * preset.batch * preset.seg_len,
        "wall_s": stats["wall_s"], "step_s": statistics.median(timed) if timed else None,
        "memory_s_per_step": statistics.median(mem_timed) if mem_timed else None,
        "train_bits_per_byte_last10pct": statistics.fmean(tail) if tail else None,
        "train_curve": _curve(stats["bits"]),
        "gate": None if layer is None else torch.sigmoid(layer.gate_bias.detach()).cpu().tolist(),
    }


def _curve(bits: list, points: int = 50) -> list:
    """(step, mean bits/byte) at ``points`` evenly spaced windows of the training losses."""
    if not bits:
        return []
    w = max(1, len(bits) // points)
    return [(i + w, statistics.fmean(bits[i:i + w])) for i in range(0, len(bits) - w + 1, w)]
