"""The captioning job: shards in, one Parquet file per shard out, resumable.

read (one task per shard) -> preprocess (CPU tasks) -> caption (fixed actor pool) -> commit (streaming sink)
"""

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import fms_smolvlm
from fms_smolvlm.checkpoint import check_checkpoint_dir, resolve_checkpoint
from fms_smolvlm.processing import SmolVLMPreprocessor
from pipeline.commit import CHECKPOINTS_DIR, SHARDS_DIR, ShardCommitter, committed_shards
from pipeline.lease import LeaseHeldError, OutputLease
from pipeline.sources import DEFAULT_BATCH_BYTES, Shard, discover_shards, read_shards, shard_items
from pipeline.stages import BATCHES_IN_FLIGHT, CaptionActor, preprocess_batch
from pipeline.storage import join, read_json, resolve, write_json

logger = logging.getLogger("caption_dataset")

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"


class JobError(Exception):
    """Stops the job before (or instead of) any work; the message is one line for the user."""


@dataclass
class Resources:
    device: str
    dtype: str
    replicas: int
    batch_size: int
    compile: bool


def run_job(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return _run(args)
    except JobError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as error:  # before any work: an unwritable output, a broken config file
        print(f"error: cannot start: {one_line(error)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """An error on one line. A replica's failure reaches the driver as Ray's traceback text with the original
    exception first and Ray's wrappers after it: keep the original's last line."""
    text = str(error).split("The above exception was the direct cause of the following exception")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if '  File "' in text:  # a traceback: its last line is "SomeError: message"
        return lines[-1][:500]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:500]


def _run(args) -> int:
    started = time.time()
    if Path(args.model).is_dir():  # replicas and tasks may run in another working directory
        args.model = str(Path(args.model).resolve())
    in_fs, in_path = _resolve_storage(args.input, args.storage_options, "input")
    out_fs, root = _resolve_storage(args.output, args.storage_options, "output")
    # a rerun must not read the output's own Parquet files as shards when --output lies inside --input
    shards = _discover(in_fs, in_path, args.input, exclude=root if in_fs.protocol == out_fs.protocol else None)
    model_dir = _model_files(args.model, args.max_new_tokens)
    preprocessor = SmolVLMPreprocessor.from_pretrained(
        model_dir, args.image_longest_edge, args.image_splitting, args.max_image_pixels
    )

    import ray

    if not ray.is_initialized():  # joins the cluster under `ray job submit`, else starts a local instance
        ray.init(logging_level=logging.WARNING)
    resources = _resources(args, ray.cluster_resources())
    fingerprint = job_fingerprint(args, model_dir, preprocessor, resources.dtype)
    revision = hub_revision(model_dir)
    if args.dry_run:
        done = _check_output(out_fs, root, args.output, fingerprint, args.overwrite, dry_run=True)
        _print_plan(shards, done, _pending(shards, done, args.limit_shards), _lease(out_fs, root, args).holder())
        return 0

    try:
        lease = _lease(out_fs, root, args).acquire(wait_s=args.wait_for_lease)
    except LeaseHeldError as error:
        raise JobError(f"--output {error}") from None
    with lease:
        return _run_holding_lease(args, out_fs, root, shards, resources, fingerprint, revision, lease, started)


def _run_holding_lease(args, out_fs, root, shards, resources, fingerprint, revision, lease, started) -> int:
    done = _check_output(out_fs, root, args.output, fingerprint, args.overwrite, dry_run=False)
    pending = _pending(shards, done, args.limit_shards)
    write_json(out_fs, join(root, JOB_FILE), fingerprint)
    committer = ShardCommitter(out_fs, root, before_commit=lease.check)
    failure = None
    if pending:
        logger.info("%d shards pending, %d already done; %s", len(pending), len(done), resources)
        try:
            # leaving the block waits for the shards being written; it raises if the lease stopped the writes
            with committer:
                dataset = build_dataset(args, pending, resources, revision)
                # no prefetch: a shard's last rows reach the commit as soon as they exist, also when the run fails
                for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                    committer.add(batch)
        except Exception as error:  # a replica died, the lease was lost: committed shards stay committed
            failure = one_line(error)
    else:
        logger.info("nothing to do: all %d shards are committed", len(shards))

    summary = _summary(committer, pending, done, started, failure)
    write_json(out_fs, join(root, SUMMARY_FILE), summary)
    print(json.dumps(summary, indent=2))
    unfinished = len(pending) - len(committer.stats.committed)
    if unfinished:
        reason = failure or "; ".join(f"{k}: {v}" for k, v in committer.stats.failed.items()) or "shards not committed"
        print(f"error: {unfinished} of {len(pending)} pending shards not committed: {reason}", file=sys.stderr)
        return 1
    return 0


def _pending(shards: list[Shard], done: set[str], limit: Optional[int]) -> list[Shard]:
    pending = [shard for shard in shards if shard.shard_id not in done]
    return pending if limit is None else pending[:limit]


def _lease(fs, root: str, args) -> OutputLease:
    return OutputLease(fs, root, ttl_s=args.lease_ttl, heartbeat_s=min(30.0, args.lease_ttl / 3))


def _resolve_storage(url: str, storage_options: dict, what: str):
    try:
        return resolve(url, storage_options)
    except Exception as error:  # unknown protocol, missing s3fs/gcsfs, bad options
        raise JobError(f"--{what} {url}: {' '.join(str(error).split())}") from None


def _discover(fs, path: str, url: str, exclude: Optional[str]) -> list[Shard]:
    try:
        shards = discover_shards(fs, path, exclude)
    except Exception as error:  # unreachable endpoint, no credentials, no such bucket
        raise JobError(f"cannot list --input {url}: {' '.join(str(error).split()) or type(error).__name__}") from None
    if not shards:
        raise JobError(f"no shards under --input {url} (expected .tar, .parquet or folders of images)")
    return shards


def _model_files(model: str, max_new_tokens: int) -> Path:
    """The checkpoint's config and tokenizer files on the driver (weights are loaded by the replicas)."""
    try:
        path = resolve_checkpoint(model, weights=False)
        config = check_checkpoint_dir(path, weights=False)
    except (FileNotFoundError, ValueError) as error:
        raise JobError(f"--model {error}") from None
    positions = config.get("text_config", {}).get("max_position_embeddings")
    if positions is not None and max_new_tokens >= positions:
        raise JobError(f"--max-new-tokens {max_new_tokens} does not fit the model's {positions} positions")
    return path


def _resources(args, cluster: dict) -> Resources:
    gpus = int(cluster.get("GPU", 0))
    device = args.device if args.device != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise JobError("--device cuda, but the Ray cluster has no GPUs (yet: are its GPU workers up?)")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    replicas = args.replicas or (gpus if device == "cuda" else 1)
    if device == "cuda" and replicas > gpus:
        raise JobError(f"--replicas {replicas} needs {replicas} GPUs, the Ray cluster has {gpus}")
    batch_size = args.batch_size or (32 if device == "cuda" else 8)
    compile_ = args.compile if args.compile is not None else device == "cuda"
    return Resources(device, dtype, replicas, batch_size, compile_)


# recorded in _job.json but not compared: an upgrade, or --dtype auto meeting another cluster, continues a job
INFORMATIONAL_KEYS = ("package_version", "dtype")


def job_fingerprint(args, model_dir: Path, preprocessor: SmolVLMPreprocessor, dtype: str) -> dict:
    """What decides the captions (a rerun into the same output must match it), and what produced them."""
    return {
        "model": args.model,
        "model_revision": model_revision(model_dir),
        "prompt": args.prompt,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
        "dtype": dtype,
        **preprocessor.fingerprint(),
        "parquet_image_column": args.image_column,
        "parquet_key_column": args.key_column,
        "package_version": fms_smolvlm.__version__,
    }


def hub_revision(model_dir: Path) -> Optional[str]:
    """The commit of a hub snapshot, so every worker loads the files the driver saw; None for a local checkpoint."""
    return model_dir.name if model_dir.parent.name == "snapshots" else None


def model_revision(model_dir: Path) -> str:
    """A hub snapshot is named by its commit; a local checkpoint by a hash of its config and weights."""
    if hub_revision(model_dir):
        return f"hub:{hub_revision(model_dir)}"
    digest = hashlib.sha256()
    for file in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _check_output(fs, root: str, url: str, fingerprint: dict, overwrite: bool, dry_run: bool) -> set[str]:
    """The committed shards this run may skip; refuses an output that holds another job's results."""
    job_file = join(root, JOB_FILE)
    existing = read_json(fs, job_file) if fs.exists(job_file) else None
    compared = sorted((set(existing or {}) | set(fingerprint)) - set(INFORMATIONAL_KEYS))
    changed = [k for k in compared if existing is not None and existing.get(k) != fingerprint.get(k)]
    if changed and not overwrite:
        raise JobError(
            f"--output {url} holds a job with different settings ({', '.join(changed)}); "
            "use another --output, or --overwrite to start over"
        )
    if overwrite:
        if not dry_run:
            logger.warning("--overwrite: removing the previous results%s", f" ({', '.join(changed)} differ)" * bool(changed))
            _remove_results(fs, root)
        return set()
    return committed_shards(fs, root)


def _remove_results(fs, root: str) -> None:
    for name in (CHECKPOINTS_DIR, SHARDS_DIR):  # checkpoints first: a shard without one is redone
        if fs.exists(join(root, name)):
            fs.rm(join(root, name), recursive=True)
    for name in (SUMMARY_FILE, JOB_FILE):
        if fs.exists(join(root, name)):
            fs.rm(join(root, name))


def build_dataset(args, pending: list[Shard], resources: Resources, revision: Optional[str]):
    import ray

    # a read task sends its rows on in blocks of this size while it reads (Ray's default would hold 128 MiB)
    ray.data.DataContext.get_current().target_max_block_size = DEFAULT_BATCH_BYTES
    dataset = ray.data.from_items(shard_items(pending), override_num_blocks=len(pending))
    dataset = dataset.map_batches(
        read_shards,
        batch_size=1,
        batch_format="pyarrow",
        # a few shards read at a time: they complete (and commit) in order instead of all at the end
        compute=ray.data.TaskPoolStrategy(size=2 * resources.replicas),
        fn_kwargs={
            "storage_options": args.storage_options,
            "image_column": args.image_column,
            "key_column": args.key_column,
            "batch_rows": resources.batch_size,
        },
    )
    dataset = dataset.map_batches(
        preprocess_batch,
        batch_format="pyarrow",
        batch_size=resources.batch_size,
        # CPU tasks of their own (a task-pool cap also keeps Ray from fusing them into the model actors,
        # where image decoding would stall the accelerator)
        compute=ray.data.TaskPoolStrategy(size=preprocess_concurrency()),
        fn_kwargs={
            "model": args.model,
            "revision": revision,
            "prompt": args.prompt,
            "image_longest_edge": args.image_longest_edge,
            "image_splitting": args.image_splitting,
            "max_image_pixels": args.max_image_pixels,
        },
    )
    # CPU replicas share a node's cores (preprocessing tasks run beside them); GPU replicas need few threads
    node_cpus = max((int(node["Resources"].get("CPU", 1)) for node in ray.nodes() if node["Alive"]), default=1)
    cpu_threads = max(1, node_cpus // resources.replicas)
    return dataset.map_batches(
        CaptionActor,
        batch_format="pyarrow",
        batch_size=resources.batch_size,
        # a fixed pool, all replicas started up front; each serves several batches at once (an async UDF)
        compute=ray.data.ActorPoolStrategy(
            size=resources.replicas,
            max_tasks_in_flight_per_actor=BATCHES_IN_FLIGHT,
            max_concurrent_calls_per_actor=BATCHES_IN_FLIGHT,
        ),
        num_gpus=1 if resources.device == "cuda" else 0,
        fn_constructor_kwargs={
            "model": args.model,
            "revision": revision,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": resources.batch_size,
            "device": resources.device,
            "dtype": resources.dtype,
            "compile": resources.compile,
            "cpu_threads": cpu_threads if resources.device == "cpu" else None,
        },
    )


def preprocess_concurrency() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _summary(committer: ShardCommitter, pending, done, started: float, failure: Optional[str]) -> dict:
    wall = time.time() - started
    stats = committer.stats
    return {
        "shards_done": len(stats.committed),
        "shards_skipped": len(done),
        "shards_failed": len(pending) - len(stats.committed),
        "failed_shards": dict(sorted(stats.failed.items())),
        "images": stats.rows,
        "error_rows": stats.error_rows,
        "generated_tokens": stats.generated_tokens,
        "wall_seconds": round(wall, 2),
        # start-up (Ray, replicas loading and compiling, the first shard) until the first commit
        "seconds_to_first_commit": None if stats.first_commit_at is None else round(stats.first_commit_at - started, 2),
        "images_per_second": round(stats.rows / wall, 3),
        "generated_tokens_per_second": round(stats.generated_tokens / wall, 2),
        "failure": failure,
    }


def _print_plan(shards, done, pending, holder) -> None:
    print(f"{len(shards)} shards: {len(done)} done, {len(pending)} to do")
    if holder is not None and holder.live(time.time()):
        print(f"lease: {holder}")
    for shard in pending:
        print(f"  todo  {shard.shard_id}  {shard.url}")
    for shard_id in sorted(done):
        print(f"  done  {shard_id}")
