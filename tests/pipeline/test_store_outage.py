"""The store's failures below the job (issue 22): a stream that breaks mid-shard resumes where it broke; a call that
the store keeps failing gives up when its budget is spent, naming the store's answer, and one that retrying cannot
fix fails at once; a run cut off from its store stops committing before its lease could expire, and never writes
again once another run may hold the output.

Through ``infra/local/s3_proxy.py`` in front of moto's S3 server. Where the point is the job's own policy, the client's
retries are off (``max_attempts`` 0: botocore would otherwise ride out a few seconds of outage by itself)."""

import io
import json
import os
import re
import tarfile
import time
import uuid
from datetime import datetime

import pyarrow as pa
import pytest
import s3fs

from infra.local.s3_proxy import S3Proxy
from pipeline.commit import OUTPUT_SCHEMA, ROUTING_COLUMNS, ShardCommitter, committed_shards
from pipeline.lease import LEASE_DIR, LeaseLostError, OutputLease
from pipeline.retry import RetryPolicy, StoreRetries, StoreUnavailableError, describe
from pipeline.sources import discover_shards, read_shard_batches, shard_items

NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 0}}}


def through(proxy: S3Proxy, options: dict, **extra) -> dict:
    return {**options, "client_kwargs": {"endpoint_url": proxy.endpoint}, "skip_instance_cache": True, **extra}


def test_a_stream_that_breaks_mid_shard_resumes_where_it_broke(s3_server, tmp_path):
    """A 24 MiB tar is streamed in 8 MiB range reads. Once its first rows are out, the proxy cuts the next 8 answers
    after half their body: s3fs retries a cut read 5 times itself, then the reader's own retry opens the file again
    at the byte it had reached. Every sample comes out once, whole, in order."""
    direct, options = s3_server
    prefix = f"captions-test/broken-stream-{uuid.uuid4().hex}"
    samples = [(f"s{i:03d}", os.urandom(1 << 20)) for i in range(24)]
    with tarfile.open(tmp_path / "big.tar", "w") as archive:
        for key, payload in samples:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    direct.put_file(str(tmp_path / "big.tar"), f"{prefix}/big.tar")
    [shard] = discover_shards(direct, prefix)
    reported = []

    with S3Proxy(options["client_kwargs"]["endpoint_url"]) as proxy:
        batches = read_shard_batches(shard_items([shard])[0], through(proxy, options), batch_rows=4,
                                     retry=RetryPolicy(budget_s=60), report_retry=reported.append)
        tables = [next(batches)]  # the first 8 MiB block is read
        proxy.break_bodies(8)
        tables += list(batches)

    rows = [row for table in tables for row in table.to_pylist()]
    assert [(row["key"], row["media"]) for row in rows[:-1]] == samples
    assert rows[-1]["key"] is None and rows[-1]["shard_size"] == len(samples) and rows[-1]["error"] is None
    assert proxy.counts.broken == 8
    assert reported and set(reported) == {"connection"}  # s3fs gave up on a cut read at least once: the reader resumed


def test_a_store_kept_away_past_the_budget_is_named_and_a_refusal_fails_at_once(s3_server):
    direct, options = s3_server
    prefix = f"captions-test/budget-{uuid.uuid4().hex}"
    direct.pipe_file(f"{prefix}/a.tar", b"")
    with S3Proxy(options["client_kwargs"]["endpoint_url"]) as proxy:
        fs = s3fs.S3FileSystem(**through(proxy, options, **NO_CLIENT_RETRIES))
        retries = StoreRetries(RetryPolicy(budget_s=1.0, max_delay_s=0.2))
        proxy.start_outage()
        with pytest.raises(StoreUnavailableError) as unavailable:
            discover_shards(fs, prefix, retries=retries)
        proxy.end_outage()

        started = time.monotonic()
        with pytest.raises(FileNotFoundError) as refused:  # a 404 stays what it is: callers tell it apart
            StoreRetries().call("read s3://no-such-bucket/a.tar", lambda: fs.cat_file("no-such-bucket/a.tar"))
        refused_after_s = time.monotonic() - started

    # the listing's first request is a HEAD, whose answer has no body: its status line names it
    assert re.fullmatch(rf"cannot list s3://{prefix}: the store answered 503 Service ?Unavailable for \d+ s "
                        r"\(--store-retry-seconds 1\)", str(unavailable.value)), unavailable.value
    assert set(retries.counts) == {"unavailable"}
    assert describe(refused.value) == "the store answered 404 NoSuchBucket (The specified bucket does not exist)"
    assert refused_after_s < 30  # not retried for the default budget of 300 s


