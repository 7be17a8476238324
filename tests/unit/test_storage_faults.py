"""The storage layer against a real S3 server (moto) behind a proxy that injects faults: every
operation retried, streams resumed, writes never half-visible, appends never doubled, permanent
errors at once."""
from __future__ import annotations

import io
import tarfile
import time
import uuid

import boto3
import numpy as np
import pytest

from pipeline import retry
from pipeline.bench.s3proxy import CountingProxy, FaultyProxy
from pipeline.cache import shards, sources
from pipeline.retry import StorageError
from pipeline.storage import Storage

FAST = {"deadline_s": 60, "initial_s": 0.01, "max_backoff_s": 0.2}


@pytest.fixture
def bucket(moto):
    name = f"faults-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(moto):
    with FaultyProxy(moto, faults=0.0, seed=0) as p:
        yield p


def store_via(endpoint: str, **policy) -> Storage:
    """A storage of the S3 server at `endpoint` whose retries are this layer's: botocore's own are
    off (they would carry most faults, with sleeps of up to seconds)."""
    return Storage({"endpoint_url": endpoint, "key": "testing", "secret": "testing",
                    "client_kwargs": {"region_name": "us-east-1"}, "retry": {**FAST, **policy},
                    "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}})


def image_tar(n: int, size: int = 20_000) -> tuple[bytes, dict[str, bytes]]:
    members = {f"img_{i:02d}.jpg": bytes([i]) * size for i in range(n)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue(), members


def test_reads_and_writes_come_through_every_kind_of_fault(proxy, bucket):
    store = store_via(proxy.endpoint)
    retry.take_counts()
    proxy.set_faults(0.25, seed=1)
    payloads = {f"s3://{bucket}/k/{i:03d}.bin": bytes([i]) * (3000 + i) for i in range(16)}
    for url, data in payloads.items():
        store.write_bytes(url, data)
    for url, data in payloads.items():
        assert store.read_bytes(url) == data
        assert store.read_range(url, 100, 900) == data[100:900]
        assert store.size(url) == len(data) and store.exists(url)
    assert sorted(u for page in store.iter_files(f"s3://{bucket}/k", page=7) for u in page) == sorted(payloads)
    assert store.list_files(f"s3://{bucket}/k") == sorted(payloads)
    proxy.set_faults(0.0)
    assert sum(retry.take_counts().values()) > 5  # this layer's retries carried them
    faults = proxy.faults()
    assert sum(faults.values()) > 10, faults
    assert set(faults) >= {"503", "500", "429", "reset"}, faults


def test_the_s3_clients_own_retries_are_counted_by_operation_and_kind(proxy, bucket):
    """botocore retries 5xx and 429 answers itself (its default policy, as users run it): each failed
    request is still counted, as ``s3 <Operation>/<kind>``, so a storm the clients absorb is visible
    in a job's summary and metrics."""
    store = Storage({"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing",
                     "client_kwargs": {"region_name": "us-east-1"}, "retry": FAST})
    store.exists(f"s3://{bucket}/warm")  # the client is made and hooked before the storm
    retry.take_counts()
    proxy.reset()
    proxy.set_faults(0.3, kinds=["503", "500", "429"], seed=2)
    for i in range(12):
        store.write_bytes(f"s3://{bucket}/c/{i}", bytes([i]) * 1000)
        assert store.read_bytes(f"s3://{bucket}/c/{i}") == bytes([i]) * 1000
    proxy.set_faults(0.0)
    counts, faults = retry.take_counts(), proxy.faults()
    assert sum(faults.values()) >= 5, faults
    assert all(k.startswith("s3 ") for k in counts), counts  # the clients carried every one
    assert sum(counts.values()) == sum(faults.values()), (counts, faults)  # each failed request, once
    assert {k.split("/")[0] for k in counts} <= {"s3 PutObject", "s3 GetObject", "s3 HeadObject"}, counts
    assert sum(n for k, n in counts.items() if k.endswith("/throttled")) >= faults.get("429", 0)


def test_a_tar_stream_cut_mid_way_resumes_at_its_offset(proxy, bucket):
    """Every GET answers half its body and then resets: the stream is still read whole, member by member."""
    tar, members = image_tar(10)
    Storage({"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing"}).write_bytes(
        f"s3://{bucket}/src/a.tar", tar)
    store = store_via(proxy.endpoint)
    for seed in range(4):
        proxy.set_faults(0.5, kinds=["half_body"], seed=seed)
        got = {item.member: data for item, data in sources.iter_tar_images(f"s3://{bucket}/src/a.tar", store)}
        proxy.set_faults(0.0)
        assert got == members
    assert proxy.faults().get("half_body", 0) >= 2


def test_a_weights_download_cut_mid_way_resumes_and_is_checked(proxy, bucket, tmp_path, monkeypatch):
    """The model library fetches remote weights through this layer in every process of the project
    (resumed reads, the job's retry policy): GETs answering half their body still give the whole
    file, checked against its digest, and no partial copy is left."""
    import hashlib
    from pathlib import Path

    from pipeline import storage
    from spar import weights

    assert weights._remote_reader is storage.open_weights
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "weights"))
    data = np.random.default_rng(0).bytes(3 << 20)
    url = f"s3://{bucket}/weights/model.safetensors"
    store = store_via(proxy.endpoint)
    store.write_bytes(url, data)
    assert store.weights_options(url)["retry"] == {**FAST}
    recorded = {"kind": "file", "value": "sha256:" + hashlib.sha256(data).hexdigest()}
    proxy.reset()
    proxy.set_faults(0.5, kinds=["half_body"], seed=1)  # this seed cuts the first GETs
    local = weights.verified_weights(url, recorded, store.weights_options(url))
    proxy.set_faults(0.0)
    assert Path(local).read_bytes() == data
    assert proxy.faults().get("half_body", 0) >= 2
    assert [p.name for p in Path(local).parent.iterdir()] == ["model.safetensors"]  # no partial copy left


def test_a_failed_upload_leaves_nothing_under_its_name(proxy, bucket):
    """A multipart upload that keeps failing is aborted: no object appears, not even a truncated one."""
    store = store_via(proxy.endpoint, deadline_s=1, initial_s=0.01)
    url = f"s3://{bucket}/shards/big.tar"
    data = bytes(range(256)) * (24 << 12)  # ~6 MB: more than one 5 MB part
    proxy.set_faults(1.0, kinds=["reset"], seed=3)
    with pytest.raises(StorageError) as raised:
        store.write_stream(url, lambda f: f.write(data))
    proxy.set_faults(0.0)
    assert raised.value.transient and url in str(raised.value)
    assert not store.exists(url)
    proxy.set_faults(0.2, seed=4)  # with faults that let it through: whole, once
    store = store_via(proxy.endpoint)
    store.write_stream(url, lambda f: [f.write(data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20)])
    proxy.set_faults(0.0)
    assert store.read_bytes(url) == data


def test_a_delta_append_whose_answer_is_lost_is_committed_once(proxy, bucket):
    """Every log PUT is applied and its answer lost (half the time): each append lands exactly once."""
    store = store_via(proxy.endpoint)
    output = f"s3://{bucket}/cache"
    shards.create_tables(store, output)
    rows = [{"key": f"k{i}", "source": "s", "reason": "r"} for i in range(6)]
    proxy.set_faults(0.5, kinds=["unanswered"], seed=5)
    for i in range(0, 6, 2):
        shards.write_errors(store, output, rows[i:i + 2], run="r1")
    proxy.set_faults(0.0)
    assert proxy.faults().get("unanswered", 0) > 0
    table = shards.open_table(store, output, shards.ERRORS)
    keys = table.to_pyarrow_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == [f"k{i}" for i in range(6)]  # none lost, none twice
    assert table.version() == 3  # the create, then one commit per append


def test_permanent_errors_fail_at_once_naming_the_url(moto, bucket):
    """Wrong credentials (403) and missing objects are not retried: the URL is in the error."""
    with CountingProxy(moto, admit="AKIARIGHTKEY") as gate:
        store = Storage({"endpoint_url": gate.endpoint, "key": "AKIAWRONGKEY", "secret": "x"})
        t0 = time.monotonic()
        for op in (lambda u: store.read_bytes(u), lambda u: store.write_bytes(u, b"x"), lambda u: store.exists(u)):
            url = f"s3://{bucket}/denied.bin"
            with pytest.raises(PermissionError, match=f"s3://{bucket}/denied.bin"):
                op(url)
        assert time.monotonic() - t0 < 10
        assert gate.requests() <= 12  # s3fs's own tries, no more
    store = store_via(moto)
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/missing.bin"):
        store.read_bytes(f"s3://{bucket}/missing.bin")
    retry.take_counts()
    with pytest.raises(FileNotFoundError):
        store.read_range(f"s3://{bucket}/missing.bin", 0, 10)
    assert retry.take_counts() == {}


class _BreaksAfter(Storage):
    """A local storage whose reads of `victim` fail for good (a transient fault past its retries)
    once `after` bytes have been read."""

    def __init__(self, victim: str, after: int):
        super().__init__({})
        object.__setattr__(self, "victim", victim)
        object.__setattr__(self, "after", after)

    def open(self, url, mode="rb", **kwargs):
        f = super().open(url, mode, **kwargs)
        if url != self.victim:
            return f
        store = self

        class Breaking(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, b):
                if f.tell() >= store.after:
                    raise StorageError(f"read {url} {retry.GAVE_UP} 9 attempts", url=url, operation="read",
                                       transient=True)
                data = f.read(min(len(b), store.after - f.tell()))
                b[:len(data)] = data
                return len(data)

        return io.BufferedReader(Breaking())


def test_a_source_tar_unreadable_past_the_retries_counts_every_image_it_lost_as_transient(tmp_path):
    """Not one failure for the tar, and not a bad input: each image not cached is counted, as transient."""
    from pipeline.cache.tasks import TRANSIENT, expand_tar
    from pipeline.cache.shards import KeySet

    tar, members = image_tar(10)
    path = tmp_path / "a.tar"
    path.write_bytes(tar)
    store = _BreaksAfter(str(path), after=len(tar) * 3 // 10)  # ~3 of 10 members read
    rows = list(expand_tar({"tar": str(path), "done": KeySet(np.empty(0, shards._DIGEST)).digests.tobytes()},
                           views=2, store=store, output=str(tmp_path / "cache")))
    good, [error] = [r for r in rows if not r["error"]], [r for r in rows if r["error"]]
    assert len(good) == 2 * 2 and error["error"].startswith(TRANSIENT) and str(path) in error["error"]
    assert error["lost"] == (10 - 2) * 2  # estimated from the bytes left: 8 images x 2 views
    assert sources.read_tar_index(store, str(tmp_path / "cache"), str(path)) is None  # incomplete: no index


def test_every_processs_retries_reach_the_writer_tasks_output(tmp_path):
    """A row's retries (from its read and augment stages) and the writer's own add up in the column
    the driver sums into the job's summary."""
    import json

    from pipeline.cache.tasks import write_batch

    retry.take_counts()
    retry.record("write", "throttled", 2)  # this (writer) process's own
    batch = {"sample_key": np.array(["a_v0", "b_v0"]), "source": np.array(["s3://b/a.jpg", "s3://b/b.jpg"]),
             "error": np.array(["transient: unreadable: StorageError: read s3://b/a.jpg still failing", "bad"]),
             "lost": np.array([0, 0]), "view": np.array([0, 0]), "windows": np.array([0, 0]),
             "retries": np.array([json.dumps({"read/connection": 3}), ""], dtype=object)}
    out = write_batch(batch, output=str(tmp_path / "cache"), image_ext="npy", store=Storage(), run="r")
    assert json.loads(out["retries"][0]) == {"read/connection": 3, "write/throttled": 2}
    assert (out["errors"][0], out["transient"][0], out["samples"][0]) == (2, 1, 0)
