"""Every file in infra/ names entry points, configs and images that exist and parse."""
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.cache.job import CacheConfig
from pipeline.config import parse_config
from pipeline.plan import PlanConfig
from pipeline.train.job import TrainConfig
from pipeline.train.engine import deepspeed_config

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
SCHEMAS = {"jobs/cache_teacher.py": CacheConfig, "jobs/train_student.py": TrainConfig, "jobs/plan.py": PlanConfig}
YAMLS = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))


def _walk(node, key=None):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)
    else:
        yield key, node


def _image_built_here() -> str:
    """The tag infra/Dockerfile documents building, at the project's version."""
    text = (INFRA / "Dockerfile").read_text()
    tag = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", text).group(1)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert tag.endswith(f":{version}"), (tag, version)
    return tag


def test_there_are_manifests():
    names = {p.name for p in YAMLS}
    assert {"aws-gpu.yaml", "raycluster.yaml", "rayjob-cache.yaml", "rayjob-train.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_names_existing_things(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} is empty"
    image = _image_built_here()
    for doc in docs:
        for key, value in _walk(doc):
            if key == "image":
                assert value == image, f"{path}: image {value} is not the one infra/Dockerfile builds ({image})"
            if key == "entrypoint":
                _check_entrypoint(str(value))
        if doc.get("kind") == "RayCluster" or "available_node_types" in doc:
            _check_cluster(doc)


def _check_entrypoint(command: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1] in SCHEMAS, command
    assert (REPO / argv[1]).is_file()
    cfg = parse_config(SCHEMAS[argv[1]], argv[2:])  # every key exists and has the right type
    for arg in argv[2:]:
        key, _, value = arg.partition("=")
        if value.startswith("infra/"):
            assert (REPO / value).is_file(), f"{arg}: no such file"
    if argv[1] == "jobs/train_student.py" and cfg.deepspeed_config:
        extra = json.loads((REPO / cfg.deepspeed_config).read_text())
        assert deepspeed_config(cfg, 16, extra)["zero_optimization"]["stage"] == extra["zero_optimization"]["stage"]


def _check_cluster(doc: dict) -> None:
    if "available_node_types" in doc:
        assert doc["head_node_type"] in doc["available_node_types"]
        for local in doc.get("file_mounts", {}).values():
            assert (REPO / local).exists()
    else:
        assert doc["spec"]["headGroupSpec"] and doc["spec"]["workerGroupSpecs"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs_parse_and_say_their_stage(stage):
    cfg = json.loads((INFRA / "deepspeed" / f"zero{stage}.json").read_text())
    assert cfg["zero_optimization"]["stage"] == stage


def test_dockerfile_copies_what_exists():
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for src in shlex.split(line)[1:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), line


@pytest.mark.parametrize("kw,expected", [
    # a laptop: no GPU now, no autoscaler -> CPU actors, no flags needed
    (dict(device="auto", gpus_now=0, gpus_max=0), (0.0, 0.5, 2, 2)),
    # the documented AWS cluster: CPU head, GPU workers from 0 to 8 -> GPU demand from the start
    (dict(device="auto", gpus_now=0, gpus_max=8), (1.0, 1.0, 1, 8)),
    (dict(device="auto", gpus_now=2, gpus_max=8), (1.0, 1.0, 2, 8)),
    (dict(device="auto", gpus_now=4, gpus_max=0), (1.0, 1.0, 4, 4)),  # a fixed GPU cluster
    (dict(device="cuda", gpus_now=0, gpus_max=0), (1.0, 1.0, 1, 1)),
    (dict(device="cpu", gpus_now=4, gpus_max=8), (0.0, 0.5, 2, 2)),
    (dict(device="auto", gpus_now=0, gpus_max=0, num_gpus=1), (1.0, 1.0, 1, 1)),
    (dict(device="auto", gpus_now=0, gpus_max=8, num_gpus=0.5, min_actors=2), (0.5, 1.0, 2, 16)),
    (dict(device="auto", gpus_now=0, gpus_max=8, num_actors=3), (1.0, 1.0, 3, 3)),
    (dict(device="auto", gpus_now=0, gpus_max=10**6), (1.0, 1.0, 1, None)),  # no GPU limit
])
def test_actor_pools_follow_the_config_the_cluster_and_its_autoscaler(kw, expected):
    from pipeline.ray_utils import resolve_pool

    args = dict(num_gpus=-1.0, num_cpus=-1.0, num_actors=0, min_actors=0, max_actors=0, cpu_nodes=2) | kw
    pool = resolve_pool(**args)
    assert (pool.num_gpus, pool.num_cpus, pool.min_size, pool.max_size) == expected
