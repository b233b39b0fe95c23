"""The CPU preprocessing stage and the captioning actor, as Ray Data ``map_batches`` callables.

Rows flow as Arrow tables with explicit schemas. A row whose ``key`` is null is a shard marker (an
empty or unreadable shard) that passes through untouched so the commit stage learns about the shard.
"""

import os
import socket
from functools import lru_cache
from typing import Optional

import numpy as np
import pyarrow as pa

from fms_smolvlm.captioner import CaptionResult
from fms_smolvlm.checkpoint import resolve_checkpoint
from fms_smolvlm.processing import ProcessedSample, SmolVLMPreprocessor
from pipeline.commit import OUTPUT_SCHEMA

PREPROCESSED_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("shard_size", pa.int64()),  # -1: the shard could not be read (error says why)
        ("index", pa.int64()),  # position in the shard; -1 for a shard marker
        ("key", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("input_ids", pa.binary()),  # int32 token ids
        ("tiles", pa.binary()),  # uint8 (num_tiles, 3, M, M)
        ("num_tiles", pa.int32()),
    ]
)

# the output columns, plus what the commit stage needs to group rows by shard and to report replicas
CAPTION_SCHEMA = pa.schema(
    list(OUTPUT_SCHEMA) + [("shard_size", pa.int64()), ("index", pa.int64()), ("replica", pa.string())]
)


@lru_cache(maxsize=4)
def _preprocessor(model: str, revision, image_longest_edge, image_splitting, max_image_pixels) -> SmolVLMPreprocessor:
    # one per worker process: the tokenizer and configs load once, not per batch
    model_dir = resolve_checkpoint(model, weights=False, revision=revision)
    return SmolVLMPreprocessor.from_pretrained(model_dir, image_longest_edge, image_splitting, max_image_pixels)


def preprocess_batch(
    batch: pa.Table,
    model: str,
    revision: Optional[str],
    prompt: str,
    image_longest_edge: Optional[int],
    image_splitting: Optional[bool],
    max_image_pixels: int,
) -> pa.Table:
    """Decode, orient, tile and tokenize each image; a bad image becomes a row with ``error`` set."""
    preprocessor = _preprocessor(model, revision, image_longest_edge, image_splitting, max_image_pixels)
    columns = {name: [] for name in PREPROCESSED_SCHEMA.names}
    for row in batch.to_pylist():
        sample = _preprocess_row(preprocessor, row, prompt)
        columns["shard_id"].append(row["shard_id"])
        for name in ("shard_size", "index", "key"):
            columns[name].append(row[name])
        columns["error"].append(sample.error)
        columns["width"].append(sample.width)
        columns["height"].append(sample.height)
        ok = sample.error is None and sample.input_ids is not None
        columns["input_ids"].append(sample.input_ids.astype(np.int32).tobytes() if ok else None)
        columns["tiles"].append(sample.tiles.tobytes() if ok else None)
        columns["num_tiles"].append(sample.num_tiles if ok else None)
    return pa.table(columns, schema=PREPROCESSED_SCHEMA)


def _preprocess_row(preprocessor: SmolVLMPreprocessor, row: dict, prompt: str) -> ProcessedSample:
    if row["key"] is None or row["error"] is not None:  # a shard marker, or a sample the reader found no image in
        return ProcessedSample(None, None, error=row["error"])
    return preprocessor.process(row["image"], prompt)


class CaptionActor:
    """One model replica. Loads (and compiles, and warms up) once; then captions batch after batch."""

    def __init__(
        self,
        model: str,
        revision: Optional[str],
        max_new_tokens: int,
        batch_size: int,
        device: str,
        dtype: str,
        compile: bool,
        cpu_threads: Optional[int] = None,
        fail_after_batches: Optional[int] = None,
    ):
        import torch

        from fms_smolvlm import Captioner

        if cpu_threads:  # Ray limits a 1-CPU worker to one thread; a CPU replica should use its share of the node
            torch.set_num_threads(cpu_threads)
        self.captioner = Captioner.from_pretrained(
            model, device=device, dtype=dtype, compile=compile, max_batch_size=batch_size, warmup=compile,
            revision=revision,
        )
        self.max_new_tokens = max_new_tokens
        self.tile_size = self.captioner.preprocessor.settings.tile_size
        # fault injection for the crash-recovery tests: raise after this many batches
        self.fail_after_batches = fail_after_batches
        self.batches = 0
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{self.captioner.engine.device}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        if self.fail_after_batches is not None and self.batches > self.fail_after_batches:
            raise RuntimeError(f"injected failure after {self.fail_after_batches} batches (pid {os.getpid()})")
        rows = batch.to_pylist()
        samples = [self._sample(row) for row in rows if row["key"] is not None]
        results = iter(self.captioner.generate_processed(samples, [0] * len(samples), self.max_new_tokens))
        columns = {name: [] for name in CAPTION_SCHEMA.names}
        for row in rows:
            # shard markers pass through: they tell the commit stage about empty or unreadable shards
            result = CaptionResult(None, [], None, None, None, row["error"]) if row["key"] is None else next(results)
            for name in ("shard_id", "shard_size", "index", "key", "width", "height"):
                columns[name].append(row[name])
            columns["caption"].append(result.text)
            columns["error"].append(result.error)
            columns["num_image_tokens"].append(result.num_image_tokens if result.error is None else None)
            columns["num_generated_tokens"].append(result.num_generated_tokens if result.error is None else None)
            columns["finish_reason"].append(result.finish_reason)
            columns["replica"].append(self.replica)
        return pa.table(columns, schema=CAPTION_SCHEMA)

    def _sample(self, row: dict) -> ProcessedSample:
        if row["error"] is not None:
            return ProcessedSample(None, None, error=row["error"])
        ids = np.frombuffer(row["input_ids"], dtype=np.int32).astype(np.int64)
        tiles = np.frombuffer(row["tiles"], dtype=np.uint8).reshape(row["num_tiles"], 3, self.tile_size, self.tile_size)
        return ProcessedSample(ids, tiles, row["width"], row["height"])
