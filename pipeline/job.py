"""The captioning job: shards in, one Parquet file per shard out, resumable.

read (streamed, a few shards at a time) -> preprocess (CPU tasks) -> caption (a fixed pool of async replica
actors) -> commit (the driver's streaming sink, writer threads)
"""

import hashlib
import json
import logging
import queue
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import fsspec

import fms_smolvlm
from fms_smolvlm.captioner import cpu_computes_bf16
from fms_smolvlm.checkpoint import check_checkpoint_dir, resolve_checkpoint
from fms_smolvlm.errors import one_line
from fms_smolvlm.processing import SmolVLMPreprocessor
from pipeline.commit import CHECKPOINTS_DIR, SHARDS_DIR, ShardCommitter, committed_shards, output_schema
from pipeline.config import JobConfig, PreprocessSettings, ReplicaSettings
from pipeline.lease import LeaseHeldError, LeaseLostError, OutputLease
from pipeline.retry import RetryPolicy, StoreRetries, describe
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
    resize_on: str


def run_job(config: JobConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return _run(config)
    except JobError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as error:  # before any work: an unwritable output, a broken config file
        print(f"error: cannot start: {one_line(error, with_type=True)}", file=sys.stderr)
        return 2


def _run(config: JobConfig) -> int:
    started = time.time()
    if Path(config.model).is_dir():  # replicas and tasks may run in another working directory
        config = replace(config, model=str(Path(config.model).resolve()))
    in_fs, in_path = _resolve_storage(config.input, config.storage_options, "input")
    out_fs, root = _resolve_storage(config.output, config.storage_options, "output")
    retries = StoreRetries(store_retry_policy(config))  # every call the driver makes to the store
    # a rerun must not read the output's own Parquet files as shards when --output lies inside --input
    exclude = root if in_fs.protocol == out_fs.protocol else None
    shards = _discover(in_fs, in_path, config.input, exclude, retries)
    model_dir = _model_files(config.model, max(prompt.max_new_tokens for prompt in config.prompts))
    revision = hub_revision(model_dir)
    preprocess = preprocess_settings(config, revision)
    preprocessor = preprocess.preprocessor()  # here too: a checkpoint the workers would refuse stops the job now

    import ray

    if not ray.is_initialized():  # joins the cluster under `ray job submit`, else starts a local instance
        ray.init(logging_level=logging.WARNING)
    resources = _resources(config, ray.cluster_resources())
    _check_capacity(resources, [node for node in ray.nodes() if node["Alive"]])
    preprocess = replace(preprocess, resize_on=resources.resize_on)
    preprocess.preprocessor()  # a processor the replicas cannot resize for (not LANCZOS) is refused here
    fingerprint = job_fingerprint(config, model_dir, preprocessor, resources.dtype)
    if config.dry_run:
        done = _check_output(out_fs, root, config.output, fingerprint, config.overwrite, True, retries)
        holder = _lease(out_fs, root, config, retries).holder()
        _print_plan(shards, done, _pending(shards, done, config.limit_shards), holder)
        return 0

    try:
        lease = _lease(out_fs, root, config, retries).acquire(wait_s=config.wait_for_lease)
    except LeaseHeldError as error:
        raise JobError(f"--output {error}") from None
    with lease:
        video = preprocessor.video is not None
        return _run_holding_lease(config, out_fs, root, shards, resources, fingerprint, preprocess, video, lease,
                                  retries, started)


def _run_holding_lease(config, out_fs, root, shards, resources, fingerprint, preprocess, video, lease, retries,
                       started) -> int:
    done = _check_output(out_fs, root, config.output, fingerprint, config.overwrite, False, retries)
    pending = _pending(shards, done, config.limit_shards)
    job_file = join(root, JOB_FILE)
    retries.call(f"write {out_fs.unstrip_protocol(job_file)}", lambda: write_json(out_fs, job_file, fingerprint))
    schema = output_schema([prompt.columns for prompt in config.prompts], video)
    committer = ShardCommitter(out_fs, root, before_commit=lease.check, schema=schema, retries=retries)
    # local disk fails for good, never for a while: only a remote input's reads retry, and have retries to count
    read_retries = ReadRetries.start() if pending and fsspec.utils.get_protocol(config.input) != "file" else None
    failure = None
    if pending:
        logger.info("%d shards pending, %d already done; %s", len(pending), len(done), resources)
        try:
            # leaving the block waits for the shards being written; it raises if the lease stopped the writes
            with committer:
                dataset = build_dataset(config, pending, resources, preprocess, video, read_retries)
                for batch in results_until_stalled(dataset, config.stall_timeout, lease.check):
                    committer.add(batch)
        except Exception as error:  # a replica died, the lease was lost, the run stalled: committed shards stay
            failure = one_line(error, with_type=not isinstance(error, (StalledError, LeaseLostError)))
    else:
        logger.info("nothing to do: all %d shards are committed", len(shards))

    read_counts = read_retries.counts() if read_retries else {}
    store_retries = dict(sorted((Counter(retries.counts) + Counter(read_counts)).items()))
    summary = _summary(committer, pending, done, started, failure, store_retries)
    _write_summary(out_fs, root, summary, lease, retries)
    print(json.dumps(summary, indent=2))
    unfinished = len(pending) - len(committer.stats.committed)
    if unfinished:
        reason = failure or "; ".join(f"{k}: {v}" for k, v in committer.stats.failed.items()) or "shards not committed"
        print(f"error: {unfinished} of {len(pending)} pending shards not committed: {reason}", file=sys.stderr)
        return 1
    return 0


class StalledError(RuntimeError):
    """No result reached the driver for ``--stall-timeout`` seconds."""


_END = object()
CHECK_EVERY_S = 1.0


def results_until_stalled(dataset, stall_timeout: float, check: Callable[[], None]) -> Iterator:
    """The dataset's result batches as they come; ``StalledError`` once none has come for ``stall_timeout``
    seconds. A thread of its own waits on Ray Data, so that the wait can be given up (Ray Data's own wait for the
    next batch cannot be interrupted). ``check()`` runs every second of a wait; its error ends the run (a lease that
    could expire: nothing more could be committed)."""
    batches: queue.Queue = queue.Queue(maxsize=2)

    def read() -> None:
        try:
            # no prefetch: a shard's last rows reach the commit as soon as they exist, also when the run then fails
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                batches.put(batch)
            batches.put(_END)
        except BaseException as error:  # the run's failure, handed to the loop that reads the results
            batches.put(error)

    threading.Thread(target=read, name="results", daemon=True).start()
    waiting_since = time.monotonic()
    while True:
        try:
            item = batches.get(timeout=min(CHECK_EVERY_S, stall_timeout))
        except queue.Empty:
            check()
            if time.monotonic() - waiting_since < stall_timeout:
                continue
            logger.error("no result for %.0f s (--stall-timeout): stopping the run", stall_timeout)
            raise StalledError(
                f"no progress for {stall_timeout:.0f} s (--stall-timeout): stopped; committed shards are kept"
            ) from None
        waiting_since = time.monotonic()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _pending(shards: list[Shard], done: set[str], limit: Optional[int]) -> list[Shard]:
    pending = [shard for shard in shards if shard.shard_id not in done]
    return pending if limit is None else pending[:limit]


def store_retry_policy(config: JobConfig) -> RetryPolicy:
    return RetryPolicy(budget_s=config.store_retry_seconds)


def _lease(fs, root: str, config: JobConfig, retries: StoreRetries) -> OutputLease:
    # commits stop a heartbeat before the lease could expire, so a short heartbeat leaves most of the ttl to a store
    # outage (ttl 180 s: a heartbeat every 10 s, and an outage of up to 150 s is ridden out whenever it starts)
    heartbeat_s = min(10.0, config.lease_ttl / 3)
    return OutputLease(fs, root, ttl_s=config.lease_ttl, heartbeat_s=heartbeat_s, retries=retries)


def _write_summary(fs, root: str, summary: dict, lease: OutputLease, retries: StoreRetries) -> None:
    """Into the output while the lease still holds it (else another run may own the output by now); a summary that
    cannot be written is still printed."""
    path = join(root, SUMMARY_FILE)
    try:
        lease.check()
        retries.call(f"write {fs.unstrip_protocol(path)}", lambda: write_json(fs, path, summary))
    except Exception as error:  # the lease ran out or the store is away: the run's outcome stands either way
        logger.warning("the summary is not written to the output: %s", describe(error))


def _resolve_storage(url: str, storage_options: dict, what: str):
    try:
        return resolve(url, storage_options)
    except Exception as error:  # unknown protocol, missing s3fs/gcsfs, bad options
        raise JobError(f"--{what} {url}: {one_line(error)}") from None


def _discover(fs, path: str, url: str, exclude: Optional[str], retries: StoreRetries) -> list[Shard]:
    try:
        shards = discover_shards(fs, path, exclude, retries)
    except Exception as error:  # no credentials, no such bucket, the store away for the whole retry budget
        raise JobError(f"cannot list --input {url}: {describe(error)}") from None
    if not shards:
        raise JobError(f"no shards under --input {url} (expected .tar, .parquet or folders of images or videos)")
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


def _resources(config: JobConfig, cluster: dict) -> Resources:
    gpus = int(cluster.get("GPU", 0))
    device = config.device if config.device != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise JobError("--device cuda, but the Ray cluster has no GPUs (yet: are its GPU workers up?)")
    # bf16 where the replicas' device computes it natively (the driver's CPU stands for the cluster's CPU nodes)
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device == "cuda" or cpu_computes_bf16() else "float32")
    replicas = config.replicas or (gpus if device == "cuda" else 1)
    if device == "cuda" and replicas > gpus:
        raise JobError(f"--replicas {replicas} needs {replicas} GPUs, the Ray cluster has {gpus}")
    batch_size = config.batch_size or (32 if device == "cuda" else 8)
    compile_ = config.compile if config.compile is not None else device == "cuda"
    # a GPU replica resizes an image in well under a millisecond; a CPU replica would use the cores that preprocess
    resize_on = config.resize_on if config.resize_on != "auto" else ("replica" if device == "cuda" else "cpu")
    return Resources(device, dtype, replicas, batch_size, compile_, resize_on)


