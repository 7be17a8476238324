"""Attach to a Ray cluster or start a local one, the same way in every job."""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Connect to Ray. Returns True if this call started a local cluster (the caller shuts it down).

    Order: an already initialised Ray (e.g. inside a Ray job or task); an explicit `address`;
    ``RAY_ADDRESS`` (set by ``ray job submit`` for entrypoints); otherwise a new local cluster.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("attached to Ray cluster at %s: %s", address, ray.cluster_resources())
        return False
    # address="local": never attach to a stale cluster recorded in /tmp/ray
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)
    log.info("started a local Ray cluster: %s", ray.cluster_resources())
    return True


def cluster_gpus() -> int:
    """GPUs in the cluster right now."""
    return int(ray.cluster_resources().get("GPU", 0))


def cpu_nodes() -> int:
    """Alive nodes that offer CPUs (CPU-only clusters get one teacher actor per node)."""
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0))
