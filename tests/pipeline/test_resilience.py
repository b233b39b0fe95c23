"""What a run survives, and how it ends when it cannot go on: a replica killed mid-run, a flaky object store, a
replica that never answers (issue 13)."""

import json
import os
import signal
import uuid

import fsspec
import pyarrow.parquet as pq

from infra.local.s3_proxy import Faults, S3Proxy
from pipeline.testing import write_sample_shards
from tests.pipeline.cluster import (
    GATE_ENV,
    HOLDING,
    OUTPUT_ENV,
    REPLICA_TITLE,
    STALL_ENV,
    STALLING,
    JobProcess,
    processes_in_session,
    read_checkpoints,
    read_keys,
    replica_pid,
)

RUN_TIMEOUT_S = 300  # a run of a few seconds on an idle machine; generous for a loaded 2-core one
# the run's start-up (worker processes, the replica loading its model) counts towards it too: keep it well above that
STALL_TIMEOUT_S = 20


def job_flags(input_dir, output_dir, checkpoint, *flags):
    return ["--input", input_dir, "--output", output_dir, "--model", checkpoint, "--max-new-tokens", "4", *flags]


def test_a_replica_killed_mid_run_is_replaced_and_the_run_finishes(checkpoint, tmp_path):
    """SIGKILL of the replica's worker process while it holds a batch: Ray restarts the actor, Ray Data sends the
    lost batches again, and the same run commits every sample exactly once, with exit 0.

    The job runs as a subprocess with a local Ray of its own, so that killing a worker cannot disturb the session's
    Ray, and its whole session is cleaned up afterwards. The test's worker hook makes the replica hold every batch it
    gets once the first shard is committed, until the test has killed it: so the kill lands mid-run, with work in
    the replica, whatever the machine's speed.
    """
    written = write_sample_shards(tmp_path / "input", shards=10, images_per_shard=1)
    output, gate = tmp_path / "output", tmp_path / "gate"
    gate.mkdir()
    job = JobProcess(job_flags(tmp_path / "input", output, checkpoint, "--batch-size", "1"),
                     env={GATE_ENV: str(gate), OUTPUT_ENV: str(output)})
    try:
        job.wait_for("committed shard", timeout=RUN_TIMEOUT_S)
        job.wait_for(HOLDING, timeout=60)  # the replica got a batch after that commit and holds it
        replicas = processes_in_session(job.process.pid, REPLICA_TITLE)
        assert len(replicas) == 1, replicas
        killed = replicas[0]
        assert f"{HOLDING} (pid {killed})" in "\n".join(job.lines)
        committed_before = set(read_checkpoints(output))
        os.kill(killed, signal.SIGKILL)
        (gate / "open").touch()  # the restarted replica serves batches at once
        status = job.wait(timeout=RUN_TIMEOUT_S)
    finally:
        job.stop()

    assert status == 0, job.tail()
    assert 1 <= len(committed_before) < len(written)  # killed mid-run
    assert job.error_lines() == []
    assert read_keys(output) == written  # every sample exactly once, in shard order, in one run
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["shards_done"] == len(written) and summary["failure"] is None
    pids = {replica_pid(replica) for record in read_checkpoints(output).values() for replica in record["replicas"]}
    # the killed replica captioned the first shards; another process (the restarted actor) the rest
    assert killed in pids and pids - {killed}, pids
    assert not list(output.rglob("*.tmp-*"))


def test_a_flaky_object_store_gives_the_same_output_as_a_clean_one(run_job, tmp_path, s3_server):
    """Input and output on S3 behind a proxy that answers a quarter of the requests with 503 SlowDown and drops
    some connections: the job gets through (botocore's standard retry mode, which the user sets in
    --storage-options) with exactly one row per sample, and the same captions as a run against the store itself."""
    direct, options = s3_server
    prefix = f"captions-test/flaky-job-{uuid.uuid4().hex}"
    written = write_sample_shards(tmp_path / "input", shards=3, images_per_shard=2)
    direct.put(str(tmp_path / "input"), f"{prefix}/input", recursive=True)

    assert run_job(f"s3://{prefix}/input", f"s3://{prefix}/clean", "--storage-options", json.dumps(options)) == 0
    # seed 5: of the first 30 requests (a run makes more), 9 are answered SlowDown and 3 dropped (the 7th, 17th, 27th)
    faults = Faults(slowdown_rate=0.25, drop_rate=0.05, seed=5)
    with S3Proxy(options["client_kwargs"]["endpoint_url"], faults) as proxy:
        flaky = {**options, "client_kwargs": {"endpoint_url": proxy.endpoint},
                 "config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}}
        status = run_job(f"s3://{prefix}/input", f"s3://{prefix}/flaky", "--storage-options", json.dumps(flaky))
    assert status == 0
    assert proxy.counts.slowdowns >= 9 and proxy.counts.drops >= 3, proxy.counts  # the faults really happened

    direct.invalidate_cache()
    clean, flaky_rows = (read_s3_outputs(direct, f"{prefix}/{name}") for name in ("clean", "flaky"))
    assert {shard: [row["key"] for row in rows] for shard, rows in flaky_rows.items()} == written
    assert all(row["error"] is None for rows in flaky_rows.values() for row in rows)
    assert flaky_rows == clean  # captions, token counts, sizes: the same rows
    assert set(direct.ls(f"{prefix}/flaky/_checkpoints", detail=False)) == {
        f"{prefix}/flaky/_checkpoints/{shard}.json" for shard in written
    }


def read_s3_outputs(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, list[dict]]:
    outputs = {}
    for path in sorted(fs.glob(f"{root}/shards/*.parquet")):
        with fs.open(path, "rb") as handle:
            outputs[path.rsplit("/", 1)[-1][: -len(".parquet")]] = pq.read_table(handle).to_pylist()
    return outputs


def test_a_replica_that_never_answers_ends_the_run_with_a_reason(checkpoint, tmp_path):
    """One shard's batches never come back from the replica: the stall watchdog stops the run after
    --stall-timeout with exit 1 and a one-line reason naming the flag; the other shards stay committed."""
    written = write_sample_shards(tmp_path / "input", shards=3, images_per_shard=1)
    output = tmp_path / "output"
    stalled = "part-00001.tar"
    flags = job_flags(tmp_path / "input", output, checkpoint, "--batch-size", "1", "--stall-timeout", str(STALL_TIMEOUT_S))
    job = JobProcess(flags, env={STALL_ENV: stalled})
    try:
        job.wait_for(STALLING, timeout=RUN_TIMEOUT_S)
        # the other shards' last results come after the stall began; the watchdog looks every timeout / 4
        status = job.wait(timeout=STALL_TIMEOUT_S * 1.25 + 60)
    finally:
        job.stop()

    assert status == 1, job.tail()
    errors = job.error_lines()
    assert len(errors) == 1 and "--stall-timeout" in errors[0] and "1 of 3 pending shards not committed" in errors[0], errors
    assert "no result for" in "\n".join(job.lines)  # the watchdog's own log line
    assert set(read_checkpoints(output)) == set(written) - {stalled}  # committed shards are kept
    assert read_keys(output) == {shard: keys for shard, keys in written.items() if shard != stalled}
    summary = json.loads((output / "_summary.json").read_text())
    assert summary["shards_done"] == 2 and summary["shards_failed"] == 1 and "--stall-timeout" in summary["failure"]
