"""Attach to a Ray cluster or start a local one, the same way in every job; size actor pools
(teacher, evaluation) from the config and what the cluster and its autoscaler can offer."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

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


def accelerator_types() -> tuple[str, ...]:
    """The GPU models the cluster's nodes report (Ray's ``accelerator_type:<model>`` resources)."""
    return tuple(sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:")))


def autoscaler_gpus() -> int:
    """The most GPUs the cluster's autoscaler says it can have (its node types x their max counts, as
    Ray Train and Ray Data read it); 0 without an autoscaler, or one without GPU node types."""
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception as e:  # a private API: never let it break a job that runs without it
        log.debug("no autoscaler config: %s", e)
        return 0
    return int(most.get("GPU", 0) or 0)


UNBOUNDED = 10**6  # an autoscaler without a GPU limit


@dataclass(frozen=True)
class ActorPool:
    """Resources of each actor of a pool (teacher or evaluation) and the pool's size range."""

    num_gpus: float
    num_cpus: float
    min_size: int
    max_size: int | None  # None: no limit (Ray Data grows the pool while there is work and room)
    why: str = ""

    def strategy(self):
        from ray.data import ActorPoolStrategy

        return ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size)

    def describe(self) -> str:
        size = f"{self.min_size}" if self.min_size == self.max_size else f"{self.min_size}..{self.max_size or 'any'}"
        return f"{size} actor(s), {self.num_gpus:g} GPU + {self.num_cpus:g} CPU each ({self.why})"


def resolve_pool(*, device: str, num_gpus: float, num_cpus: float, num_actors: int, min_actors: int,
                 max_actors: int, gpus_now: int, gpus_max: int, cpu_nodes: int) -> ActorPool:
    """The pool a job asks Ray for (pure: the cluster's numbers are arguments). Negative resources
    and zero sizes mean "default":

    - GPUs per actor: 0 with ``device=cpu``; else 1 when the cluster has GPUs, its autoscaler can add
      some, or ``device=cuda``; else 0 (a machine without GPUs runs CPU actors with no flags).
    - size: ``num_actors`` fixes it. GPU actors range from the GPUs there now (at least 1) to the
      GPUs the autoscaler can reach, so pending GPU actors are demand the autoscaler sees and the
      pool grows as GPU nodes join. CPU actors: one per CPU node.
    """
    if num_gpus >= 0:
        gpus, why = num_gpus, "as configured"
    elif device == "cpu":
        gpus, why = 0.0, "device=cpu"
    elif gpus_now or gpus_max or device == "cuda":
        gpus, why = 1.0, f"{gpus_now} GPU(s) in the cluster, up to {gpus_max} with its autoscaler"
    else:
        gpus, why = 0.0, "no GPU in the cluster and none its autoscaler can add"
    cpus = num_cpus if num_cpus >= 0 else (1.0 if gpus else 0.5)
    if num_actors:
        return ActorPool(gpus, cpus, num_actors, num_actors, why)
    if gpus:
        lo = min_actors or max(1, int(gpus_now / gpus))
        reach = int(max(gpus_now, gpus_max) / gpus)
        hi = max_actors or (None if reach >= UNBOUNDED else max(lo, reach))
    else:
        lo = min_actors or cpu_nodes
        hi = max_actors or lo
    if hi is not None and hi < lo:
        raise ValueError(f"max_actors={hi} is below min_actors={lo}")
    return ActorPool(gpus, cpus, lo, hi, why)


def actor_pool(*, device: str, num_gpus: float, num_cpus: float, num_actors: int = 0, min_actors: int = 0,
               max_actors: int = 0, cpu_actors: int | None = None) -> ActorPool:
    """`resolve_pool` with this cluster's numbers (call after `init_ray`); CPU actors default to
    `cpu_actors`, else one per CPU node."""
    return resolve_pool(device=device, num_gpus=num_gpus, num_cpus=num_cpus, num_actors=num_actors,
                        min_actors=min_actors, max_actors=max_actors, gpus_now=cluster_gpus(),
                        gpus_max=min(autoscaler_gpus(), UNBOUNDED), cpu_nodes=cpu_actors or cpu_nodes())


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
