"""Multi-node scenarios on `ray.cluster_utils.Cluster` (head without CPUs + one-CPU worker nodes).

Run as a subprocess by test_multinode.py (a Cluster must own its process' Ray connection):
    python -m tests.integration.multinode cache <source> <output>
    python -m tests.integration.multinode train <cache> <output>
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


def cache(source: str, output: str) -> dict:
    cluster, nodes = start(3)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=cache_teacher.main(
        [*TINY, f"source={source}", f"output={output}", "shard_size=2", "teacher.batch_images=1"])))
    job.start()
    deadline, actor_nodes = time.monotonic() + 240, set()
    while job.is_alive() and not (actor_nodes and shards.committed_shards(Storage(), output)):
        assert time.monotonic() < deadline, "no commit within 240 s"
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


def train(cache_url: str, output: str) -> dict:
    start(2)
    metrics = train_student.main([f"cache={cache_url}", f"output={output}", "name=multinode", "epochs=1",
                                  "scaling.num_workers=2", "scaling.cpus_per_worker=1", "data.loader_workers=1"])
    # what the jobs' shared-storage check sees on each node: a path they all have, and one none has
    return {"metrics": metrics, "nodes": len([n for n in ray.nodes() if n["Alive"]]),
            "missing_cache": nodes_missing(cache_url), "missing_elsewhere": nodes_missing(cache_url + "-elsewhere")}


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mode, a, b = sys.argv[1:4]
    out = {"cache": cache, "train": train}[mode](a, b)
    print("RESULT " + json.dumps(out, default=str), flush=True)
    ray.shutdown()