def lease_record(fs, root: str, generation: int) -> dict:
    return json.loads(fs.cat_file(f"{root}/{LEASE_DIR}/{generation:08d}.json"))


def shard_batch(shard_id: str) -> pa.Table:
    schema = pa.schema(list(OUTPUT_SCHEMA) + ROUTING_COLUMNS)
    row = {name: None for name in schema.names}
    rows = [{**row, "key": "k", "shard_id": shard_id, "caption": "c", "index": 0, "replica": "r",
             "replica_start": "{}"},
            {**row, "shard_id": shard_id, "shard_size": 1, "index": -1}]
    return pa.Table.from_pylist(rows, schema=schema)


def commit(fs, root: str, lease: OutputLease, retries: StoreRetries, shard_id: str) -> ShardCommitter:
    """Commit one shard under ``lease``; the committer, closed (its ``close`` raised if the lease stopped it)."""
    committer = ShardCommitter(fs, root, before_commit=lease.check, retries=retries, writers=1)
    try:
        with committer:
            committer.add(shard_batch(shard_id))
    except LeaseLostError:
        pass
    return committer


def test_an_outage_longer_than_the_lease_ttl_stops_commits_before_the_lease_could_expire(s3_server):
    """Run 1 reaches the store through the proxy; the outage starts after its first commit. Its next shard's writes
    are retried until its lease could expire within a heartbeat, then refused. Run 2, which reaches the store, takes
    the lease once it has expired; when the store comes back to run 1, run 1 still writes nothing: not its shard,
    not its lease record (whose last heartbeat predates the outage)."""
    direct, options = s3_server
    root = f"captions-test/lease-outage-{uuid.uuid4().hex}/out"
    timing = dict(ttl_s=4.0, heartbeat_s=1.0)
    with S3Proxy(options["client_kwargs"]["endpoint_url"]) as proxy:
        cut_off = s3fs.S3FileSystem(**through(proxy, options, **NO_CLIENT_RETRIES))
        retries = StoreRetries(RetryPolicy(budget_s=300, max_delay_s=0.2))
        first = OutputLease(cut_off, root, retries=retries, **timing).acquire()
        assert commit(cut_off, root, first, retries, "a").stats.committed == ["a"]

        proxy.start_outage()
        outage_started = time.time()
        stopped = commit(cut_off, root, first, retries, "b")
        stopped_at = time.time()
        expires_at = datetime.fromisoformat(lease_record(direct, root, 0)["expires_at"]).timestamp()
        second = OutputLease(direct, root, **timing).acquire(wait_s=30)  # once run 1's lease has expired
        proxy.end_outage()
        refused = commit(cut_off, root, first, retries, "c")
        first.release()

    assert stopped.stats.committed == [] and stopped.stats.failed["b"].startswith(f"stopped committing to s3://{root}")
    assert "its heartbeats failed: the store answered 503 ServiceUnavailable" in stopped.stats.failed["b"]
    assert stopped_at < expires_at  # stopped before the lease could expire
    assert second.generation == 1 and time.time() >= expires_at
    assert refused.stats.committed == [] and "stopped committing to" in refused.stats.failed["c"]
    direct.invalidate_cache()
    assert committed_shards(direct, root) == {"a"}
    assert not direct.exists(f"{root}/shards/b.parquet") and not direct.exists(f"{root}/shards/c.parquet")
    record = lease_record(direct, root, 0)
    assert not record["released"] and datetime.fromisoformat(record["heartbeat_at"]).timestamp() <= outage_started
    assert lease_record(direct, root, 1)["owner"] == second.owner
    second.release()
