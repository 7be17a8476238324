"""Multi-node scenarios on `ray.cluster_utils.Cluster` (head without CPUs + one-CPU worker nodes).

Run as a subprocess by test_multinode.py (a Cluster must own its process' Ray connection):
    python -m tests.integration.multinode <source> <cache> <runs> <gpu source> <gpu cache>
Prints one JSON line with what happened.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from jobs import cache_teacher, train_student
from pipeline.cache import shards
from pipeline.ray_utils import nodes_missing
from pipeline.storage import Storage

FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                          "health_check_initial_delay_ms": 0}
TINY = ["backbone=maskclip-test", "augment.scale=[224,160]", "augment.min_side=64"]


def start(workers: int) -> tuple[Cluster, list]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_FAILURE_DETECTION})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    return cluster, nodes


def teacher_actor_nodes() -> list[str]:
    from ray.util.state import list_actors

    return [a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")]) if "TeacherActor" in a.class_name]


def scenarios(source: str, output: str, runs: str, gpu_source: str, gpu_output: str) -> dict:
    """The cache job on 3 one-CPU nodes, one of them (running a teacher actor) removed mid-job; then
    training on the two nodes left; then a cache job with default settings while a GPU node joins
    (the head has neither CPUs nor GPUs: only an autoscaler could bring the teacher a GPU)."""
    cluster, nodes = start(3)
    try:
        result = cache(cluster, nodes, source, output)
        result["train"] = train(output, runs)
        result["gpu_join"] = gpu_join(cluster, gpu_source, gpu_output)
    finally:
        ray.shutdown()
        cluster.shutdown()  # also forgets the cluster's address (/tmp/ray/ray_current_cluster)
    return result


def cache(cluster: Cluster, nodes: list, source: str, output: str) -> dict:
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=cache_teacher.main(
        [*TINY, f"source={source}", f"output={output}", "shard_size=2", "teacher.batch_images=1",
         "shards_per_commit=1"])))  # each shard commits as it lands: the first commit is mid-job
    job.start()
    deadline, actor_nodes = time.monotonic() + 600, set()  # at nice 10 beside other tests: minutes, not seconds
    while job.is_alive() and not (actor_nodes and shards.committed_shards(Storage(), output)):
        assert time.monotonic() < deadline, "no commit within 600 s"
        actor_nodes |= set(teacher_actor_nodes())
        time.sleep(0.2)
    victim = next(n for n in nodes if n.node_id in actor_nodes)  # a node running a teacher actor
    running_at_removal = job.is_alive()
    committed_at_removal = len(shards.committed_shards(Storage(), output))
    cluster.remove_node(victim)  # main thread only (Ray requirement)
    job.join(timeout=600)
    result.update(actor_nodes=sorted(set(actor_nodes)), removed=victim.node_id, running_at_removal=running_at_removal,
                  committed_at_removal=committed_at_removal, finished=not job.is_alive())
    return result


def announce_gpu_node_type(max_count: int) -> None:
    """What a Ray autoscaler reports to the cluster: the node types it can start (here one with a GPU,
    none of them running yet), as Ray Train and Ray Data read it."""
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_put

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu-workers", min_count=0, max_count=max_count)
    group.resources.update({"CPU": 1, "GPU": 1})
    _internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(),
                     namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)


def gpu_join(cluster: Cluster, source: str, output: str) -> dict:
    """An autoscaling GPU cluster as documented: a head without GPUs, GPU workers that come up after
    the job is submitted (here: added by hand; their GPU is a declared resource, the actor's torch
    runs on CPU inside it). The cache job runs with its defaults."""
    announce_gpu_node_type(max_count=1)
    earlier = {a.actor_id for a in _teacher_actors()}  # the first cache job's, dead by now
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=cache_teacher.main(
        [*TINY, f"source={source}", f"output={output}", "shard_size=2", "teacher.batch_images=1"])))
    job.start()
    deadline, seen = time.monotonic() + 60, set()
    while job.is_alive() and time.monotonic() < deadline and {a.actor_id for a in _teacher_actors()} <= earlier:
        time.sleep(0.2)  # the job has asked for its teacher pool (or is done)
    gpu = cluster.add_node(num_cpus=1, num_gpus=1)
    while job.is_alive():
        seen |= {a.node_id for a in _teacher_actors() if a.state == "ALIVE"}
        time.sleep(0.2)
    job.join()
    return {"summary": result.get("summary"), "actor_nodes": sorted(seen), "gpu_node": gpu.node_id}


def _teacher_actors() -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors() if "TeacherActor" in a.class_name]


def train(cache_url: str, output: str) -> dict:
    # val_fraction=0: every sample trains, whichever images the source paths (under tmp) hash into a held-out set
    metrics = train_student.main([f"cache={cache_url}", f"output={output}", "name=multinode", "epochs=1",
                                  "scaling.num_workers=2", "scaling.cpus_per_worker=1", "data.loader_workers=1",
                                  "val_fraction=0"])
    # what the jobs' shared-storage check sees on each node: a path they all have, and one none has
    return {"metrics": metrics, "nodes": len([n for n in ray.nodes() if n["Alive"]]),
            "missing_cache": nodes_missing(cache_url), "missing_elsewhere": nodes_missing(cache_url + "-elsewhere")}


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    out = scenarios(*sys.argv[1:])
    print("RESULT " + json.dumps(out, default=str), flush=True)