def _check_capacity(resources: Resources, nodes: list) -> None:
    """Refuse a run that could never move: every replica holds a CPU of its node for its lifetime (a GPU replica
    too, beside its GPU), and reading and preprocessing need at least one more CPU somewhere."""
    cpus = sum(int(node["Resources"].get("CPU", 0)) for node in nodes)
    if cpus - resources.replicas < 1:
        raise JobError(
            f"--replicas {resources.replicas}: the replicas would hold {resources.replicas} of the cluster's {cpus} "
            f"CPUs (one each) and leave none to read and preprocess with; use at most {max(cpus - 1, 0)} replicas "
            "or a cluster with more CPUs"
        )
    if resources.device == "cuda":
        placeable = sum(min(int(n["Resources"].get("GPU", 0)), int(n["Resources"].get("CPU", 0))) for n in nodes)
        if placeable < resources.replicas:
            raise JobError(
                f"--replicas {resources.replicas}: each GPU replica also holds a CPU of its node, and the GPU nodes "
                f"have CPUs beside only {placeable} of their GPUs"
            )


# recorded in _job.json but not compared: an upgrade, or --dtype auto meeting another cluster, continues a job
INFORMATIONAL_KEYS = ("package_version", "dtype")


def job_fingerprint(config: JobConfig, model_dir: Path, preprocessor: SmolVLMPreprocessor, dtype: str) -> dict:
    """What decides the captions (a rerun into the same output must match it), and what produced them."""
    return {
        "model": config.model,
        "model_revision": model_revision(model_dir),
        **prompts_fingerprint(config.prompts),
        "decoding": "greedy",
        "dtype": dtype,
        **preprocessor.fingerprint(),
        "parquet_image_column": config.image_column,
        "parquet_key_column": config.key_column,
        "package_version": fms_smolvlm.__version__,
    }


