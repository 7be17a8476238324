"""The README's commands as a new user runs them: from a fresh working directory, with its relative
paths, in order (cache -> train -> inspect -> segment -> evaluate), and every file the README says a command
writes exists where it says. Then the same path on the S3 server with credentials only in
``storage_options``, other credentials in the environment, and no credential or signed URL in anything
the jobs write (configs, manifests, fingerprints, metadata, errors, checkpoints, metrics, logs)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import braceexpand
import pytest

from pipeline import open_cache
from tests.images import good_images
from tests.integration.conftest import make_bucket
from tests.segdata import make_ade

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _block(marker: str) -> list[str]:
    """The bash block after ``<!-- marker -->``, as lines with continuations joined."""
    text = README.split(f"<!-- {marker} -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return text.replace("\\\n", " ").splitlines()


def readme_path() -> list[tuple[list[str], list[str]]]:
    """(command argv, paths it writes) in README order: the run command's job, then the quick start."""
    first = _block("run-command")[0].rsplit("&& ", 1)[1]
    steps = [(shlex.split(first), ["out/cache/teacher.json", "out/cache/config.yaml", "out/cache/shards",
                                   "out/cache/manifest"])]
    writes: list[str] = []
    for line in _block("quickstart"):
        if line.startswith("# writes "):
            writes = list(braceexpand.braceexpand(line[len("# writes "):].strip()))
        elif line.strip():
            steps.append((shlex.split(line), writes))
    return steps


def _argv(words: list[str], subs: dict[str, str]) -> list[str]:
    assert words[0] == ".venv/bin/python" and words[1].startswith("jobs/"), words
    return [sys.executable, str(REPO / words[1]), *(subs.get(w, w) for w in words[2:])]


def _run(argv: list[str], cwd: Path, env: dict, log: Path) -> None:
    with open(log, "ab") as f:
        f.write(f"\n$ {shlex.join(argv[:2])} ...\n".encode())  # the arguments may hold a secret
        f.flush()
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _job_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", DS_ACCELERATOR="cpu", **extra)


def test_the_readme_commands_run_verbatim_and_the_readme_path_runs_on_s3_side_by_side(s3_endpoint, tmp_path):
    """The two scenarios below at once. Each is a chain of job processes that start their own local
    Ray cluster; one process importing or a cluster starting leaves a core idle (~38% of each
    scenario's time on 2 cores), so side by side they take ~2/3 of their sum. Either failing fails
    the test with its own message."""
    for name in ("verbatim", "s3"):
        (tmp_path / name).mkdir()
    with ThreadPoolExecutor(2) as pool:
        scenarios = [pool.submit(readme_commands_verbatim_from_a_fresh_directory, tmp_path / "verbatim"),
                     pool.submit(readme_path_on_s3_with_credentials_only_in_storage_options, s3_endpoint,
                                 tmp_path / "s3")]
    for scenario in scenarios:
        scenario.result()


def readme_commands_verbatim_from_a_fresh_directory(tmp_path: Path) -> None:
    """The README's commands, verbatim, from a fresh directory: each writes what its comment says,
    and nothing lands anywhere else."""
    work = tmp_path / "fresh"
    work.mkdir()
    make_ade(tmp_path / "ade", [(96, 128), (120, 90)])
    subs = {"root=/data/ADEChallengeData2016": f"root={tmp_path / 'ade' / 'ADEChallengeData2016'}"}
    steps = readme_path()
    assert [Path(w[1]).name for w, _ in steps] == ["cache_teacher.py", "train_student.py", "inspect_cache.py",
                                                   "segment.py", "evaluate.py"]
    log = tmp_path / "jobs.log"
    for words, writes in steps:
        _run(_argv(words, subs), work, _job_env(), log)
        missing = [w for w in writes if not (work / w).exists()]
        assert not missing, f"{words[1]} did not write {missing} under {work}:\n{log.read_text()[-3000:]}"
    # nothing landed anywhere else: the run directory holds every artifact, Ray's session dir none
    run_dir = work / "out" / "train" / "spar-student"
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    assert f"exported {run_dir}/student.safetensors" in log.read_text()
    # the recorded configs hold the resolved, absolute paths
    assert f"cache: {work}/out/cache" in (run_dir / "config.yaml").read_text()
    assert f"output: {work}/out/cache" in (work / "out" / "cache" / "config.yaml").read_text()
    # the first command's cache: every built-in sample, the default augmentation's sizes (method §3)
    cache = open_cache(str(work / "out" / "cache"))
    summaries = list((work / "out" / "cache" / "runs").glob("*/summary.json"))
    summary = json.loads(summaries[0].read_text())
    assert len(summaries) == 1 and summary["failed"] == 0 and len(cache) == summary["computed"] >= 6
    for row in cache.manifest.to_pylist():
        assert min(row["height"], row["width"]) >= 512 and max(row["height"], row["width"]) <= 2048


