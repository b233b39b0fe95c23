"""Caption every image of a sharded dataset with SmolVLM, one Parquet file per shard.

    ray job submit --working-dir . -- python jobs/caption_dataset.py \\
        --input s3://bucket/shards/ --output s3://bucket/captions/run-a

Without a Ray cluster it starts a local Ray instance. Reruns skip committed shards.
"""

import argparse
import json
import sys
from pathlib import Path

# run from a checkout (`ray job submit --working-dir .`) without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fms_smolvlm.captioner import DEFAULT_PROMPT  # noqa: E402
from pipeline.config import DEFAULT_MAX_NEW_TOKENS, ConfigError, JobConfig  # noqa: E402

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"


def checked(parse, valid, requirement: str):
    """An argparse type: ``parse`` the text, then insist that ``valid(value)``."""

    def convert(text: str):
        value = parse(text)
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    convert.__name__ = parse.__name__  # argparse names it in "invalid int value: 'x'"
    return convert


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
positive_seconds = checked(float, lambda v: v > 0, "a positive number of seconds")
positive_float = checked(float, lambda v: v > 0, "a positive number")
seconds = checked(float, lambda v: v >= 0, "0 or more seconds")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caption_dataset.py",
        description="Caption image shards (WebDataset .tar, Parquet, image folders) with SmolVLM on Ray Data.",
    )
    parser.add_argument("--input", required=True, help="directory/prefix or glob of shards (any fsspec URL)")
    parser.add_argument("--output", required=True, help="output directory/prefix (any fsspec URL)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="local checkpoint dir or HF model id (default: %(default)s)")
    parser.add_argument("--prompt", action="append", metavar="[NAME=]TEXT", help=f"user instruction (default: {DEFAULT_PROMPT!r}); repeat as NAME=TEXT for several annotations per sample, each in columns of its NAME")
    parser.add_argument("--prompts", metavar="FILE", help="named prompts from a JSON or YAML file mapping NAME to TEXT (instead of --prompt)")
    parser.add_argument("--max-new-tokens", action="append", metavar="[NAME=]N", help=f"generated tokens at most (default: {DEFAULT_MAX_NEW_TOKENS}); NAME=N for one named prompt")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per generation batch (default: 32 on GPU, 8 on CPU)")
    parser.add_argument("--replicas", type=positive_int, default=None, help="model replicas (default: one per GPU, or 1 on CPU)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="auto: bf16 on GPUs and on CPUs that compute it natively (AMX, AVX512-BF16), else fp32 (HF's exact tokens)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the replicas (default: on for GPU); compiled once per job, kept in OUTPUT/_compiled")
    parser.add_argument("--resize-on", choices=["auto", "cpu", "replica"], default="auto", help="where images are resized and tiled, with the same bytes either way (auto: on GPU replicas, else in the CPU stage)")
    parser.add_argument("--image-longest-edge", type=positive_int, default=None, help="resize images to this longest edge (default: the checkpoint's)")
    parser.add_argument("--no-image-splitting", dest="image_splitting", action="store_false", default=None, help="one tile per image instead of a grid of tiles plus a global view")
    parser.add_argument("--max-image-pixels", type=positive_int, default=100_000_000, help="larger images become error rows (default: %(default)s)")
    parser.add_argument("--video-fps", type=positive_float, default=None, help="video samples: frames sampled per second (default: the checkpoint's)")
    parser.add_argument("--video-max-frames", type=positive_int, default=None, help="video samples: at most this many frames (default: the checkpoint's)")
    parser.add_argument("--max-video-seconds", type=positive_seconds, default=3 * 3600.0, metavar="SECONDS", help="longer videos become error rows (default: %(default)s)")
    parser.add_argument("--image-column", default=None, help="Parquet shards: the image-bytes column (default: auto-detect)")
    parser.add_argument("--key-column", default=None, help="Parquet shards: the sample-key column (default: auto-detect, else the row number)")
    parser.add_argument("--limit-shards", type=positive_int, default=None, help="process at most N pending shards")
    parser.add_argument("--storage-options", type=json_object, default={}, help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')
    parser.add_argument("--overwrite", action="store_true", help="start over even if the output holds another job's checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="list pending and done shards, run nothing")
    parser.add_argument("--wait-for-lease", type=seconds, default=0.0, metavar="SECONDS", help="if another run holds the output, wait up to this long instead of refusing")
    parser.add_argument("--stall-timeout", type=positive_seconds, default=1800.0, metavar="SECONDS", help="end the run (exit 1, committed shards kept) when no result arrives for this long (default: %(default)s)")
    parser.add_argument("--lease-ttl", type=positive_seconds, default=180.0, metavar="SECONDS", help="a crashed run's hold on the output expires this long after its last heartbeat (default: %(default)s)")
    parser.add_argument("--store-retry-seconds", type=seconds, default=300.0, metavar="SECONDS", help="retry a call the object store throttled, failed (5xx), timed out or dropped for up to this long before the shard (or the run) fails (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = JobConfig.from_args(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from pipeline.job import run_job  # imports Ray: only after the flags are known to be good

    return run_job(config)


if __name__ == "__main__":
    sys.exit(main())
