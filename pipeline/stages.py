"""The CPU preprocessing stage and the captioning actor, as Ray Data ``map_batches`` callables.

Rows flow as Arrow tables with explicit schemas. A row whose ``key`` is null is a shard marker (an
empty or unreadable shard) that passes through untouched so the commit stage learns about the shard.
"""

import asyncio
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
        ok = sample.error is None and bool(sample.prompt_ids)
        columns["input_ids"].append(sample.input_ids.astype(np.int32).tobytes() if ok else None)
        columns["tiles"].append(sample.tiles.tobytes() if ok else None)
        columns["num_tiles"].append(sample.num_tiles if ok else None)
    return pa.table(columns, schema=PREPROCESSED_SCHEMA)


def _preprocess_row(preprocessor: SmolVLMPreprocessor, row: dict, prompt: str) -> ProcessedSample:
    if row["key"] is None or row["error"] is not None:  # a shard marker, or a sample the reader found no image in
        return ProcessedSample((), None, error=row["error"])
    return preprocessor.process(row["image"], [prompt])


# Ray Data batches a replica holds at once: while one waits for its last caption, the others keep the slots full
BATCHES_IN_FLIGHT = 3


class CaptionActor:
    """One model replica: loads (and compiles, and warms up) once, then serves several Ray Data batches at a time.

    ``__call__`` is a coroutine: every batch in flight submits its rows to the replica's one engine loop (a thread
    that decodes continuously), and comes back when its last row is captioned. Turning Arrow rows into requests
    happens while the engine decodes other batches' rows.
    """

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
    ):
        import torch

        from fms_smolvlm import Captioner
        from fms_smolvlm.generation import BackgroundEngine, SamplingParams

        if cpu_threads:  # Ray limits a 1-CPU worker to one thread; a CPU replica should use its share of the node
            torch.set_num_threads(cpu_threads)
        self.captioner = Captioner.from_pretrained(
            model, device=device, dtype=dtype, compile=compile, max_batch_size=batch_size, warmup=compile,
            revision=revision,
        )
        self.engine = BackgroundEngine(self.captioner.engine)
        self.params = SamplingParams(max_new_tokens)
        self.tile_size = self.captioner.preprocessor.settings.tile_size
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{self.captioner.engine.device}"

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        samples = [self._sample(row) for row in rows if row["key"] is not None]
        requests = self.captioner.requests(samples, [0] * len(samples), [self.params] * len(samples))
        generations = await asyncio.gather(*(self._generate(request) for request in requests))
        results = iter(self.captioner.result(s, g) for s, g in zip(samples, generations))
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

    async def _generate(self, request):
        """The request's generation; None for a sample without one (its error row needs none)."""
        if request is None:
            return None
        return (await asyncio.wrap_future(self.engine.submit(request)))[0]

    def _sample(self, row: dict) -> ProcessedSample:
        if row["error"] is not None:
            return ProcessedSample((), None, error=row["error"])
        ids = np.frombuffer(row["input_ids"], dtype=np.int32).astype(np.int64)
        tiles = np.frombuffer(row["tiles"], dtype=np.uint8).reshape(row["num_tiles"], 3, self.tile_size, self.tile_size)
        return ProcessedSample((ids,), tiles, row["width"], row["height"])
