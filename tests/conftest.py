"""Test environment: everything local, offline and on loopback (see shared STACK notes)."""
import os

# Before ray / deepspeed / boto are imported anywhere.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray nodes on 127.0.0.1
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at test time
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, so every checkpoint a test waits on
# (the loop waits until a reported checkpoint is committed) and the end of every run take up to 2 s
# more; the resume tests checkpoint every step. Ray Train passes this on from the driver's environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Train starts an actor per run that watches for nodes being drained (spot preemption): a local test
# cluster is never drained, and the actor's process start is ~1 CPU-second of every training run here.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TEST_BACKBONES = ["maskclip-test", "siglip2-test", "dinov3txt-test"]


@pytest.fixture(scope="session")
def tiny_backbones():
    """The tiny random-initialised flavours, built once."""
    import spar

    return {name: spar.load_backbone(name, pretrained=None) for name in TEST_BACKBONES}


@pytest.fixture(scope="session")
def vitb16():
    """Random-initialised ViT-B/16 with the MaskCLIP head (the paper's default architecture)."""
    import spar

    return spar.load_backbone("maskclip", pretrained=None)



_EARLY: dict = {"modules": [], "started": False}  # modules with a `start_early` scenario, and whether it runs


def pytest_collection_finish(session):
    """A test module may define ``start_early()``: a scenario that runs in processes of its own (its
    own Ray cluster) beside the tests before it; its test then waits for the result. It starts with
    the session's first integration test: the unit tests before them keep both cores busy (their
    torch threads and benchmarks slow down many times over beside a cluster), while the integration
    tests leave about a fifth of the machine idle, waiting on processes and clusters to start."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_early") and module not in _EARLY["modules"]:
            _EARLY["modules"].append(module)


def pytest_runtest_setup(item):
    if not _EARLY["started"] and _EARLY["modules"] and "integration" in item.path.parts:
        _EARLY["started"] = True
        for module in _EARLY["modules"]:
            module.start_early()
