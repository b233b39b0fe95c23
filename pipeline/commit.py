"""The commit stage: a shard's rows become one Parquet file, written atomically, then its checkpoint.

It is the streaming sink of the job: caption rows arrive in any order and interleaved across shards, and
each shard's end-of-shard marker (a row whose ``key`` is null) arrives among them with the shard's sample
count, or -1 when the shard could not be read. A shard is complete once its marker and all its rows are in;
it is then handed to a small pool of writer threads, so that the loop pulling results does not wait on
storage while a writer is free (``add`` blocks only when every writer is busy and the queue is full).
Each writer puts the Parquet file, then the checkpoint, under the job's store retry policy; so the output
grows shard by shard while the job runs and a crash loses only the shards in flight.
"""

import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.retry import StoreRetries, StoreUnavailableError, describe
from pipeline.storage import join, json_bytes, list_names, write_atomic

logger = logging.getLogger(__name__)

UNNAMED_PROMPT_COLUMNS = ("caption", "finish_reason", "num_generated_tokens")


def output_schema(prompt_columns: Sequence[tuple] = (UNNAMED_PROMPT_COLUMNS,), video: bool = False) -> pa.Schema:
    """The committed files' columns. ``prompt_columns``: per prompt, its (text, finish reason, token count)
    columns; with one unnamed prompt, the files are ``caption``, ``finish_reason``, ``num_generated_tokens`` among
    the shared columns. ``video``: a SmolVLM2 checkpoint's files also say how many frames a clip gave."""
    return pa.schema(
        [("key", pa.string()), ("shard_id", pa.string())]
        + [(text, pa.string()) for text, _, _ in prompt_columns]
        + [("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("num_image_tokens", pa.int32())]
        + [field for _, finish, tokens in prompt_columns for field in ((tokens, pa.int32()), (finish, pa.string()))]
        + ([("num_frames", pa.int32())] if video else [])
    )


OUTPUT_SCHEMA = output_schema()  # one unnamed prompt, an image checkpoint
# what the caption stage sends besides the output columns: to group rows by shard, and to report replicas (their
# names, and how each started: a JSON object, pipeline.stages.start_report)
ROUTING_COLUMNS = [("shard_size", pa.int64()), ("index", pa.int64()), ("replica", pa.string()), ("replica_start", pa.string())]
SHARDS_DIR = "shards"
CHECKPOINTS_DIR = "_checkpoints"


def shard_file(root: str, shard_id: str) -> str:
    return join(root, SHARDS_DIR, f"{shard_id}.parquet")


def checkpoint_file(root: str, shard_id: str) -> str:
    return join(root, CHECKPOINTS_DIR, f"{shard_id}.json")


def committed_shards(fs: fsspec.AbstractFileSystem, root: str, retries: Optional[StoreRetries] = None) -> set[str]:
    """Shards with a checkpoint. A Parquet file without one (a crash in between) is redone and replaced. Listed under
    ``retries`` (the default policy if None)."""
    directory = join(root, CHECKPOINTS_DIR)
    listed = (retries or StoreRetries()).call(f"list {fs.unstrip_protocol(directory)}",
                                              lambda: list_names(fs, directory, ".json"))
    return set(listed)


def parquet_bytes(rows: list[dict], schema: pa.Schema = OUTPUT_SCHEMA) -> bytes:
    table = pa.Table.from_pylist(rows, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


class _CommitsStopped(Exception):
    """``before_commit`` refused a write (the output lease was lost): no shard may be written any more.
    Its error is the cause."""


@dataclass
class _OpenShard:
    first_seen: float
    size: Optional[int] = None  # known once the end-of-shard marker has arrived
    rows: dict = field(default_factory=dict)  # index -> output row (a retried task cannot duplicate one)
    replicas: set = field(default_factory=set)


@dataclass
class CommitStats:
    committed: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # shard_id -> reason
    rows: int = 0
    error_rows: int = 0
    generated_tokens: int = 0
    first_commit_at: Optional[float] = None  # time.time() of the first commit: the end of the start-up
    replicas: dict = field(default_factory=dict)  # replica -> how it started (its start report, a JSON object)


class ShardCommitter:
    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        before_commit: Callable[[], None] = lambda: None,
        schema: pa.Schema = OUTPUT_SCHEMA,
        writers: int = 8,
        queued: int = 8,
        retries: Optional[StoreRetries] = None,
    ):
        """``before_commit`` runs (on a writer thread) before every attempt to put a shard's files, and raises to stop
        the run from writing (the output lease was lost). ``schema``: the output files' (:func:`output_schema`).
        ``writers`` shards are written at a time and up to ``queued`` more wait for a writer; beyond that ``add``
        waits. Puts run under ``retries`` (the default policy if None)."""
        self.fs = fs
        self.root = root
        self.schema = schema
        self.token_columns = [name for name in schema.names if name.endswith("num_generated_tokens")]
        self.before_commit = before_commit
        self.retries = retries or StoreRetries()
        self.open: dict[str, _OpenShard] = {}
        self.closed: set[str] = set()  # handed to a writer, or failed: rows that still come are duplicates
        self.stats = CommitStats()
        self._lock = threading.Lock()  # guards stats and the stop reason, which writer threads update
        self._stopped_by: Optional[BaseException] = None
        self._slots = threading.BoundedSemaphore(writers + queued)
        self._writers = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="shard-writer")

    def __enter__(self) -> "ShardCommitter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def add(self, batch: pa.Table) -> None:
        """Take a batch of caption rows and end-of-shard markers; hand each completed shard to a writer.

        Raises ``before_commit``'s error once it has refused a write: the run should stop."""
        self._raise_if_stopped()
        for row in batch.to_pylist():
            self._add_row(row)

    def close(self) -> CommitStats:
        """Wait until every shard handed to a writer is written or has failed; report; return the stats.

        Raises ``before_commit``'s error if it refused a write."""
        self._writers.shutdown(wait=True)
        logger.info(
            "commits finished: %d shards committed, %d failed, %d incomplete (rows or end marker missing)",
            len(self.stats.committed), len(self.stats.failed), len(self.open),
        )
        self._raise_if_stopped()
        return self.stats

    def _add_row(self, row: dict) -> None:
        shard_id = row["shard_id"]
        if shard_id in self.closed:  # a retried task's late duplicate, or a row of a shard that failed
            return
        shard = self.open.setdefault(shard_id, _OpenShard(time.time()))
        if row["key"] is None:
            if row["shard_size"] < 0:
                self.open.pop(shard_id)  # rows it sent before it failed: nothing partial is committed
                self.closed.add(shard_id)
                self._record_failure(shard_id, row["error"])
                return
            shard.size = row["shard_size"]
        else:
            shard.rows[row["index"]] = {name: row[name] for name in self.schema.names}
            shard.replicas.add(row["replica"])
            if row["replica"] not in self.stats.replicas:
                self.stats.replicas[row["replica"]] = json.loads(row["replica_start"])
        if len(shard.rows) == shard.size:
            self.closed.add(shard_id)
            self._hand_to_writer(shard_id, self.open.pop(shard_id))

    def _hand_to_writer(self, shard_id: str, shard: _OpenShard) -> None:
        self._slots.acquire()  # backpressure: waits only while every writer is busy and the queue is full
        written = self._writers.submit(self._write_shard, shard_id, shard)
        written.add_done_callback(lambda _: self._slots.release())

    def _write_shard(self, shard_id: str, shard: _OpenShard) -> None:
        """On a writer thread: the Parquet file, then the checkpoint; committed only when both are written."""
        rows = [shard.rows[index] for index in sorted(shard.rows)]
        errors = sum(row["error"] is not None for row in rows)
        tokens = sum(row[column] or 0 for row in rows for column in self.token_columns)
        try:
            self._put(shard_file(self.root, shard_id), parquet_bytes(rows, self.schema))
            checkpoint = {
                "shard_id": shard_id,
                "rows": len(rows),
                "error_rows": errors,
                "generated_tokens": tokens,
                "seconds": round(time.time() - shard.first_seen, 3),
                "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "replicas": sorted(shard.replicas),
            }
            self._put(checkpoint_file(self.root, shard_id), json_bytes(checkpoint))
        except _CommitsStopped as stopped:
            self._record_stop(shard_id, stopped.__cause__)
            return
        except StoreUnavailableError as error:  # the store stayed away for the whole budget
            self._record_failure(shard_id, str(error))
            return
        except Exception as error:  # an answer that retrying cannot change, or rows that do not fit the schema
            self._record_failure(shard_id, f"cannot write shard {shard_id}: {describe(error)}")
            return
        self._record_commit(shard_id, len(rows), errors, tokens)

    def _put(self, path: str, data: bytes) -> None:
        """Write a whole file atomically, under the store's retry policy, asking ``before_commit`` before every
        attempt: the lease may run out while the store is away."""

        def attempt() -> None:
            try:
                self.before_commit()
            except Exception as error:
                raise _CommitsStopped() from error
            write_atomic(self.fs, path, data)

        self.retries.call(f"write {self.fs.unstrip_protocol(path)}", attempt)

    def _record_commit(self, shard_id: str, rows: int, errors: int, tokens: int) -> None:
        with self._lock:
            self.stats.committed.append(shard_id)
            if self.stats.first_commit_at is None:
                self.stats.first_commit_at = time.time()
            self.stats.rows += rows
            self.stats.error_rows += errors
            self.stats.generated_tokens += tokens
        logger.info("committed shard %s: %d rows, %d errors", shard_id, rows, errors)

    def _record_failure(self, shard_id: str, reason: str) -> None:
        with self._lock:
            self.stats.failed[shard_id] = reason
        logger.error("shard %s failed: %s", shard_id, reason)

    def _record_stop(self, shard_id: str, error: BaseException) -> None:
        with self._lock:
            self._stopped_by = self._stopped_by or error
        self._record_failure(shard_id, str(error))

    def _raise_if_stopped(self) -> None:
        with self._lock:
            stopped = self._stopped_by
        if stopped is not None:
            raise stopped
