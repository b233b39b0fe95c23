"""The job through a store outage: every request to S3 answered ``503 ServiceUnavailable`` for a window that opens
when the first shard is committed, as a user's scheduled run would meet it.

    python benchmarks/store_outage.py                               # outages of 30, 120 and 400 s, the job's defaults
    python benchmarks/store_outage.py --outages 5 --store-retry-seconds 20 --lease-ttl 30   # a quick look

moto's S3 server holds the input (6 WebDataset shards of 3 images by default) on 127.0.0.1; each run is the real
CLI in a process of its own with a local Ray of its own (``tests.pipeline.cluster``), ``--replicas 1``, a small
random checkpoint, talking to the store through ``infra/local/s3_proxy.py``. A clean run straight to the store gives
the reference rows. Each outage run reports its exit status, its wall time, its one-line error, the store retries its
summary counts, whether every sample is there exactly once and whether its rows equal the clean run's; a run that
fails is rerun (the store back) into the same output, and the rerun is checked the same way.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
import s3fs  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from fms_smolvlm.testing import write_random_checkpoint  # noqa: E402
from infra.local.s3_proxy import S3Proxy  # noqa: E402
from pipeline.testing import write_sample_shards  # noqa: E402
from tests.pipeline.cluster import JobProcess  # noqa: E402

BUCKET = "data"
RUN_TIMEOUT_S = 1800
RETRYING = "store unavailable, retrying"


def read_rows(fs: s3fs.S3FileSystem, root: str) -> dict[str, list[dict]]:
    fs.invalidate_cache()
    rows = {}
    for path in sorted(fs.glob(f"{root}/shards/*.parquet")):
        with fs.open(path, "rb") as handle:
            rows[path.rsplit("/", 1)[-1][: -len(".parquet")]] = pq.read_table(handle).to_pylist()
    return rows


def run_job(endpoint: str, output: str, model: Path, extra: list[str]) -> dict:
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    flags = ["--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/{output}", "--model", model,
             "--max-new-tokens", "6", "--replicas", "1", "--storage-options", json.dumps(options), *extra]
    started = time.perf_counter()
    job = JobProcess(flags)
    try:
        status = job.wait(timeout=RUN_TIMEOUT_S)
    finally:
        job.stop()
    retrying = [line for line in job.lines if RETRYING in line]
    return {
        "status": status,
        "wall_s": round(time.perf_counter() - started, 1),
        "error": (job.error_lines() or [None])[-1],
        "retry_log_lines": len(retrying),
        "last_retry_log_line": retrying[-1].split(" WARNING ", 1)[-1] if retrying else None,
        "summary": summary_of(job.stdout),
    }


def summary_of(stdout: str):
    start = stdout.find("{\n")
    return json.loads(stdout[start : stdout.rindex("}") + 1]) if start >= 0 else None


def check(direct: s3fs.S3FileSystem, output: str, written: dict, clean: dict) -> dict:
    rows = read_rows(direct, f"{BUCKET}/{output}")
    keys = {shard: [row["key"] for row in shard_rows] for shard, shard_rows in rows.items()}
    return {"exactly_once": keys == written, "rows_equal_clean_run": rows == clean}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outages", type=float, nargs="+", default=[30.0, 120.0, 400.0], metavar="SECONDS")
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--images", type=int, default=3, help="images per shard")
    parser.add_argument("--store-retry-seconds", type=float, default=None, help="passed to the job (default: its own)")
    parser.add_argument("--lease-ttl", type=float, default=None, help="passed to the job (default: its own)")
    args = parser.parse_args(argv)
    chosen = (("--store-retry-seconds", args.store_retry_seconds), ("--lease-ttl", args.lease_ttl))
    extra = [flag for name, value in chosen if value is not None for flag in (name, str(value))]

    with tempfile.TemporaryDirectory() as scratch:
        model = write_random_checkpoint(Path(scratch) / "model", seed=1)
        written = write_sample_shards(Path(scratch) / "in", shards=args.shards, images_per_shard=args.images)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        direct = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
        direct.mkdir(BUCKET)
        direct.put(str(Path(scratch) / "in") + "/", f"{BUCKET}/in", recursive=True)

        clean_run = run_job(endpoint, "clean", model, extra)
        clean = read_rows(direct, f"{BUCKET}/clean")
        print(json.dumps({"run": "clean", **clean_run, **check(direct, "clean", written, clean)}), flush=True)
        for seconds in args.outages:
            output = f"outage-{seconds:g}s"
            with S3Proxy(endpoint) as proxy:
                proxy.outage_after("^PUT .*/_checkpoints/", seconds=seconds)  # from the first commit on
                result = run_job(proxy.endpoint, output, model, extra)
            met = {"outage_started": bool(proxy.outages), "answered_503": proxy.counts.unavailable}
            print(json.dumps({"run": output, **met, **result, **check(direct, output, written, clean)}), flush=True)
            if result["status"] != 0:
                with S3Proxy(endpoint) as proxy:
                    rerun = run_job(proxy.endpoint, output, model, extra)
                checked = check(direct, output, written, clean)
                print(json.dumps({"run": f"{output} rerun", **rerun, **checked}), flush=True)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