def prompts_fingerprint(prompts: tuple) -> dict:
    """One unnamed prompt keeps the fingerprint's ``prompt`` / ``max_new_tokens``; named ones are listed by name."""
    if prompts[0].name is None:
        return {"prompt": prompts[0].text, "max_new_tokens": prompts[0].max_new_tokens}
    return {"prompts": {p.name: {"text": p.text, "max_new_tokens": p.max_new_tokens} for p in prompts}}


def _prompt_changes(existing: dict, fingerprint: dict) -> list[str]:
    """How this run's prompts differ from the output's: which were added, dropped or changed."""

    def named(print_: dict) -> dict:  # the unnamed prompt is named ""
        if "prompts" in print_:
            return print_["prompts"]
        if "prompt" in print_:
            return {"": {"text": print_["prompt"], "max_new_tokens": print_.get("max_new_tokens")}}
        return {}

    def label(name: str) -> str:
        return f"prompt {name}" if name else "prompt"

    old, new = named(existing), named(fingerprint)
    return (
        [f"{label(name)} added" for name in new if name not in old]
        + [f"{label(name)} dropped" for name in old if name not in new]
        + [f"{label(name)} changed" for name in new if name in old and new[name] != old[name]]
    )


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


def _check_output(fs, root: str, url: str, fingerprint: dict, overwrite: bool, dry_run: bool,
                  retries: StoreRetries) -> set[str]:
    """The committed shards this run may skip; refuses an output that holds another job's results."""
    job_file = join(root, JOB_FILE)
    existing = retries.call(f"read {fs.unstrip_protocol(job_file)}",
                            lambda: read_json(fs, job_file) if fs.exists(job_file) else None)
    changed = []
    if existing is not None:
        compared = sorted((set(existing) | set(fingerprint)) - set(INFORMATIONAL_KEYS) - {"prompt", "max_new_tokens", "prompts"})
        changed = _prompt_changes(existing, fingerprint) + [k for k in compared if existing.get(k) != fingerprint.get(k)]
    if changed and not overwrite:
        raise JobError(
            f"--output {url} holds a job with different settings ({', '.join(changed)}); "
            "use another --output, or --overwrite to start over"
        )
    if overwrite:
        if not dry_run:
            logger.warning("--overwrite: removing the previous results%s", f" ({', '.join(changed)})" * bool(changed))
            _remove_results(fs, root, retries)
        return set()
    return committed_shards(fs, root, retries)


