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


class NotOnEveryNode(FileNotFoundError):
    """A local path that this machine sees and other nodes of the cluster do not."""


def nodes_missing(path: str) -> list[str]:
    """Alive nodes (``<ip>/<node id prefix>``) on which the local `path` does not exist; [] on a
    one-node cluster."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return []
    exists = ray.remote(num_cpus=0)(os.path.exists)
    refs = {f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}": exists.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path) for n in nodes}
    return [name for name, ref in refs.items() if not ray.get(ref)]


def require_on_every_node(url: str, what: str) -> None:
    """Refuse a local `url` that some node of the cluster cannot see (before any work starts):
    its tasks would read nothing, or write where nobody looks."""
    from pipeline import storage

    if not storage.is_local(url):
        return
    missing = nodes_missing(storage.local_path(url))
    if missing:
        raise NotOnEveryNode(
            f"{what} {url} is a local path that {len(missing)} node(s) of the cluster do not see "
            f"({', '.join(missing[:4])}): on a multi-node cluster use shared storage, an object store URL "
            "(s3://bucket/...) or a filesystem mounted at the same path on every node")
