"""Build shards on Ray: a pool of actors, each holding one embedder, each building whole shards.

Embedding is the expensive step (GPU-bound where there is a GPU), so each
actor loads its embedder once and then runs :func:`kvmemory.retro.build.build_shard`
on one shard after another, as the pool hands them out (``ActorPool.map_unordered``).
Workers read the documents and write their shard into the store themselves, so
the store (and, for file documents, the document folder) must be on a file
system every worker sees; the driver only plans, waits and writes the manifest.
Each actor asks for ``num_cpus=1`` (and one GPU, when ``gpus_per_worker`` is set)
and runs torch with one thread per CPU it holds.

Install with ``pip install 'kvmemory[ray]'``.
"""

from __future__ import annotations

import os

from .build import BuildSettings, build_shard
from .progress import Bar


def _ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"building on Ray needs ray ({e}): pip install 'kvmemory[ray]'") from e
    return ray


def _worker_settings(settings: BuildSettings, cpus: int) -> BuildSettings:
    """Settings for a worker: progress bars off, torch threads = the CPUs the actor holds (MiniLM)."""
    opts = dict(settings.embedder_options)
    if settings.embedder == "minilm" and "num_threads" not in opts:
        opts["num_threads"] = cpus
    return BuildSettings(**{**settings.__dict__, "embedder_options": opts, "show_progress": False})


def run_on_ray(store: str, jobs: list, settings: BuildSettings, workers: int, address: str | None = None,
               cpus_per_worker: int = 1, gpus_per_worker: float = 0) -> list:
    """Build ``jobs`` (ShardJobs) with ``workers`` Ray actors; returns each shard's stats.

    Starts a local Ray instance with ``workers * cpus_per_worker`` CPUs unless Ray is
    already initialised or ``address`` names a cluster; shuts it down again only if it started it.
    """
    ray = _ray()
    from ray.util import ActorPool

    started = False
    if not ray.is_initialized():
        # workers import kvmemory from the same place as the driver (a source checkout need not be installed)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        kwargs = {"address": address} if address else {"num_cpus": workers * cpus_per_worker}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}}, **kwargs)
        started = True
    try:
        remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(ShardBuilder)
        wsettings = _worker_settings(settings, cpus_per_worker)
        actors = [remote.remote(wsettings) for _ in range(workers)]
        pool = ActorPool(actors)
        bar = Bar(sum(j.chunks for j in jobs), f"build on {workers} Ray workers", settings.show_progress,
                  unit="chunk")
        sizes = {j.name: j.chunks for j in jobs}
        out = []
        try:
            for stats in pool.map_unordered(lambda a, job: a.build.remote(store, job), jobs):
                out.append(stats)
                bar.update(sizes[stats["name"]])
        finally:
            bar.close()
            for a in actors:
                ray.kill(a)
        return out
    finally:
        if started:
            ray.shutdown()


class ShardBuilder:
    """A Ray actor: one embedder, loaded once, building shard after shard."""

    def __init__(self, settings: BuildSettings):
        self.settings = settings
        self.embedder = settings.make_embedder()

    def build(self, store: str, job) -> dict:
        return build_shard(store, job, self.settings, self.embedder)