def _remove_results(fs, root: str, retries: StoreRetries) -> None:
    # checkpoints first: a shard without one is redone
    for name in (CHECKPOINTS_DIR, SHARDS_DIR, SUMMARY_FILE, JOB_FILE):
        path = join(root, name)
        retries.call(f"remove {fs.unstrip_protocol(path)}", lambda: _remove_if_present(fs, path))


def _remove_if_present(fs, path: str) -> None:
    # looked up in the same attempt: a retry after a removal whose answer was lost finds nothing to remove
    if fs.exists(path):
        fs.rm(path, recursive=True)


def preprocess_settings(config: JobConfig, revision: Optional[str]) -> PreprocessSettings:
    return PreprocessSettings(
        model=config.model,
        revision=revision,
        prompts=tuple(prompt.text for prompt in config.prompts),
        image_longest_edge=config.image_longest_edge,
        image_splitting=config.image_splitting,
        max_image_pixels=config.max_image_pixels,
        video_fps=config.video_fps,
        video_max_frames=config.video_max_frames,
        max_video_seconds=config.max_video_seconds,
        resize_on="cpu",  # until the replicas' device is known (build_dataset's settings say where)
    )


class _RetryTally:
    """The store retries of a run's read tasks, by kind (a Ray actor)."""

    def __init__(self):
        self._counts = Counter()

    def add(self, kind: str) -> None:
        self._counts[kind] += 1

    def counts(self) -> dict:
        return dict(self._counts)


@dataclass(frozen=True)
class ReadRetries:
    """The read tasks' store retries counted in one place: a small actor on the driver's node, told of every retry
    by the tasks wherever they run (an instance is the read stage's ``report_retry``); the summary asks it."""

    tally: object  # the _RetryTally actor's handle

    @classmethod
    def start(cls) -> "ReadRetries":
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return cls(ray.remote(num_cpus=0, scheduling_strategy=driver_node)(_RetryTally).remote())

    def __call__(self, kind: str) -> None:
        import ray

        # waited for (a few ms, beside a retry's backoff): a call left in flight when its task ends may never arrive
        try:
            ray.get(self.tally.add.remote(kind), timeout=30)
        except Exception as error:  # the read goes on: its count is statistics
            logger.warning("a store retry is not counted: %s", one_line(error, with_type=True))

    def counts(self) -> dict:
        import ray

        try:
            return ray.get(self.tally.counts.remote(), timeout=60)
        except Exception as error:  # the run's outcome does not depend on its statistics
            logger.warning("the read tasks' store retries are not counted: %s", one_line(error, with_type=True))
            return {}


