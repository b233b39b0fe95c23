"""The committer: rows of many shards in any order commit each shard exactly once, Parquet file before
checkpoint, on a pool of writers that retry failed writes (those that may pass) and never hold up ``add`` while one is
free."""

import json
import random
import threading
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from fsspec.implementations.memory import MemoryFileSystem
from s3fs.errors import translate_boto_error

from pipeline.commit import OUTPUT_SCHEMA, ROUTING_COLUMNS, ShardCommitter, checkpoint_file, committed_shards, shard_file
from pipeline.retry import RetryPolicy, StoreRetries

CAPTION_ROWS = pa.schema(list(OUTPUT_SCHEMA) + ROUTING_COLUMNS)  # what the caption stage sends
FAST_RETRY = RetryPolicy(budget_s=0.05, first_delay_s=0.001, max_delay_s=0.005)
WAIT_S = 30  # a bound on waits that normally end at once


def s3_error(status: int, code: str, message: str) -> OSError:
    """What s3fs raises when the store answers ``status`` ``code``: botocore's ClientError, translated by s3fs."""
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return translate_boto_error(ClientError(response, "PutObject"))


class StoreFS(MemoryFileSystem):
    """An in-memory store that records the order of completed writes and can fail or hold writes.

    Not a LocalFileSystem, so ``write_atomic`` puts every file through ``pipe_file``, as it does on S3."""

    cachable = False  # a fresh instance per test, not fsspec's cached one

    def __init__(self, fail_first: int = 0, fail_paths: tuple = (), gate: threading.Event = None,
                 error=lambda: s3_error(503, "SlowDown", "Please reduce your request rate.")):
        super().__init__()
        self.fail_first = fail_first  # the first k writes raise
        self.fail_paths = fail_paths  # writes to paths containing one of these always raise
        self.error = error  # what a failing write raises
        self.gate = gate  # writes wait for it
        self.entered = threading.Event()  # a write has reached the store
        self.attempts: list[str] = []
        self.writes: list[str] = []
        self._lock = threading.Lock()

    def pipe_file(self, path, value, **kwargs):
        with self._lock:
            self.attempts.append(path)
            failing = len(self.attempts) <= self.fail_first or any(part in path for part in self.fail_paths)
        self.entered.set()
        if self.gate is not None and not self.gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        if failing:
            raise self.error()
        super().pipe_file(path, value, **kwargs)
        with self._lock:
            self.writes.append(path)


@pytest.fixture
def root():
    return f"/commit-test-{uuid.uuid4().hex}"  # memory file systems share one store


def sample_row(shard_id: str, index: int, error: str = None) -> dict:
    return {"key": f"{shard_id}-{index}", "shard_id": shard_id, "caption": None if error else f"caption {index}",
            "error": error, "width": 10, "height": 20, "num_image_tokens": 64, "num_generated_tokens": index + 1,
            "finish_reason": "stop", "shard_size": None, "index": index, "replica": f"replica-{index % 2}",
            "replica_start": json.dumps({"ready_s": 1.0 + index % 2})}


def end_row(shard_id: str, size: int, error: str = None) -> dict:
    return {**dict.fromkeys(CAPTION_ROWS.names), "shard_id": shard_id, "shard_size": size, "index": -1, "error": error}


def shard_rows(shard_id: str, size: int) -> list[dict]:
    return [sample_row(shard_id, i) for i in range(size)] + [end_row(shard_id, size)]


def batches(rows: list[dict], size: int) -> list[pa.Table]:
    return [pa.Table.from_pylist(rows[i : i + size], schema=CAPTION_ROWS) for i in range(0, len(rows), size)]


def read_parquet(fs, path: str) -> list[dict]:
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle).to_pylist()


def test_interleaved_shards_commit_exactly_once_each_parquet_before_checkpoint(root):
    fs = StoreFS()
    sizes = {f"s{i:02d}": i % 7 for i in range(40)}  # 0 to 6 rows: empty shards too
    rows = [row for shard_id, size in sizes.items() for row in shard_rows(shard_id, size)]
    rows += [sample_row("s03", 1), sample_row("s06", 5)]  # a retried task's duplicates
    random.Random(0).shuffle(rows)  # markers before, among and after their rows; shards interleaved
    with ShardCommitter(fs, root, writers=4, queued=2, retries=StoreRetries(FAST_RETRY)) as committer:
        for batch in batches(rows, 5):
            committer.add(batch)

    assert sorted(committer.stats.committed) == sorted(sizes) and committed_shards(fs, root) == set(sizes)
    assert committer.stats.failed == {}
    assert committer.stats.rows == sum(sizes.values())
    assert committer.stats.generated_tokens == sum(i + 1 for size in sizes.values() for i in range(size))
    assert committer.stats.replicas == {"replica-0": {"ready_s": 1.0}, "replica-1": {"ready_s": 2.0}}  # how each started
    for shard_id, size in sizes.items():
        parquet, checkpoint = shard_file(root, shard_id), checkpoint_file(root, shard_id)
        assert fs.writes.count(parquet) == fs.writes.count(checkpoint) == 1
        assert fs.writes.index(parquet) < fs.writes.index(checkpoint)
        assert [row["key"] for row in read_parquet(fs, parquet)] == [f"{shard_id}-{i}" for i in range(size)]
        record = json.loads(fs.cat_file(checkpoint))
        assert set(record) == {"shard_id", "rows", "error_rows", "generated_tokens", "seconds", "committed_at", "replicas"}
        assert (record["shard_id"], record["rows"], record["error_rows"]) == (shard_id, size, 0)
        assert record["replicas"] == sorted({f"replica-{i % 2}" for i in range(size)})


