"""The CPU preprocessing stage and the captioning actor, as Ray Data ``map_batches`` callables.

Rows flow as Arrow tables with explicit schemas. A row whose ``key`` is null is an end-of-shard marker that
passes through untouched, so that the commit stage learns each shard's size (or why it could not be read).
"""

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch

from fms_smolvlm.captioner import CaptionResult
from fms_smolvlm.processing import ProcessedSample, SourceImage, TilePlan
from pipeline.artifacts import SharedArtifacts, warm_up
from pipeline.commit import ROUTING_COLUMNS, output_schema
from pipeline.config import PreprocessSettings, ReplicaSettings
from pipeline.retry import RetryPolicy, StoreRetries
from pipeline.storage import resolve

logger = logging.getLogger(__name__)

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
        # uint8 (num_tiles, 3, M, M), once for every prompt; or, with a resize plan, the image's (height, width, 3)
        ("tiles", pa.large_binary()),
        ("num_tiles", pa.int32()),
        # the replica resizes and tiles the image: [resized width, height, grid width, height, tile] (TilePlan)
        ("resize_plan", pa.list_(pa.int32())),
    ]
)

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
        tiles = sample.tiles if ok else None
        source = isinstance(tiles, SourceImage)
        columns["tiles"].append(None if tiles is None else tiles.pixels.tobytes() if source else tiles.tobytes())
        columns["num_tiles"].append(sample.num_tiles if ok else None)
        columns["resize_plan"].append([*tiles.plan.resized, *tiles.plan.grid, tiles.plan.tile] if source else None)
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
            started = time.perf_counter()
            self.captioner = Captioner.from_pretrained(
                settings.model,
                device=settings.device,
                dtype=settings.dtype,
                compile=settings.compile,
                max_batch_size=settings.slots,
                revision=settings.revision,
            )
            loaded = time.perf_counter()
            warmup = warm_up(self.captioner.engine, shared_artifacts(settings)) if settings.compile else {}
            self.start = start_report(self.captioner, loaded - started, time.perf_counter() - loaded, warmup)
            logger.info("replica ready in %.1f s: %s", self.start["ready_s"], self.start)
            return self.captioner.engine

        self.engine = BackgroundEngine(load)
        self.device = self.captioner.engine.device
        self.prompts = settings.prompts
        self.params = tuple(SamplingParams(prompt.max_new_tokens) for prompt in settings.prompts)
        self.schema = pa.schema(list(output_schema([p.columns for p in settings.prompts], settings.video)) + ROUTING_COLUMNS)
        self.tile_size = self.captioner.preprocessor.settings.tile_size
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{self.device}:node-{_ray_node_id()[:12]}"
        self.start_json = json.dumps(self.start, sort_keys=True)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        samples, requests = self.captioner.requests([self._sample(row) for row in rows], [0] * len(rows),
                                                    [self.params] * len(rows))
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
            tiles = request.tiles
            on_device = SourceImage(self._copy(tiles.pixels), tiles.plan) if isinstance(tiles, SourceImage) else self._copy(tiles)
            request = replace(request, tiles=on_device)
        return await asyncio.wrap_future(self.engine.submit(request))

    def _copy(self, array: np.ndarray) -> torch.Tensor:
        """To the GPU through pinned memory, asynchronously (the array is Arrow's read-only buffer: one copy into
        the pinned tensor, no warning)."""
        pinned = torch.empty(array.shape, dtype=torch.uint8, pin_memory=True)
        pinned.numpy()[...] = array
        return pinned.to(self.device, non_blocking=True)

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
        columns["replica_start"].append(self.start_json)

    def _sample(self, row: dict) -> ProcessedSample:
        if row["key"] is None:  # a marker: nothing to generate
            return ProcessedSample((), None, error="end of shard")
        if row["error"] is not None:
            return ProcessedSample((), None, error=row["error"])
        ids = tuple(np.frombuffer(data, dtype=np.int32).astype(np.int64) for data in row["prompt_ids"])
        return ProcessedSample(ids, self._tiles(row), row["width"], row["height"], num_frames=row["num_frames"])

    def _tiles(self, row: dict):
        if row["tiles"] is None:
            return None
        pixels = np.frombuffer(row["tiles"], dtype=np.uint8)
        if row["resize_plan"] is None:
            return pixels.reshape(row["num_tiles"], 3, self.tile_size, self.tile_size)
        resized_w, resized_h, grid_w, grid_h, tile = row["resize_plan"]
        size = (row["width"], row["height"])
        plan = TilePlan(size, (resized_w, resized_h), (grid_w, grid_h), tile)
        return SourceImage(pixels.reshape(row["height"], row["width"], 3), plan)


def shared_artifacts(settings: ReplicaSettings) -> SharedArtifacts:
    """The job's compile artifacts in its output, reached with the job's storage options and retry policy."""
    fs, root = resolve(settings.output, settings.storage_options)
    return SharedArtifacts(fs, root, StoreRetries(RetryPolicy(settings.store_retry_seconds)))


def start_report(captioner, load_s: float, warmup_s: float, warmup: dict) -> dict:
    """How a replica started, for its log and the job's summary: seconds to load and to warm up, graphs compiled
    and loaded, where its compiled artifact came from (``local``, ``fetched``, ``compiled``; None: eager)."""
    return {
        "ready_s": round(load_s + warmup_s, 2),
        "load_s": round(load_s, 2),
        "warmup_s": round(warmup_s, 2),
        "dtype": str(captioner.model.dtype).removeprefix("torch."),
        "graphs_compiled": warmup.get("graphs_compiled", 0),
        "graphs_loaded": warmup.get("graphs_loaded", 0),
        "artifact": warmup.get("artifact_source"),
    }


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
