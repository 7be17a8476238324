"""`benchmark.py commits`: what committing a shard costs (`shards._append`: one Delta append of
`samples_per_shard` rows), with concurrent writers and after a long history.

Writers: for each count N in `writers`, N processes on a fresh table (on moto's S3 server behind the
counting proxy; locally with ``s3=false``), released together, commit `commits` shards in all, each
writer its share, so every count commits over the same versions. Per count:

    p50_ms, p95_ms, mean_ms   one `_append` as its writer timed it, retries included
    commits_per_s             commits / seconds from the release to the last commit
    retries_per_commit        delta-rs's ``num_retries`` summed over the run's commits: versions lost
                              to another writer (each loss: read the winner's entry, try the next version)
    requests_per_commit       S3 requests a commit (lists_per_commit: the LISTs of the log among them)
    extra_request_share       1 - one writer's requests_per_commit / N's: N's requests spent on conflicts
    latency_ratio             mean_ms / one writer's; extra_latency_share = 1 - 1 / latency_ratio

On this machine moto, the proxy and every writer share two CPU cores: at 16 writers a commit mostly
waits for a core, so extra_latency_share bounds the time contention wastes from above, and
commits_per_s is moto's ceiling, not S3's. Retries and requests do not depend on the CPU; on S3,
where a commit's time is its round trips one after another, extra_request_share estimates the
writer time contention wastes.

History: an append after `history` earlier commits. The history is written directly (seconds where
appends would take hours): a real first append, then one log entry per commit, a copy of that
append's (a commitInfo and one ``add`` of a file of its own), every `compact_every` versions a
compaction as `shards.finish` makes it (``remove`` of the small files since the last one, ``add`` of
one), and delta-rs's checkpoints: the last one before the head (the only one an append reads) and one
every 10,000 versions, which bound the builder's own replays. Only the data files live at the head
exist, hard links of the first append's (as after a vacuum): an append reads the log, never data.
The head is `history` moved up (by < 100) so that the timed appends end exactly on delta-rs's next
checkpoint, which the writer of every 100th version writes:

    append_before_checkpoint_s  median of `appends` appends late in a checkpoint interval: each
                                replays ~90 log entries since the last checkpoint (the most is 99)
    append_no_log_cleanup_s     the same with delta-rs's post-commit log clean-up off (not the job's
                                path; that hook lists the whole ``_delta_log`` after every commit)
    checkpointing_append_s      the next append, which also writes the checkpoint
    append_after_checkpoint_s   appends right after it (the fewest entries to replay)
    *_requests, *_lists         (S3) requests of one such append, and the LISTs among them
    no_checkpoint.append_s      (`no_checkpoint` sizes, locally) the same history without checkpoints:
                                every append replays the whole log

Sizes in `s3_history` are uploaded to moto; the others are listed in `s3_not_measured` with the
upload time the measured rate projects (moto also scans its whole bucket for every LIST page of
1,000 keys, so at that size it says little about S3, where a page is one round trip).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.cache import shards
from pipeline.config import check
from pipeline.storage import Storage

CHECKPOINT_INTERVAL = 100  # delta-rs's default delta.checkpointInterval: the writer of version 99, 199, ... checkpoints
_BUILD_CHECKPOINT_EVERY = 10_000  # versions the history builder's delta-rs replays at most


@dataclass(kw_only=True)
class CommitBench:
    """`benchmark.py commits`: manifest commit latency with concurrent writers and after a long history."""

    writers: list[int] = field(default_factory=lambda: [1, 4, 16])  # concurrent writer processes
    commits: int = 320  # appends at each writer count, split evenly over its writers
    history: list[int] = field(default_factory=lambda: [0, 10_000, 100_000])  # earlier commits (local)
    s3_history: list[int] = field(default_factory=lambda: [0, 10_000])  # of those, also measured on moto
    no_checkpoint: list[int] = field(default_factory=lambda: [10_000])  # of those, also without checkpoints
    compact_every: int = 1000  # the cache job's manifest_checkpoint_every (0: the history is never compacted)
    appends: int = 3  # timed appends per history size
    samples_per_shard: int = 32  # the cache job's default shard_size: rows per commit
    s3: bool = True  # writers and `s3_history` on moto's S3 server (needs the test extra: moto[server])
    out: str | None = None

    def __post_init__(self):
        check(all(n >= 1 for n in self.writers) and self.commits >= max(self.writers, default=1),
              "writers must be >= 1 and commits >= the largest writer count")
        check(all(h >= 0 for h in self.history), "history sizes must be >= 0")
        check(set(self.s3_history) <= set(self.history) and set(self.no_checkpoint) <= set(self.history),
              "s3_history and no_checkpoint must be sizes listed in history")
        check(self.appends >= 1 and self.compact_every >= 0 and self.samples_per_shard >= 1,
              "appends and samples_per_shard must be >= 1, compact_every >= 0")


def _rows(first: int, count: int, per_shard: int) -> pa.Table:
    # imported here, not above: writer processes run this file as a script and never import
    # pipeline.bench, whose package imports torch (5 s and 750 MB a process)
    from pipeline.bench.manifest import _rows as rows

    return rows(first, count, per_shard)


def _writer() -> None:
    """One writer process (this file run as a script): reads its job from stdin, opens the table,
    says ``ready``, waits for ``go``, then times each append; prints [start, seconds] per commit."""
    job = json.loads(sys.stdin.readline())
    store, rows = Storage(job["options"]), pa.ipc.open_file(job["rows"]).read_all()
    from deltalake import DeltaTable

    url = shards.table_url(job["output"], shards.MANIFEST)
    DeltaTable(url, storage_options=shards.delta_options(store, url)).version()
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    timings = []
    for lo in range(0, rows.num_rows, job["per_shard"]):
        start, t = time.time(), time.perf_counter()
        shards._append(store, job["output"], shards.MANIFEST, rows.slice(lo, job["per_shard"]))
        timings.append([start, time.perf_counter() - t])
    print(json.dumps(timings), flush=True)


def _run_writers(store: Storage, output: str, n: int, cfg: CommitBench, work: str, proxy) -> list[list[float]]:
    """`n` writer processes committing ``cfg.commits // n`` shards each, released together (the proxy's
    count reset once all have opened the table)."""
    per_writer = cfg.commits // n
    procs = []
    for w in range(n):
        path = os.path.join(work, f"rows-{n}-{w}.arrow")
        table = _rows(w * per_writer, per_writer, cfg.samples_per_shard)
        with pa.ipc.new_file(path, table.schema) as f:
            f.write_table(table)
        proc = subprocess.Popen([sys.executable, "-P", __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        proc.stdin.write(json.dumps({"output": output, "options": store.options, "rows": path,
                                     "per_shard": cfg.samples_per_shard}) + "\n")
        proc.stdin.flush()
        procs.append(proc)
    try:
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"writer process exited with {proc.wait()}")
        if proxy:
            proxy.reset()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        timings = [t for proc in procs for t in json.loads(proc.stdout.readline())]
    finally:
        for proc in procs:
            proc.stdin.close()
            if proc.wait(timeout=60):
                raise RuntimeError(f"writer process exited with {proc.returncode}")
    return timings


def _retries(store: Storage, output: str) -> tuple[int, int]:
    """(the table's version, the sum of delta-rs's ``num_retries`` over its appends)."""
    dt = shards.open_table(store, output)
    retries = sum(int((c.get("operationMetrics") or {}).get("num_retries", 0)) for c in dt.history())
    return dt.version(), retries


def _writers(cfg: CommitBench, work: str, endpoint: str | None, proxy) -> dict:
    """Every writer count on a fresh table (a bucket of its own on moto, so none lists another's)."""
    results = {}
    for n in cfg.writers:
        if endpoint:
            _bucket(endpoint, f"commits-writers-{n}")
            output, store = f"s3://commits-writers-{n}/cache", Storage(_options(proxy.endpoint))
        else:
            output, store = storage.join(work, f"writers-{n}"), Storage()
        shards.create_tables(store, output)
        timings = np.array(_run_writers(store, output, n, cfg, work, proxy))
        version, retries = _retries(store, output)
        commits = len(timings)
        wall = float((timings[:, 0] + timings[:, 1]).max() - timings[:, 0].min())
        ms = timings[:, 1] * 1000
        result = {"writers": n, "commits": commits, "version": version, "wall_s": wall,
                  "commits_per_s": commits / wall, "p50_ms": float(np.percentile(ms, 50)),
                  "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()), "retries": retries,
                  "retries_per_commit": retries / commits}
        if proxy:
            requests, lists = _requests(proxy, f"/commits-writers-{n}")
            result.update(requests_per_commit=requests / commits, lists_per_commit=lists / commits)
        results[str(n)] = result
    one = results.get("1")
    for result in results.values() if one else ():
        result["latency_ratio"] = result["mean_ms"] / one["mean_ms"]
        result["extra_latency_share"] = 1 - one["mean_ms"] / result["mean_ms"]
        if "requests_per_commit" in one:
            result["extra_request_share"] = 1 - one["requests_per_commit"] / result["requests_per_commit"]
    return results


def _requests(proxy, bucket: str) -> tuple[int, int]:
    """(requests, of them LISTs) to `bucket` since the proxy's last reset."""
    requests = proxy.traffic(bucket)[0]
    return requests, requests - proxy.traffic(bucket + "/")[0]


class _Log:
    """Writes a manifest's log directly, one entry per commit, each a copy of a real append's."""

    def __init__(self, output: str, compact_every: int, per_shard: int):
        self.table = shards.table_url(output, shards.MANIFEST)
        self.log = os.path.join(self.table, "_delta_log")
        self.compact_every = compact_every
        shards._append(Storage(), output, shards.MANIFEST, _rows(0, 1, per_shard))
        with open(os.path.join(self.log, f"{1:020d}.json")) as f:
            actions = [json.loads(line) for line in f]
        self.info = next(a for a in actions if "commitInfo" in a)
        self.add = next(a["add"] for a in actions if "add" in a)
        self.source = os.path.join(self.table, self.add["path"])
        self.version, self.small, self.compacted = 1, [self.add["path"]], []

    def commit(self) -> None:
        """One more version: an append, or every `compact_every` versions a compaction."""
        self.version += 1
        path = f"part-00000-{uuid.UUID(int=self.version)}-c000.snappy.parquet"
        if self.compact_every and self.version % self.compact_every == 0:
            now = int(time.time() * 1000)
            actions = [{"commitInfo": dict(self.info["commitInfo"], operation="OPTIMIZE")}]
            actions += [{"remove": {"path": p, "deletionTimestamp": now, "dataChange": False, "size": self.add["size"],
                                    "extendedFileMetadata": True, "partitionValues": {}}} for p in self.small]
            actions.append({"add": dict(self.add, path=path, dataChange=False)})
            self.small = []
            self.compacted.append(path)
        else:
            actions = [self.info, {"add": dict(self.add, path=path)}]
            self.small.append(path)
        with open(os.path.join(self.log, f"{self.version:020d}.json"), "w") as f:
            f.write("".join(json.dumps(a) + "\n" for a in actions))

    def checkpoint(self) -> None:
        from deltalake import DeltaTable

        DeltaTable(self.table).create_checkpoint()

    def link_live_files(self) -> None:
        """The data files the head names, as hard links of the first append's (the others are gone, as
        after a vacuum: no commit reads them)."""
        for path in self.small + self.compacted:
            target = os.path.join(self.table, path)
            if target != self.source:
                os.link(self.source, target)
        if self.add["path"] not in self.small:
            os.remove(self.source)


def _head(history: int, appends: int) -> int:
    """The smallest version >= `history` after which the (2 * appends + 1)-th append writes a checkpoint."""
    last = 2 * appends + 1
    return history + (CHECKPOINT_INTERVAL - 1 - (history + last)) % CHECKPOINT_INTERVAL


def _build(output: str, head: int, cfg: CommitBench, checkpoints: bool) -> float:
    """A manifest at version `head` whose history is written directly (see the module docstring); seconds."""
    t = time.perf_counter()
    shards.create_tables(Storage(), output)
    if head == 0:
        return time.perf_counter() - t
    log = _Log(output, cfg.compact_every, cfg.samples_per_shard)
    last = head - (head + 1) % CHECKPOINT_INTERVAL
    while log.version < head:
        log.commit()
        if checkpoints and (log.version % _BUILD_CHECKPOINT_EVERY == _BUILD_CHECKPOINT_EVERY - 1
                            or log.version == last):
            log.checkpoint()
    log.link_live_files()
    return time.perf_counter() - t


def _append_without_log_cleanup(store: Storage, output: str, table: str, rows: pa.Table) -> None:
    """`shards._append` with delta-rs's post-commit log clean-up off (a contrast, not the job's path)."""
    from deltalake import PostCommitHookProperties, write_deltalake

    url = shards.table_url(output, table)
    write_deltalake(url, rows, mode="append", storage_options=shards.delta_options(store, url),
                    commit_properties=shards._commit_properties(),
                    post_commithook_properties=PostCommitHookProperties(cleanup_expired_logs=False))


def _timed(append, store: Storage, output: str, rows: pa.Table, proxy, bucket: str | None) -> tuple[float, tuple]:
    if proxy:
        proxy.reset()
    t = time.perf_counter()
    append(store, output, shards.MANIFEST, rows)
    seconds = time.perf_counter() - t
    return seconds, _requests(proxy, bucket) if proxy else ()


def _measure(store: Storage, output: str, cfg: CommitBench, checkpoints: bool, proxy=None,
             bucket: str | None = None) -> dict:
    """Time appends on a built history: `appends` production appends; with checkpoints, then as many
    without the log clean-up, the one that writes the next checkpoint, and `appends` right after it."""
    rows = _rows(1, 1, cfg.samples_per_shard)

    def timed(append, count: int, prefix: str) -> dict:
        runs = [_timed(append, store, output, rows, proxy, bucket) for _ in range(count)]
        out = {f"{prefix}_s": statistics.median(s for s, _ in runs)}
        if proxy:
            out.update({f"{prefix}_requests": statistics.median(r[0] for _, r in runs),
                        f"{prefix}_lists": statistics.median(r[1] for _, r in runs)})
        return out

    result = {"head_version": shards.open_table(store, output).version()}
    if not checkpoints:
        result.update(timed(shards._append, cfg.appends, "append"))
        return dict(result, version=shards.open_table(store, output).version())
    result.update(timed(shards._append, cfg.appends, "append_before_checkpoint"))
    result.update(timed(_append_without_log_cleanup, cfg.appends, "append_no_log_cleanup"))
    result.update(timed(shards._append, 1, "checkpointing_append"))
    checkpoint = _last_checkpoint(store, output)
    assert checkpoint == shards.open_table(store, output).version(), "the timed append wrote no checkpoint"
    result.update(timed(shards._append, cfg.appends, "append_after_checkpoint"), checkpoint_version=checkpoint)
    return dict(result, version=shards.open_table(store, output).version())


def _last_checkpoint(store: Storage, output: str) -> int:
    url = storage.join(shards.table_url(output, shards.MANIFEST), "_delta_log", "_last_checkpoint")
    return int(json.loads(store.read_text(url))["version"])


def _upload(local: str, endpoint: str, bucket: str) -> tuple[str, float]:
    """Copy a locally built cache's manifest to a new bucket on moto (directly, not through the
    proxy); returns (the cache's URL there, seconds)."""
    _bucket(endpoint, bucket)
    output = f"s3://{bucket}/cache"
    fs, path = Storage(_options(endpoint)).filesystem(output)
    t = time.perf_counter()
    fs.put(shards.table_url(local, shards.MANIFEST), f"{path}/{shards.MANIFEST}", recursive=True)
    return output, time.perf_counter() - t


def _history(cfg: CommitBench, work: str, endpoint: str | None, proxy) -> dict:
    """Every history size locally (and on moto, those in `s3_history`), with checkpoints and, for the
    sizes in `no_checkpoint`, without; sizes left off moto get their upload time projected."""
    results: dict = {"local": {}, "s3": {}}
    skipped = {}
    for n in cfg.history:
        head = _head(n, cfg.appends)
        local = os.path.join(work, f"history-{n}")
        built = _build(local, head, cfg, checkpoints=True)
        table = shards.table_url(local, shards.MANIFEST)
        sizes = {"log_entries": len(os.listdir(os.path.join(table, "_delta_log"))),
                 "objects": sum(len(files) for _, _, files in os.walk(table))}
        if endpoint and n in cfg.s3_history:
            output, uploaded = _upload(local, endpoint, f"commits-history-{n}")
            measured = _measure(Storage(_options(proxy.endpoint)), output, cfg, True, proxy, f"/commits-history-{n}")
            results["s3"][str(n)] = dict(measured, history=n, upload_s=uploaded, **sizes)
        elif endpoint:
            skipped[str(n)] = sizes["objects"]
        results["local"][str(n)] = dict(_measure(Storage(), local, cfg, True), history=n, build_s=built, **sizes)
        shutil.rmtree(local)
        if n in cfg.no_checkpoint:
            bare = os.path.join(work, f"history-{n}-bare")
            built = _build(bare, head, cfg, checkpoints=False)
            results["local"][str(n)]["no_checkpoint"] = dict(_measure(Storage(), bare, cfg, False), build_s=built)
            shutil.rmtree(bare)
    rates = [r["objects"] / r["upload_s"] for r in results["s3"].values() if r["objects"] >= 1000]
    if skipped:
        results["s3_not_measured"] = {
            n: {"objects": objects, "projected_upload_s": objects / max(rates) if rates else None}
            for n, objects in skipped.items()}
    return results


def _options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}


def _bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                 region_name="us-east-1").create_bucket(Bucket=name)


def bench_commits(cfg: CommitBench) -> dict:
    """Concurrent writers, then history sizes; on moto's S3 server behind the counting proxy where `cfg.s3`."""
    from pipeline.bench.s3proxy import CountingProxy, start_moto  # here, not above: see _rows

    results = {"mode": "commits", "samples_per_shard": cfg.samples_per_shard, "cpus": os.cpu_count(),
               "writers_on": "s3" if cfg.s3 else "local", "checkpoint_interval": CHECKPOINT_INTERVAL,
               "compact_every": cfg.compact_every}
    with tempfile.TemporaryDirectory() as work:
        if not cfg.s3:
            results["writers"] = _writers(cfg, work, None, None)
            results["history"] = _history(cfg, work, None, None)
            return results
        endpoint, server = start_moto()
        try:
            with CountingProxy(endpoint) as proxy:  # its backlog of 1,024 takes delta-rs's bursts
                t = time.perf_counter()
                results["writers"] = _writers(cfg, work, endpoint, proxy)
                results["writers_s"] = time.perf_counter() - t
                results["history"] = _history(cfg, work, endpoint, proxy)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return results


if __name__ == "__main__":
    _writer()