def test_failed_writes_are_retried_until_they_succeed(root):
    fs = StoreFS(fail_first=3)
    with ShardCommitter(fs, root, writers=1, retries=StoreRetries(FAST_RETRY)) as committer:
        committer.add(batches(shard_rows("a", 2) + shard_rows("b", 1), 10)[0])
    assert committer.stats.committed == ["a", "b"] and committer.stats.failed == {}
    assert committer.retries.counts == {"throttled": 3}
    assert fs.attempts == [shard_file(root, "a")] * 4 + [checkpoint_file(root, "a"), shard_file(root, "b"),
                                                         checkpoint_file(root, "b")]
    assert committed_shards(fs, root) == {"a", "b"}


def test_a_shard_whose_writes_keep_failing_is_reported_failed_and_has_no_checkpoint(root):
    fs = StoreFS(fail_paths=("/_checkpoints/bad.json",))  # its Parquet file is written, its checkpoint never
    with ShardCommitter(fs, root, writers=2, retries=StoreRetries(FAST_RETRY)) as committer:
        for batch in batches(shard_rows("bad", 2) + shard_rows("good", 2), 3):
            committer.add(batch)
    assert committer.stats.committed == ["good"]
    assert list(committer.stats.failed) == ["bad"]
    reason = committer.stats.failed["bad"]
    path = f"memory://{checkpoint_file(root, 'bad')}"
    assert reason.startswith(f"cannot write {path}: the store answered 503 SlowDown for "), reason
    assert reason.endswith(" s (--store-retry-seconds 0.05)"), reason
    assert fs.attempts.count(checkpoint_file(root, "bad")) >= 2  # retried until the budget was spent
    assert not fs.exists(checkpoint_file(root, "bad")) and committed_shards(fs, root) == {"good"}
    assert committer.stats.rows == 2  # the failed shard's rows are not counted


def test_an_answer_that_retrying_cannot_change_fails_the_shard_at_once(root):
    fs = StoreFS(fail_paths=("/shards/denied.",), error=lambda: s3_error(403, "AccessDenied", "Access Denied"))
    slow = RetryPolicy(budget_s=300)  # were it retried, the test would wait for minutes
    with ShardCommitter(fs, root, writers=2, retries=StoreRetries(slow)) as committer:
        committer.add(batches(shard_rows("denied", 1) + shard_rows("good", 1), 10)[0])
    assert committer.stats.committed == ["good"]
    reason = "cannot write shard denied: the store answered 403 AccessDenied (Access Denied)"
    assert committer.stats.failed == {"denied": reason}
    assert fs.attempts.count(shard_file(root, "denied")) == 1 and committer.retries.counts == {}


def test_add_does_not_wait_for_a_slow_store_while_a_writer_is_free(root):
    gate = threading.Event()
    fs = StoreFS(gate=gate)
    committer = ShardCommitter(fs, root, writers=1, queued=1, retries=StoreRetries(FAST_RETRY))
    committer.add(batches(shard_rows("a", 2), 10)[0])  # returns: its write waits on the store, in a writer
    assert fs.entered.wait(WAIT_S) and fs.writes == []
    committer.add(batches(shard_rows("b", 2), 10)[0])  # returns: the queue holds it

    third = threading.Thread(target=committer.add, args=(batches(shard_rows("c", 2), 10)[0],))
    third.start()
    third.join(0.5)
    assert third.is_alive() and fs.writes == []  # backpressure: every writer busy, the queue full

    gate.set()
    third.join(WAIT_S)
    assert not third.is_alive()
    assert committer.close().committed == ["a", "b", "c"]


def test_a_marker_of_an_unreadable_shard_drops_its_rows_and_reports_it(root):
    fs = StoreFS()
    rows = [sample_row("x", 0), sample_row("x", 1), end_row("x", -1, "cannot read shard x.tar: unexpected end of data"),
            sample_row("x", 2), *shard_rows("y", 1)]
    with ShardCommitter(fs, root, retries=StoreRetries(FAST_RETRY)) as committer:
        for batch in batches(rows, 2):
            committer.add(batch)
    assert committer.stats.failed == {"x": "cannot read shard x.tar: unexpected end of data"}
    assert committer.stats.committed == ["y"] and committer.open == {}
    assert not any("/x." in path for path in fs.attempts)  # nothing of it written


def test_before_commit_runs_on_the_writer_before_each_write_and_its_error_stops_the_run(root):
    fs = StoreFS()
    checks = []

    def lease_check():
        checks.append(threading.current_thread().name)
        if len(checks) > 2:  # lost after the first shard's two files
            raise RuntimeError("lost the lease")

    committer = ShardCommitter(fs, root, before_commit=lease_check, writers=1, retries=StoreRetries(FAST_RETRY))
    committer.add(batches(shard_rows("a", 1), 10)[0])
    committer.add(batches(shard_rows("b", 1), 10)[0])
    with pytest.raises(RuntimeError, match="lost the lease"):
        committer.close()
    assert all(name.startswith("shard-writer") for name in checks) and len(checks) == 3
    assert committer.stats.committed == ["a"] and committer.stats.failed == {"b": "lost the lease"}
    assert fs.writes == [shard_file(root, "a"), checkpoint_file(root, "a")]
    with pytest.raises(RuntimeError, match="lost the lease"):  # and the loop feeding it stops
        committer.add(batches(shard_rows("c", 1), 10)[0])