def build_dataset(config: JobConfig, pending: list[Shard], resources: Resources, preprocess: PreprocessSettings,
                  video: bool, read_retries: Optional[ReadRetries] = None):
    """The run's Ray Data pipeline. ``read_retries`` hears of the read tasks' store retries."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    # a read task sends its rows on in blocks of this size while it reads (Ray's default would hold 128 MiB)
    ray.data.DataContext.get_current().target_max_block_size = DEFAULT_BATCH_BYTES
    dataset = ray.data.from_items(shard_items(pending), override_num_blocks=len(pending))
    dataset = dataset.map_batches(
        read_shards,
        batch_size=1,
        batch_format="pyarrow",
        # a few shards read at a time: they complete (and commit) in order instead of all at the end; never more
        # tasks than shards (Ray warns the user of a pool larger than its inputs)
        compute=ray.data.TaskPoolStrategy(size=min(2 * resources.replicas, len(pending))),
        fn_kwargs={
            "storage_options": config.storage_options,
            "image_column": config.image_column,
            "key_column": config.key_column,
            "batch_rows": resources.batch_size,
            "retry": store_retry_policy(config),
            "report_retry": read_retries,
        },
    )
    dataset = dataset.map_batches(
        preprocess_batch,
        batch_format="pyarrow",
        batch_size=resources.batch_size,
        # CPU tasks of their own, on the CPUs the replicas leave
        compute=ray.data.TaskPoolStrategy(size=max(1, cpus - resources.replicas)),
        fn_kwargs={"settings": preprocess},
    )
    # CPU replicas share a node's cores (preprocessing tasks run beside them); GPU replicas need few threads
    node_cpus = max((int(node["Resources"].get("CPU", 1)) for node in ray.nodes() if node["Alive"]), default=1)
    replica = ReplicaSettings(
        model=config.model,
        revision=preprocess.revision,
        prompts=config.prompts,
        video=video,
        # an image's prompts decode side by side; the BATCHES_IN_FLIGHT (3) batches a replica holds bring three
        # times as many sequences as it has slots, so the slots stay full until the run drains
        slots=resources.batch_size * len(config.prompts),
        device=resources.device,
        dtype=resources.dtype,
        compile=resources.compile,
        cpu_threads=max(1, node_cpus // resources.replicas) if resources.device == "cpu" else None,
        output=config.output,
        storage_options=config.storage_options,
        store_retry_seconds=config.store_retry_seconds,
    )
    # Ray 2.60 deprecates ray_remote_args_fn (to go in 2.64) with nothing that replaces what it does here: the named
    # remote parameters could keep the operators apart only by changing what the replicas reserve. Ray is pinned to
    # 2.60 and test_preprocessing_never_runs_in_the_replicas catches an upgrade that changes this, so the warning,
    # meant for us, stays out of every user's job log.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated", category=DeprecationWarning)
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
            num_cpus=1,  # what _check_capacity counts on
            num_gpus=1 if resources.device == "cuda" else 0,
            # replicas spread over the nodes; and an op with its own remote-arguments function is never fused with
            # another, so Ray cannot fold the preprocessing into the replicas, where decoding images would stall them
            ray_remote_args_fn=_spread,
            fn_constructor_kwargs={"settings": replica},
        )


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}


def _summary(committer: ShardCommitter, pending, done, started: float, failure: Optional[str],
             store_retries: dict) -> dict:
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
        "store_retries": store_retries,  # per kind: throttled, unavailable, timeout, connection
        # each replica that captioned: seconds to load and warm up, its dtype, graphs compiled or loaded (and whence)
        "replicas": dict(sorted(stats.replicas.items())),
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
