"""No credential or signed URL reaches anything the jobs write: configs, manifests, fingerprints,
metadata, errors, checkpoints, metrics, logs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3

from pipeline import open_cache, storage
from pipeline.storage import Storage
from tests.images import good_images
from tests.integration.conftest import make_bucket

REPO = Path(__file__).resolve().parents[2]
FAKE = {"AWS_ACCESS_KEY_ID": "AKIAFAKEENVKEY000001", "AWS_SECRET_ACCESS_KEY": "fakeEnvSecret/XYZ0000000000000000001",
        "AWS_SESSION_TOKEN": "FakeEnvSessionToken000000000000000001"}
OPTION_KEY, OPTION_SECRET = "AKIAFAKEOPTIONKEY002", "fakeOptionSecret/ABC00000000000000002"


def _run(args: list[str], env: dict, log: Path) -> None:
    with open(log, "ab") as f:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_fake_credentials_never_land_in_outputs_or_logs(s3_endpoint, tmp_path):
    bucket = make_bucket(s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    images = good_images(4)
    for name, data in images.items():
        s3.put_object(Bucket=bucket, Key=f"src/{name}", Body=data)
    # a list of signed URLs: their query strings carry an access key id and a signature
    signed = [s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": f"src/{n}"}, ExpiresIn=3600)
              for n in sorted(images)]
    assert all("Signature=" in u for u in signed)
    Storage().write_text(str(tmp_path / "signed.txt"), "\n".join(signed))
    env = dict(os.environ, **FAKE, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", DS_ACCELERATOR="cpu")
    env.pop("AWS_ENDPOINT_URL")  # the server is reachable only through storage_options (checkpoints too)
    opts = [f"storage_options.key={OPTION_KEY}", f"storage_options.secret={OPTION_SECRET}",
            f"storage_options.endpoint_url={s3_endpoint}", "num_cpus=2"]
    cache, runs, log = f"s3://{bucket}/cache", f"s3://{bucket}/runs", tmp_path / "jobs.log"
    _run(["jobs/cache_teacher.py", "backbone=maskclip-test", "augment.scale=[224,160]", "augment.min_side=64",
          f"source={tmp_path / 'signed.txt'}", f"output={cache}", *opts], env, log)
    _run(["jobs/train_student.py", f"cache={cache}", f"output={runs}", "epochs=1", "data.loader_workers=1", *opts],
         env, log)

    secrets = [*FAKE.values(), OPTION_KEY, OPTION_SECRET, "Signature=", "X-Amz-", "Expires="]
    texts = {"jobs.log": log.read_bytes()}
    for key in [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", []) if not o["Key"].startswith("src/")]:
        texts[key] = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert any(k.startswith("cache/shards/") for k in texts) and any("checkpoint_" in k for k in texts)
    assert any(k.endswith("student.safetensors") for k in texts)
    for name, data in texts.items():
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} found in {name}"
    # the signed sources were read, and are recorded by their public URL
    recorded = sorted(open_cache(cache).manifest.column("source").to_pylist())
    assert recorded == sorted(u.split("?")[0] for u in signed)
