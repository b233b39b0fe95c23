"""The commit stage: a shard's rows become one Parquet file, written atomically, then its checkpoint.

It is the streaming sink of the job: caption rows arrive in any order and interleaved across shards;
a shard is committed the moment its last sample arrives (rows carry the shard's sample count), so
the output grows shard by shard while the job runs and a crash loses only the shards in flight.
"""

import io
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import join, list_names, write_atomic, write_json

logger = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard_id", pa.string()),
        ("caption", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_image_tokens", pa.int32()),
        ("num_generated_tokens", pa.int32()),
        ("finish_reason", pa.string()),
    ]
)
SHARDS_DIR = "shards"
CHECKPOINTS_DIR = "_checkpoints"


def shard_file(root: str, shard_id: str) -> str:
    return join(root, SHARDS_DIR, f"{shard_id}.parquet")


def checkpoint_file(root: str, shard_id: str) -> str:
    return join(root, CHECKPOINTS_DIR, f"{shard_id}.json")


def committed_shards(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """Shards with a checkpoint. A Parquet file without one (a crash in between) is redone and replaced."""
    return set(list_names(fs, join(root, CHECKPOINTS_DIR), ".json"))


def parquet_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


@dataclass
class _OpenShard:
    size: int
    first_seen: float
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


class ShardCommitter:
    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, before_commit: Callable[[], None] = lambda: None):
        """``before_commit`` raises to stop the run from writing (the output lease was lost)."""
        self.fs = fs
        self.root = root
        self.before_commit = before_commit
        self.open: dict[str, _OpenShard] = {}
        self.committed: set[str] = set()
        self.stats = CommitStats()

    def add(self, batch: pa.Table) -> None:
        for row in batch.to_pylist():
            shard_id = row["shard_id"]
            if row["shard_size"] < 0:
                self.stats.failed[shard_id] = row["error"]
                logger.error("shard %s failed: %s", shard_id, row["error"])
                continue
            if shard_id in self.committed:  # a retried task's late duplicate: the shard is already on disk
                continue
            shard = self.open.setdefault(shard_id, _OpenShard(row["shard_size"], time.time()))
            if row["key"] is not None:
                shard.rows[row["index"]] = {name: row[name] for name in OUTPUT_SCHEMA.names}
                shard.replicas.add(row["replica"])
            if len(shard.rows) == shard.size:
                self._commit(shard_id, self.open.pop(shard_id))

    def _commit(self, shard_id: str, shard: _OpenShard) -> None:
        rows = [shard.rows[index] for index in sorted(shard.rows)]
        self.before_commit()
        write_atomic(self.fs, shard_file(self.root, shard_id), parquet_bytes(rows))
        errors = sum(row["error"] is not None for row in rows)
        tokens = sum(row["num_generated_tokens"] or 0 for row in rows)
        write_json(
            self.fs,
            checkpoint_file(self.root, shard_id),
            {
                "shard_id": shard_id,
                "rows": len(rows),
                "error_rows": errors,
                "generated_tokens": tokens,
                "seconds": round(time.time() - shard.first_seen, 3),
                "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "replicas": sorted(shard.replicas),
            },
        )
        self.committed.add(shard_id)
        self.stats.committed.append(shard_id)
        if self.stats.first_commit_at is None:
            self.stats.first_commit_at = time.time()
        self.stats.rows += len(rows)
        self.stats.error_rows += errors
        self.stats.generated_tokens += tokens
        logger.info("committed shard %s: %d rows, %d errors", shard_id, len(rows), errors)
