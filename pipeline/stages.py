"""The CPU preprocessing stage and the captioning actor, as Ray Data ``map_batches`` callables.

Rows flow as Arrow tables with explicit schemas. A row whose ``key`` is null is an end-of-shard marker that
passes through untouched, so that the commit stage learns each shard's size (or why it could not be read).
"""

import asyncio
import os
import socket
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch

from fms_smolvlm.captioner import CaptionResult
from fms_smolvlm.processing import ProcessedSample
from pipeline.commit import output_schema
from pipeline.config import PreprocessSettings, ReplicaSettings

PREPROCESSED_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("shard_size", pa.int64()),  # null on samples; the marker's sample count, or -1: the shard failed
        ("index", pa.int64()),  # position in the shard; -1 for a shard marker
        ("key", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_frames", pa.int32()),  # a video's sampled frames; null for an image
        ("prompt_ids", pa.list_(pa.binary())),  # int32 token ids, one per prompt
        ("tiles", pa.large_binary()),  # uint8 (num_tiles, 3, M, M), once for every prompt
        ("num_tiles", pa.int32()),
    ]
)
# what the commit stage needs besides the output columns: to group rows by shard, and to report replicas
ROUTING_COLUMNS = [("shard_size", pa.int64()), ("index", pa.int64()), ("replica", pa.string())]

# Ray Data batches a replica holds at once: while one waits for its last caption, the others keep the slots full
BATCHES_IN_FLIGHT = 3


def preprocess_batch(batch: pa.Table, settings: PreprocessSettings) -> pa.Table:
    """Decode, orient, tile (or sample a clip's frames) and tokenize every prompt for each sample; a bad image or
    video becomes a row with ``error`` set."""
    preprocessor = settings.preprocessor()
    columns = {name: [] for name in PREPROCESSED_SCHEMA.names}
    for row in batch.to_pylist():
        if row["key"] is None or row["error"] is not None:  # a marker, or a sample the reader found no media in
            sample = ProcessedSample((), None, error=row["error"])
        else:
            sample = preprocessor.process(row["media"], settings.prompts)
        ok = sample.error is None
        for name in ("shard_id", "shard_size", "index", "key"):
            columns[name].append(row[name])
        columns["error"].append(sample.error)
        columns["width"].append(sample.width)
        columns["height"].append(sample.height)
        columns["num_frames"].append(sample.num_frames)
        columns["prompt_ids"].append([ids.astype(np.int32).tobytes() for ids in sample.prompt_ids] if ok else None)
        columns["tiles"].append(sample.tiles.tobytes() if ok and sample.tiles is not None else None)
        columns["num_tiles"].append(sample.num_tiles if ok else None)
    return pa.table(columns, schema=PREPROCESSED_SCHEMA)


class CaptionActor:
    """One model replica: loads (and compiles, and warms up) once, then serves several Ray Data batches at a time.

    ``__call__`` is a coroutine: every batch in flight submits its rows to the replica's one engine loop (a thread
    that decodes continuously), and comes back when its last row is captioned. Turning Arrow rows into requests
    happens while the engine decodes other batches' rows.
    """

    def __init__(self, settings: ReplicaSettings):
        from fms_smolvlm import Captioner
        from fms_smolvlm.generation import BackgroundEngine, SamplingParams

        if settings.cpu_threads:  # Ray limits a 1-CPU worker to one thread; a CPU replica uses its share of the node
            torch.set_num_threads(settings.cpu_threads)

        def load():  # on the engine's thread, the only one that runs the model (BackgroundEngine says why)
            self.captioner = Captioner.from_pretrained(
                settings.model,
                device=settings.device,
                dtype=settings.dtype,
                compile=settings.compile,
                max_batch_size=settings.slots,
                warmup=settings.compile,
                revision=settings.revision,
            )
            return self.captioner.engine

        self.engine = BackgroundEngine(load)
        self.device = self.captioner.engine.device
        self.prompts = settings.prompts
        self.params = tuple(SamplingParams(prompt.max_new_tokens) for prompt in settings.prompts)
        self.schema = pa.schema(list(output_schema([p.columns for p in settings.prompts], settings.video)) + ROUTING_COLUMNS)
        self.tile_size = self.captioner.preprocessor.settings.tile_size
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{self.device}:node-{_ray_node_id()[:12]}"

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        samples = [self._sample(row) for row in rows]
        requests = self.captioner.requests(samples, [0] * len(samples), [self.params] * len(samples))
        generations = await asyncio.gather(*(self._generate(request) for request in requests))
        columns = {name: [] for name in self.schema.names}
        for row, sample, generation in zip(rows, samples, generations):
            if row["key"] is None:  # an end-of-shard marker passes through: the commit stage learns the shard's size
                results = [CaptionResult(None, [], None, None, None, row["error"])] * len(self.prompts)
            else:
                results = self.captioner.results(sample, generation, len(self.prompts))
            self._append(columns, row, results)
        return pa.table(columns, schema=self.schema)

    async def _generate(self, request):
        """The request's generations (one per prompt); None for a sample without one (its error row needs none)."""
        if request is None:
            return None
        if request.tiles is not None and self.device.type == "cuda":
            # copied here, while the engine thread decodes, instead of by the engine when the request gets a slot
            tiles = torch.from_numpy(request.tiles).pin_memory().to(self.device, non_blocking=True)
            request = replace(request, tiles=tiles)
        return await asyncio.wrap_future(self.engine.submit(request))

    def _append(self, columns: dict, row: dict, results: list[CaptionResult]) -> None:
        failed = results[0].error is not None
        for name in ("shard_id", "shard_size", "index", "key", "width", "height", "num_frames"):
            if name in columns:
                columns[name].append(row[name])
        columns["error"].append(results[0].error)
        columns["num_image_tokens"].append(None if failed else results[0].num_image_tokens)
        for prompt, result in zip(self.prompts, results):
            text, finish_reason, tokens = prompt.columns
            columns[text].append(result.text)
            columns[finish_reason].append(result.finish_reason)
            columns[tokens].append(None if failed else result.num_generated_tokens)
        columns["replica"].append(self.replica)

    def _sample(self, row: dict) -> ProcessedSample:
        if row["key"] is None:  # a marker: nothing to generate
            return ProcessedSample((), None, error="end of shard")
        if row["error"] is not None:
            return ProcessedSample((), None, error=row["error"])
        ids = tuple(np.frombuffer(data, dtype=np.int32).astype(np.int64) for data in row["prompt_ids"])
        tiles = None
        if row["tiles"] is not None:
            tiles = np.frombuffer(row["tiles"], dtype=np.uint8).reshape(row["num_tiles"], 3, self.tile_size, self.tile_size)
        return ProcessedSample(ids, tiles, row["width"], row["height"], num_frames=row["num_frames"])


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
