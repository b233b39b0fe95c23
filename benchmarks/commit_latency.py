"""Commit latency: what a slow object store costs the commit stage, one writer at a time vs the writer pool.

S3 is moto's server on 127.0.0.1 behind infra/local/s3_proxy.py, which adds a fixed latency to every request
(0 ms: a store next door; 150 ms: a remote region, or a busy one).

    python benchmarks/commit_latency.py                   # the committer alone: 48 small shards, 0 and 150 ms
    python benchmarks/commit_latency.py --latency-ms 0 50 150 --writers 1 4 16 --shards 96
    python benchmarks/commit_latency.py --job             # the whole job (cpu-mid random model, CPU) on the same store

Committer mode feeds complete shards of caption rows to ``ShardCommitter`` as fast as it takes them and times
everything until ``close()`` returns (each shard: one Parquet PUT, one checkpoint PUT). One writer with no
queue writes shard after shard, as the synchronous commit did. Job mode runs jobs/caption_dataset.py's
``main`` with ``--input``/``--output`` on the proxied store and reports its summary's timings.
"""

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import s3fs  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from infra.local.s3_proxy import Faults, S3Proxy  # noqa: E402
from pipeline.commit import OUTPUT_SCHEMA, ShardCommitter  # noqa: E402

BUCKET = "bench"
CREDENTIALS = {"key": "testing", "secret": "testing"}
CAPTION_ROWS = pa.schema(list(OUTPUT_SCHEMA) + [("shard_size", pa.int64()), ("index", pa.int64()), ("replica", pa.string())])


def storage_options(endpoint: str) -> dict:
    return {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint}}


def caption_batch(shard_id: str, rows: int) -> pa.Table:
    """A shard's caption rows as the caption stage sends them, its end-of-shard marker last."""
    samples = [{"key": f"{shard_id}-{i:05d}", "shard_id": shard_id, "caption": "a synthetic caption " * 4,
                "error": None, "width": 640, "height": 480, "num_image_tokens": 1088, "num_generated_tokens": 20,
                "finish_reason": "stop", "shard_size": None, "index": i, "replica": "bench"} for i in range(rows)]
    marker = {**dict.fromkeys(CAPTION_ROWS.names), "shard_id": shard_id, "shard_size": rows, "index": -1}
    return pa.Table.from_pylist(samples + [marker], schema=CAPTION_ROWS)


def time_committer(endpoint: str, writers: int, shards: int, rows: int) -> float:
    """Seconds from the first ``add`` until every shard is committed."""
    fs = s3fs.S3FileSystem(**storage_options(endpoint), skip_instance_cache=True)
    root = f"{BUCKET}/commit-{uuid.uuid4().hex}"
    batches = [caption_batch(f"shard-{i:05d}", rows) for i in range(shards)]
    queued = 0 if writers == 1 else writers  # one writer, no queue: shard after shard, as a synchronous commit
    started = time.perf_counter()
    with ShardCommitter(fs, root, writers=writers, queued=queued) as committer:
        for batch in batches:
            committer.add(batch)
    seconds = time.perf_counter() - started
    assert len(committer.stats.committed) == shards, committer.stats.failed
    return seconds


def run_committer(upstream: str, args) -> None:
    walls = {}
    for latency_ms in args.latency_ms:
        with S3Proxy(upstream, Faults(latency_s=latency_ms / 1000)) as proxy:
            for writers in args.writers:
                walls[latency_ms, writers] = time_committer(proxy.endpoint, writers, args.shards, args.rows)
                print(f"  latency {latency_ms:5.0f} ms, {writers:2d} writer(s): {walls[latency_ms, writers]:6.2f} s",
                      flush=True)
    base = args.latency_ms[0]
    print(f"\ncommitter alone: {args.shards} shards of {args.rows} rows (one Parquet PUT + one checkpoint PUT each), "
          f"moto through the proxy, {os.cpu_count()} CPU cores")
    print(f"{'latency':>10s}{'writers':>9s}{'wall s':>9s}{'shards/s':>10s}{f'vs {base:.0f} ms':>10s}"
          f"{'vs 1 writer':>13s}")
    for (latency_ms, writers), wall in walls.items():
        single = walls.get((latency_ms, 1))
        speedup = f"{single / wall:13.2f}" if single else f"{'-':>13s}"
        print(f"{latency_ms:8.0f}ms{writers:9d}{wall:9.2f}{args.shards / wall:10.1f}{wall / walls[base, writers]:10.2f}"
              f"{speedup}")


def run_job(upstream: str, args) -> None:
    """The job against the proxied store; its own summary says how long it took and when it first committed."""
    import ray

    from fms_smolvlm.testing import write_random_checkpoint
    from generate import CONFIGS  # benchmarks/, this script's folder, is on sys.path
    from pipeline.testing import write_sample_shards

    spec = importlib.util.spec_from_file_location("caption_dataset", REPO / "jobs" / "caption_dataset.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    direct = s3fs.S3FileSystem(**storage_options(upstream), skip_instance_cache=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_random_checkpoint(Path(tmp) / "model", **CONFIGS["cpu-mid"])
        write_sample_shards(Path(tmp) / "shards", shards=args.shards, images_per_shard=args.rows)
        direct.put(str(Path(tmp) / "shards"), f"{BUCKET}/shards", recursive=True)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
        print(f"\nthe job: {args.shards} WebDataset shards of {args.rows} images, cpu-mid random model, 8 new tokens, CPU")
        print(f"{'latency':>10s}{'wall s':>9s}{'to 1st commit s':>17s}{'images/s':>10s}")
        for latency_ms in args.latency_ms:
            with S3Proxy(upstream, Faults(latency_s=latency_ms / 1000)) as proxy:
                output = f"s3://{BUCKET}/job-{uuid.uuid4().hex}"
                status = job.main(["--input", f"s3://{BUCKET}/shards", "--output", output, "--model", str(model),
                                   "--max-new-tokens", "8", "--batch-size", "8", "--device", "cpu",
                                   "--storage-options", json.dumps(storage_options(proxy.endpoint))])
            assert status == 0, f"the job failed at {latency_ms} ms"
            summary = json.loads(direct.cat_file(f"{output.removeprefix('s3://')}/_summary.json"))
            print(f"{latency_ms:8.0f}ms{summary['wall_seconds']:9.2f}{summary['seconds_to_first_commit']:17.2f}"
                  f"{summary['images_per_second']:10.2f}", flush=True)
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", action="store_true", help="run the whole job instead of the committer alone")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0, 150], help="the first is the baseline")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 8], help="committer mode: pool sizes")
    parser.add_argument("--shards", type=int, default=None, help="default: 48 (committer), 8 (job)")
    parser.add_argument("--rows", type=int, default=None, help="rows (images) per shard; default: 32 (committer), 4 (job)")
    args = parser.parse_args()
    args.shards = args.shards or (8 if args.job else 48)
    args.rows = args.rows or (4 if args.job else 32)

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    upstream = "http://{}:{}".format(*server.get_host_and_port())
    s3fs.S3FileSystem(**storage_options(upstream)).mkdir(BUCKET)
    try:
        (run_job if args.job else run_committer)(upstream, args)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
