"""A local S3 endpoint holding sample shards, to try the job's S3 path on a laptop.

    python infra/local/local_s3.py   # S3 on http://127.0.0.1:9000 holding demo_out/shards; prints the job's command
    # then, in a second terminal, run the printed `python jobs/caption_dataset.py ...` command

The shards come from `make demo` (or --shards DIR). The server is moto's (installed with the test extra, as
`make install` does) and keeps everything in memory: Ctrl-C stops it and the bucket is gone.
"""

import argparse
import json
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

import s3fs
from moto.server import ThreadedMotoServer

HOST = "127.0.0.1"  # this machine only: the server takes any credentials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local_s3.py", description="Serve S3 locally (moto) with sample shards uploaded.")
    parser.add_argument(
        "--shards", type=Path, default=Path("demo_out/shards"), help="directory of shards to upload (default: %(default)s)"
    )
    parser.add_argument("--bucket", default="demo", help="bucket to create (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9000, help="port on 127.0.0.1; 0 picks a free one (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.shards.is_dir():
        parser.error(f"no shards at {args.shards}: run `make demo` first, or pass --shards DIR")

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in the user's terminal
    server = ThreadedMotoServer(ip_address=HOST, port=args.port, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    storage_options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    uploaded = upload(s3fs.S3FileSystem(**storage_options), args.shards, args.bucket)

    print(f"S3 endpoint {endpoint}: uploaded {uploaded} files from {args.shards} to s3://{args.bucket}/shards/", flush=True)
    print("Caption them (in another terminal, from the repository root):", flush=True)
    command = [
        "python", "jobs/caption_dataset.py",
        "--input", f"s3://{args.bucket}/shards/",
        "--output", f"s3://{args.bucket}/captions",
        "--storage-options", json.dumps(storage_options),
    ]
    print(shlex.join(command), flush=True)
    print("Ctrl-C stops the server (its data is in memory only).", flush=True)

    wait_for_stop_signal()
    server.stop()
    return 0


def upload(fs: s3fs.S3FileSystem, shards: Path, bucket: str) -> int:
    fs.mkdir(bucket)
    files = sorted(path for path in shards.rglob("*") if path.is_file())
    for path in files:  # keeps subfolders: a folder of loose images is one shard
        fs.put_file(str(path), f"{bucket}/shards/{path.relative_to(shards).as_posix()}")
    return len(files)


def wait_for_stop_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    sys.exit(main())
