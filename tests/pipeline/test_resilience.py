"""What a run survives, and how it ends when it cannot go on: a replica killed mid-run, a flaky object store, a
replica that never answers (issue 13), a store outage within and past the retry budget (issue 22)."""

import json
import logging
import os
import signal
import uuid
from types import SimpleNamespace

import fsspec
import pyarrow.parquet as pq
import pytest

from infra.local.s3_proxy import Faults, S3Proxy
from pipeline.testing import write_sample_shards
from tests.pipeline.conftest import run_cli
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


def test_a_replica_killed_mid_run_is_replaced_and_the_run_finishes(checkpoint, compiled_captioner, tmp_path):
    """SIGKILL of the replica's worker process while it holds a batch: Ray restarts the actor, Ray Data sends the
    lost batches again, and the same run commits every sample exactly once, with exit 0. The replicas are compiled:
    the restarted one loads the job's compiled graphs (here from its node's compile cache, which the session's
    compiled captioner filled) instead of compiling them.

    The job runs as a subprocess with a local Ray of its own, so that killing a worker cannot disturb the session's
    Ray, and its whole session is cleaned up afterwards. The test's worker hook makes the replica hold every batch it
    gets once the first shard is committed, until the test has killed it: so the kill lands mid-run, with work in
    the replica, whatever the machine's speed.
    """
    written = write_sample_shards(tmp_path / "input", shards=10, images_per_shard=1)
    output, gate = tmp_path / "output", tmp_path / "gate"
    gate.mkdir()
    job = JobProcess(job_flags(tmp_path / "input", output, checkpoint, "--batch-size", "2", "--compile",
                               "--dtype", "float32"),
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
    graphs = compiled_captioner.engine.stats()["compiled_graphs"]
    starts = list(summary["replicas"].values())
    assert len(starts) == 2 and {replica_pid(name) for name in summary["replicas"]} == pids
    assert all(start["graphs_compiled"] == 0 and start["graphs_loaded"] == graphs for start in starts), starts
    assert len(list((output / "_compiled").glob("*.tar"))) == 1  # published for the runs to come


@pytest.fixture(scope="module")
def on_s3(s3_server, ray_local, checkpoint, tmp_path_factory):
    """Shards on S3 and a clean run's rows (straight to the store), for the runs that meet a faulty store."""
    direct, options = s3_server
    prefix = f"captions-test/faulty-store-{uuid.uuid4().hex}"
    input_dir = tmp_path_factory.mktemp("faulty-store-input")
    written = write_sample_shards(input_dir, shards=3, images_per_shard=2)
    direct.put(str(input_dir), f"{prefix}/input", recursive=True)
    assert run_cli(checkpoint, f"s3://{prefix}/input", f"s3://{prefix}/clean", "--storage-options", json.dumps(options)) == 0
    return SimpleNamespace(direct=direct, options=options, prefix=prefix, input=f"s3://{prefix}/input", written=written,
                           clean=read_s3_outputs(direct, f"{prefix}/clean"))


def through(proxy: S3Proxy, options: dict, **extra) -> str:
    """--storage-options that reach the store through ``proxy``."""
    return json.dumps({**options, "client_kwargs": {"endpoint_url": proxy.endpoint}, **extra})


def test_a_flaky_object_store_gives_the_same_output_as_a_clean_one(run_job, on_s3):
    """Input and output on S3 behind a proxy that answers a quarter of the requests with 503 SlowDown and drops
    some connections: the job gets through (botocore's standard retry mode, which the user sets in
    --storage-options, and the job's own retries) with exactly one row per sample, and the same captions as a run
    against the store itself."""
    # seed 5: of the first 30 requests (a run makes more), 9 are answered SlowDown and 3 dropped (the 7th, 17th, 27th)
    faults = Faults(slowdown_rate=0.25, drop_rate=0.05, seed=5)
    with S3Proxy(on_s3.options["client_kwargs"]["endpoint_url"], faults) as proxy:
        flaky = through(proxy, on_s3.options, config_kwargs={"retries": {"max_attempts": 10, "mode": "standard"}})
        status = run_job(on_s3.input, f"s3://{on_s3.prefix}/flaky", "--storage-options", flaky)
    assert status == 0
    assert proxy.counts.slowdowns >= 9 and proxy.counts.drops >= 3, proxy.counts  # the faults really happened

    on_s3.direct.invalidate_cache()
    flaky_rows = read_s3_outputs(on_s3.direct, f"{on_s3.prefix}/flaky")
    assert {shard: [row["key"] for row in rows] for shard, rows in flaky_rows.items()} == on_s3.written
    assert all(row["error"] is None for rows in flaky_rows.values() for row in rows)
    assert flaky_rows == on_s3.clean  # captions, token counts, sizes: the same rows
    assert set(on_s3.direct.ls(f"{on_s3.prefix}/flaky/_checkpoints", detail=False)) == {
        f"{on_s3.prefix}/flaky/_checkpoints/{shard}.json" for shard in on_s3.written
    }


class EndOutageWhenCommitsFinish(logging.Handler):
    """Ends the proxy's outage once the run has settled every shard (the committer says so), before the run writes
    its summary and releases its lease."""

    def __init__(self, proxy: S3Proxy):
        super().__init__(logging.INFO)
        self.proxy = proxy

    def emit(self, record):
        if record.getMessage().startswith("commits finished"):
            self.proxy.end_outage()


JOB_FILE_WRITTEN = r"^PUT \S*/_job\.json "  # the request line of the job file's PUT: the run's work starts next
# botocore's own retries off: an outage of a few requests is ridden out by the job's policy, not by the client's
NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 0}}}