FAKE_ENV = {"AWS_ACCESS_KEY_ID": "AKIAFAKEENVKEY000001", "AWS_SECRET_ACCESS_KEY": "fakeEnvSecret/XYZ0000000000000000001",
            "AWS_SESSION_TOKEN": "FakeEnvSessionToken000000000000000001"}


def readme_path_on_s3_with_credentials_only_in_storage_options(s3_endpoint: str, tmp_path: Path) -> None:
    """The cache reads s3:// sources, pre-signed URLs and s3:// weights; training writes to s3://; the
    inspector reads the cache, its teacher's weights and the student from s3://; segmentation reads its
    image and the student from s3://. The endpoint and keys are given only as ``storage_options``: the
    S3 endpoint admits only those keys, and the environment holds other credentials (and no
    endpoint), so a process that fell back to them would fail. No credential, session token or URL
    signature reaches any object or log the jobs write."""
    import spar
    from pipeline.bench.s3proxy import CountingProxy

    bucket = make_bucket(s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    images = good_images(4)
    names = sorted(images)
    for name, data in images.items():
        s3.put_object(Bucket=bucket, Key=f"src/{name}", Body=data)
    weights = spar.export_open_clip(spar.load_backbone("maskclip-test", pretrained=None, init_seed=3),
                                    tmp_path / "w.safetensors")
    s3.upload_file(str(weights), bucket, "weights/maskclip-test.safetensors")
    base, log = f"s3://{bucket}", tmp_path / "jobs.log"
    # two sources as s3:// URIs, two as pre-signed URLs: their query strings carry a key id and a signature
    signed = [s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": f"src/{n}"}, ExpiresIn=3600)
              for n in names[2:]]
    assert all("Signature=" in u for u in signed)
    (tmp_path / "sources.txt").write_text("\n".join([f"{base}/src/{n}" for n in names[:2]] + signed))
    key, secret = "AKIAOPTIONKEY0000003", f"optionSecret/{uuid.uuid4().hex}"
    work = tmp_path / "fresh"
    work.mkdir()
    env = _job_env(SPAR_CACHE_DIR=str(tmp_path / "weights-cache"), **FAKE_ENV)
    py = [sys.executable]
    with CountingProxy(s3_endpoint, admit=key) as endpoint:
        opts = [f"storage_options.endpoint_url={endpoint.endpoint}", f"storage_options.key={key}",
                f"storage_options.secret={secret}"]
        _run([*py, str(REPO / "jobs/cache_teacher.py"), "backbone=maskclip-test", f"source={tmp_path / 'sources.txt'}",
              f"output={base}/cache", f"pretrained={base}/weights/maskclip-test.safetensors",
              "augment.scale=[224,160]", "augment.min_side=64", "num_cpus=2", *opts], work, env, log)
        _run([*py, str(REPO / "jobs/train_student.py"), f"cache={base}/cache", f"output={base}/runs", "epochs=1",
              "data.loader_workers=1", "num_cpus=2", *opts], work, env, log)
        _run([*py, str(REPO / "jobs/inspect_cache.py"), f"cache={base}/cache", "samples=2", "recompute=1",
              f"student={base}/runs/spar-student/student.safetensors", f"output={base}/inspect", *opts],
             work, env, log)
        _run([*py, str(REPO / "jobs/segment.py"), f"image={base}/src/{names[0]}", "classes=sky, ground",
              "backbone=maskclip-test", f"checkpoint={base}/runs/spar-student/student.safetensors",
              f"output={base}/segment", *opts], work, env, log)
        assert endpoint.requests() > 0

    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(k.startswith("cache/shards/") for k in keys) and any("checkpoint_" in k for k in keys)
    for name in ("student.safetensors", "student.json", "metrics.csv", "config.yaml"):
        assert f"runs/spar-student/{name}" in keys, name
    assert any(re.fullmatch(r"segment/.*\.png", k) for k in keys)
    assert {"inspect/contact_sheet.png", "inspect/summary.json", "inspect/audit.json"} <= set(keys)
    assert list(work.iterdir()) == []  # nothing was written locally
    cache = open_cache(f"{base}/cache", {"endpoint_url": s3_endpoint, "key": key, "secret": secret})
    assert cache.fingerprint["weights"]["uri"] == f"{base}/weights/maskclip-test.safetensors"
    assert len(cache) == 4
    # the signed sources were read, and are recorded by their public URL
    recorded = sorted(cache.manifest.column("source").to_pylist())
    assert recorded == sorted([f"{base}/src/{n}" for n in names[:2]] + [u.split("?")[0] for u in signed])
    secrets = [*FAKE_ENV.values(), key, secret, "Signature=", "X-Amz-", "Expires="]
    texts = {"jobs.log": log.read_bytes(), **{k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys
                                               if not k.startswith(("src/", "weights/"))}}
    for name, data in texts.items():
        for leak in secrets:
            assert leak.encode() not in data, f"{leak!r} found in {name}"
