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