def test_a_store_outage_past_the_retry_budget_fails_the_run_and_the_rerun_rides_out_a_shorter_one(
    run_job, on_s3, caplog, capsys
):
    """Once the run has written its job file (the last thing before its work starts), the store answers every request
    503 ServiceUnavailable; past --store-retry-seconds the shards fail: exit 1, one line naming the store's answer and
    the budget. The same command again meets an outage of 4 refused requests at the same point, within the budget:
    its read tasks retry, exit 0, every sample exactly once, the clean run's rows, the retries counted in the summary.

    The windows open on an event (the job file's PUT answered) and close on one (the failing run's last shard settled,
    so that it can write its summary and release its lease; the fourth refusal), so the runs meet them whatever the
    machine's speed."""
    output = f"s3://{on_s3.prefix}/outage"
    commit_log = logging.getLogger("pipeline.commit")
    caplog.set_level(logging.INFO, logger="pipeline.commit")
    with S3Proxy(on_s3.options["client_kwargs"]["endpoint_url"]) as proxy:
        proxy.outage_after(JOB_FILE_WRITTEN)
        ender = EndOutageWhenCommitsFinish(proxy)
        commit_log.addHandler(ender)
        try:
            failed = run_job(on_s3.input, output, "--storage-options",
                             through(proxy, on_s3.options, **NO_CLIENT_RETRIES), "--store-retry-seconds", "2")
        finally:
            commit_log.removeHandler(ender)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]

    assert failed == 1 and proxy.counts.unavailable > 0
    assert len(errors) == 1 and errors[0].startswith("error: 3 of 3 pending shards not committed: "), errors
    assert errors[0].count("the store answered 503 ServiceUnavailable for ") == 3, errors
    assert errors[0].count(" s (--store-retry-seconds 2)") == 3, errors

    with S3Proxy(on_s3.options["client_kwargs"]["endpoint_url"]) as proxy:
        proxy.outage_after(JOB_FILE_WRITTEN, requests=4)
        rerun = run_job(on_s3.input, output, "--storage-options", through(proxy, on_s3.options, **NO_CLIENT_RETRIES),
                        "--store-retry-seconds", "30")
    on_s3.direct.invalidate_cache()
    summary = json.loads(on_s3.direct.cat_file(f"{on_s3.prefix}/outage/_summary.json"))

    assert rerun == 0 and proxy.outages[0].refused == 4
    assert read_s3_outputs(on_s3.direct, f"{on_s3.prefix}/outage") == on_s3.clean  # every sample once, same captions
    assert summary["shards_done"] == 3 and summary["store_retries"] == {"unavailable": 4}, summary


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
